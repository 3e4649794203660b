"""Study specs, the runner, executors (local, process pool, Ray), the SQLite results store and sweeps."""
