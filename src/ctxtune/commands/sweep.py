"""`ctxtune sweep SPEC.toml`: run a grid of pretraining and tuning runs on one of the executors.

The spec format is documented in `ctxtune.experiments.sweep`; docs/scale-out.md covers Ray clusters.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from ctxtune.commands.common import cli_errors, emit_json
from ctxtune.errors import ConfigError
from ctxtune.experiments.executors import EXECUTORS, Event, get_executor
from ctxtune.experiments.sweep import expand, load_spec, run_sweep


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_cmd)


class SweepProgress:
    """Done / failed / remaining on stderr: a rich bar on a terminal, one line per finished run otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.progress: Any = None

    def __enter__(self) -> SweepProgress:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]sweep"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "done {task.fields[done]}  [red]failed {task.fields[failed]}[/]"
                    "  remaining {task.fields[remaining]}"
                ),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "sweep", total=self.total, done=0, failed=0, remaining=self.total
            )
        return self

    def __call__(self, event: Event, counts: dict[str, int]) -> None:
        if not self.enabled or event.kind in ("start",):
            return
        if self.progress is not None:
            finished = counts["done"] + counts["failed"]
            self.progress.update(
                self.task,
                completed=finished,
                done=counts["done"],
                failed=counts["failed"],
                remaining=counts["remaining"],
            )
            if event.kind == "retry":
                self.progress.console.print(f"retrying {event.job['id']}: {event.message}")
            return
        what = f"{event.kind} {event.job['id']}" + (f": {event.message}" if event.message else "")
        print(
            f"[done {counts['done']} failed {counts['failed']} remaining {counts['remaining']}] {what}",
            file=sys.stderr,
        )

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


@cli_errors
def sweep_cmd(
    spec: Path = typer.Argument(
        ..., help="Sweep spec TOML: [model], [pretrain], [tune], [grid], [resources]."
    ),
    executor: str = typer.Option("local", help=f"Where runs execute: {', '.join(EXECUTORS)}."),
    workers: int = typer.Option(
        None, help="Runs at once (process: default CPU count; ray: default all it has)."
    ),
    address: str = typer.Option(
        None, help="Ray cluster address (e.g. auto or ray://head:10001); none starts Ray here."
    ),
    out: Path = typer.Option(None, help="Sweep folder (default: sweeps/<spec name>)."),
    store: Path = typer.Option(
        None, help="SQLite results index (default: DIR/results.sqlite; keep it local)."
    ),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Starts per run when its worker dies."),
    quiet: bool = typer.Option(False, help="No progress on stderr."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (the results.json summary)."),
) -> None:
    """Run every configuration of a sweep spec; finished runs are skipped, failed ones recorded.

    Writes DIR/runs/<hash8>/ run folders, DIR/results.sqlite and DIR/results.json. Exit code 1 when a
    run failed.

    Example: ctxtune sweep studies/my_sweep.toml --executor process --workers 2 --out sweeps/mine
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if max_attempts < 1:
        raise ConfigError(f"--max-attempts must be >= 1, got {max_attempts}")
    data, name = load_spec(spec)
    out_dir = out if out is not None else Path("sweeps") / str(data.get("name", name))
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    jobs = expand(data, out_dir, name)
    if executor == "process" and workers is None:
        import os

        workers = os.cpu_count() or 1
    runner = get_executor(executor, workers=workers, address=address, max_attempts=max_attempts)
    with SweepProgress(len(jobs), enabled=not quiet) as progress:
        summary = run_sweep(jobs, out_dir, runner, on_event=progress, store_path=store)
    if json_out:
        emit_json(summary)
    else:
        print(
            f"sweep {out_dir}: {summary['done']} done ({summary['skipped']} skipped as finished before), "
            f"{summary['failed']} failed, {summary['remaining']} not run"
        )
        for run in summary["runs"]:
            if run["status"] == "failed":
                print(f"  failed {run['id']}: {run['error']}")
        print(f"results: {out_dir / 'results.json'}  index: {store or out_dir / 'results.sqlite'}")
    if summary["failed"]:
        raise typer.Exit(1)
