"""Per-run overhead of each executor: N jobs that do nothing, run by local, process and Ray executors.

    python benchmarks/executor_overhead.py [--jobs 20] [--workers 2] [--executors local,process,ray]

prints a Markdown table. `startup` is the time until the first job finished (a local Ray instance starts
inside it); `per run` is the steady-state wall time per job after that; `total / N` includes the startup.
A job here is `ctxtune.experiments.executors:noop_job`, so every number is pure executor overhead.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ctxtune.experiments.executors import Event, Executor, get_executor

NOOP = "ctxtune.experiments.executors:noop_job"


def measure(executors: dict[str, Executor], n_jobs: int = 20) -> dict[str, dict[str, Any]]:
    """Run `n_jobs` independent no-op jobs on each executor and time them.

    Args:
        executors: name -> executor to measure.
        n_jobs: jobs per executor (at least 2).

    Returns:
        name -> {"jobs", "total_s", "startup_s", "per_run_ms", "total_per_run_ms", "failed"}.
    """
    if n_jobs < 2:
        raise ValueError("n_jobs must be >= 2")
    results = {}
    for name, executor in executors.items():
        jobs = [{"id": f"noop-{i}", "kind": "noop", "out_dir": "", "depends_on": []} for i in range(n_jobs)]
        done_at: list[float] = []

        def on_event(event: Event, done_at: list[float] = done_at) -> None:
            if event.kind in ("done", "failed"):
                done_at.append(time.perf_counter())

        start = time.perf_counter()
        outcomes = executor.run(jobs, worker=NOOP, on_event=on_event)
        total = time.perf_counter() - start
        startup = done_at[0] - start
        results[name] = {
            "jobs": n_jobs,
            "total_s": round(total, 3),
            "startup_s": round(startup, 3),
            "per_run_ms": round(1000 * (done_at[-1] - done_at[0]) / (n_jobs - 1), 3),
            "total_per_run_ms": round(1000 * total / n_jobs, 3),
            "failed": sum(o.status == "failed" for o in outcomes.values()),
        }
    return results


def markdown(results: dict[str, dict[str, Any]], workers: int) -> str:
    """The results as a Markdown table."""
    lines = [
        f"| executor (workers={workers}) | jobs | startup s | per run ms (steady) | total / N ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        row = [
            name,
            str(r["jobs"]),
            f"{r['startup_s']:.2f}",
            f"{r['per_run_ms']:.2f}",
            f"{r['total_per_run_ms']:.2f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--executors", default="local,process,ray")
    args = parser.parse_args()
    executors = {}
    for name in args.executors.split(","):
        if name == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print("(ray is not installed: skipped; pip install 'ctxtune[ray]')")
                continue
        executors[name] = get_executor(name, workers=args.workers)
    print(markdown(measure(executors, args.jobs), args.workers))


if __name__ == "__main__":
    main()
