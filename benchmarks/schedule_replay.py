"""Replay a finished reproduce folder's measured job times through two scheduling policies.

    python benchmarks/schedule_replay.py results/quick-reference [--workers 2]

A simulation, not a run: each job takes the seconds its run recorded (results.json), waits for the jobs it
depends on (plan.json), and starts on the first free worker. Two policies pick among the ready jobs:
- plan order: the order the plan lists them (study by study), the executors' policy before issue 16;
- costliest chain first: `executors.chain_costs`, the policy the executors use now.
It also prints the two lower bounds, the longest chain of measured times and the job time per worker, so a
reader can tell whether a wall time is set by the schedule or by the amount of work.
"""
from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ctxtune.experiments.executors import chain_costs


def fail(message: str) -> None:
    """One line naming the problem, exit code 2 (the command-line contract)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load(folder: Path) -> tuple[dict[str, dict], dict[str, float]]:
    """The plan's jobs by id, and each job's measured seconds."""
    for name in ("plan.json", "results.json"):
        if not (folder / name).is_file():
            fail(f"{folder / name} not found (a folder written by `ctxtune reproduce`)")
    try:
        jobs = {job["id"]: job for job in json.loads((folder / "plan.json").read_text())["jobs"]}
        seconds = {run["id"]: float(run["seconds"])
                   for run in json.loads((folder / "results.json").read_text())["runs"]
                   if run.get("seconds") is not None}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        fail(f"{folder} does not hold a readable plan.json and results.json ({type(err).__name__}: {err})")
    missing = sorted(set(jobs) - set(seconds))
    if missing:
        fail(f"no measured time for {len(missing)} job(s), first {missing[0]!r}: replay a finished folder")
    return jobs, seconds


def replay(jobs: dict[str, dict], seconds: dict[str, float], key: Callable[[str], object], workers: int) -> float:
    """Wall seconds of list scheduling with `workers` workers, ready jobs taken in `key` order."""
    done: set[str] = set()
    started: set[str] = set()
    running: list[tuple[float, str]] = []  # (finish time, job id), a min-heap
    now = 0.0
    while len(done) < len(jobs):
        ready = sorted((j for j in jobs if j not in started
                        and all(d in done for d in jobs[j].get("depends_on", []))), key=key)
        for job_id in ready[: workers - len(running)]:
            started.add(job_id)
            heapq.heappush(running, (now + seconds[job_id], job_id))
        now, finished = heapq.heappop(running)
        done.add(finished)
    return now


def longest_chain(jobs: dict[str, dict], seconds: dict[str, float]) -> float:
    """The most measured seconds along one chain of dependencies (a lower bound on any schedule)."""
    memo: dict[str, float] = {}

    def through(job_id: str) -> float:
        if job_id not in memo:
            deps = jobs[job_id].get("depends_on", [])
            memo[job_id] = seconds[job_id] + max((through(d) for d in deps), default=0.0)
        return memo[job_id]

    return max(through(j) for j in jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a results folder with plan.json and results.json")
    parser.add_argument("--workers", type=int, default=2, help="workers to replay with (default 2)")
    args = parser.parse_args()
    if args.workers < 1:
        fail("--workers must be at least 1")
    jobs, seconds = load(args.folder)
    order = {job_id: i for i, job_id in enumerate(jobs)}
    rank = chain_costs(jobs)
    total = sum(seconds[j] for j in jobs)
    print(f"{len(jobs)} jobs, {total:,.0f} s of job time, {args.workers} workers")
    print(f"  lower bounds: longest chain {longest_chain(jobs, seconds):,.0f} s, "
          f"job time per worker {total / args.workers:,.0f} s")
    print(f"  plan order:             {replay(jobs, seconds, lambda j: order[j], args.workers):,.0f} s")
    print(f"  costliest chain first:  {replay(jobs, seconds, lambda j: (-rank[j], order[j]), args.workers):,.0f} s")


if __name__ == "__main__":
    main()
