"""Study specs and sweeps expanded into plans of jobs (runs and analyses), executors, the results store."""
