"""Run a plan: the one path from a list of jobs to run folders, results.json and the report.

`ctxtune reproduce` and `ctxtune sweep` both build a plan (studies + jobs), then call `run_plan`:
1. write DIR/plan.json (before any job runs: what will run, exactly);
2. hand the jobs to an executor (local, process pool or Ray); finished jobs return their stored results;
   a failed job leaves DIR/.../error.json and its dependants are recorded as skipped;
3. collect results.json (schema: docs/results-schema.md) and write report.md and report.html.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctxtune.experiments.executors import Event, Executor
from ctxtune.experiments.jobs import WORKER, is_finished
from ctxtune.io import atomic_write_json

PLAN_SCHEMA = "ctxtune.plan/1"


def run_plan(
    out: Path,
    plan: dict[str, Any],
    executor: Executor,
    jobs: list[dict[str, Any]] | None = None,
    on_event: Callable[[Event], None] | None = None,
    quiet: bool = False,
    worker: str = WORKER,
) -> dict[str, Any]:
    """Run `jobs` (default: all of `plan["jobs"]`, which may also list jobs of earlier runs into the same folder)
    into `out`; returns {"doc": results document, "paths": report files, "wall_seconds", "stored": how many
    jobs had finished before}. `worker` is the dotted path executors call (tests substitute their own)."""
    from ctxtune.report import build_report

    out.mkdir(parents=True, exist_ok=True)
    earlier = earlier_wall(out / "plan.json")
    plan = {"schema": PLAN_SCHEMA, **plan}
    atomic_write_json(out / "plan.json", plan)
    jobs = plan["jobs"] if jobs is None else jobs
    finished = [j["id"] for j in jobs if is_finished(j)]
    todo = [j for j in jobs if j["id"] not in set(finished)]
    start = time.perf_counter()
    with ProgressPrinter(len(todo), plan.get("kind", "run"), quiet=quiet) as progress:
        if finished:
            progress.emit(f"{len(finished)} of {len(jobs)} jobs finished earlier: their stored results are used")

        def handle(event: Event) -> None:
            record_event(event)
            progress(event)
            if on_event is not None:
                on_event(event)

        try:
            executor.run(todo, worker=worker, on_event=handle, finished=finished)
        except BaseException:  # Ctrl-C or a crash: the time spent still counts when the folder is resumed
            record_wall(out, plan, earlier, start)
            raise
    wall = record_wall(out, plan, earlier, start)
    report = build_report(out, wall_seconds=plan["wall_seconds"])
    return {**report, "wall_seconds": wall, "stored": len(finished)}


def record_wall(out: Path, plan: dict[str, Any], earlier: float, start: float) -> float:
    """Write plan.json with the wall seconds of every invocation that worked on this folder; returns this one's."""
    wall = round(time.perf_counter() - start, 1)
    plan["wall_seconds"] = round(earlier + wall, 1)
    atomic_write_json(out / "plan.json", plan)
    return wall


def earlier_wall(path: Path) -> float:
    """Wall seconds recorded by earlier invocations on this results folder (0 when none or unreadable), so a
    rerun that finds its jobs finished does not report the folder as made in 0 s."""
    try:
        value = json.loads(path.read_text()).get("wall_seconds", 0.0)
    except (OSError, ValueError, AttributeError):
        return 0.0
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0.0


def record_event(event: Event) -> None:
    """error.json in a job's folder when it fails or is skipped; removed when an attempt starts."""
    folder = Path(event.job["out_dir"])
    if event.kind == "start":
        (folder / "error.json").unlink(missing_ok=True)
    elif event.kind == "failed" and event.outcome is not None:
        skipped = event.outcome.attempts == 0  # a dependency failed: never started
        atomic_write_json(folder / "error.json", {
            "id": event.job["id"], "status": "skipped" if skipped else "failed", "error": event.outcome.error,
            "attempts": event.outcome.attempts, "seconds": round(event.outcome.seconds, 3),
            "traceback": event.outcome.traceback,
        })


class ProgressPrinter:
    """Progress of a job list on stderr: a rich bar on a terminal, one line per finished job otherwise."""

    def __init__(self, total: int, title: str, quiet: bool = False) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.bar: Any = None
        self.task: Any = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task("starting", total=total)

    def __enter__(self) -> ProgressPrinter:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, event: Event) -> None:
        if event.kind == "retry":
            self.emit(f"retrying {event.job['id']}: {event.message}")
            return
        if event.kind not in ("done", "failed") or event.outcome is None:
            return
        self.done += 1
        outcome = event.outcome
        result = outcome.result or {}
        took = f"{outcome.seconds:.1f}s" + (" (stored)" if result.get("cached") else "")
        status = "ok" if outcome.status == "done" else "skipped" if outcome.attempts == 0 else "failed"
        line = f"[{self.done}/{self.total}] {event.job['id']}: {status} {took}"
        if outcome.status != "done":
            line += f" - {outcome.error}"
        self.emit(line)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=event.job["id"])

    def emit(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line)
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)
