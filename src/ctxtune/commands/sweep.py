"""`ctxtune sweep SPEC.toml`: run a grid of pretraining and tuning runs on one of the executors.

The spec format is documented in `ctxtune.experiments.sweep`; docs/scale-out.md covers Ray clusters.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ctxtune.commands.common import check_not_in_run_folder, check_out_apart, cli_errors, emit_json
from ctxtune.errors import ConfigError
from ctxtune.experiments.executors import EXECUTORS, get_executor

SPEC_HELP = (
    "Sweep spec TOML with the tables \\[model], \\[pretrain], \\[tune], \\[grid] and \\[resources] "
    "(format: ctxtune.experiments.sweep)."
)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_cmd)


@cli_errors
def sweep_cmd(
    spec: Path = typer.Argument(..., help=SPEC_HELP),
    executor: str = typer.Option("process", help=f"Where runs execute: {', '.join(EXECUTORS)} (default: parallel "
                                 "worker processes)."),
    workers: int = typer.Option(
        None, help="Runs at once (process: default one per usable core; ray: default all it has)."
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
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (job counts, runs, report paths)."),
) -> None:
    """Run every configuration of a sweep spec; finished runs are skipped, failed ones recorded.

    Writes DIR/runs/<hash8>/ run folders, DIR/results.sqlite, DIR/results.json and DIR/report.html (one row
    per method, options and task; one value per seed). Exit code 1 when a run failed.

    Example: ctxtune sweep examples/sweep.toml --executor process --workers 2 --out sweeps/example
    """
    from ctxtune.experiments.sweep import expand, load_spec, run_sweep, safe_name

    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if max_attempts < 1:
        raise ConfigError(f"--max-attempts must be >= 1, got {max_attempts}")
    data, name = load_spec(spec)
    out_dir = out if out is not None else Path("sweeps") / safe_name(data.get("name", name), "the sweep name")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    check_not_in_run_folder(out_dir, "--out")
    base = data.get("tune", {}).get("base") if isinstance(data.get("tune"), dict) else None
    if isinstance(base, str) and base:
        check_out_apart(out_dir, "--out", [("base (tune.base)", base)])
    plan = expand(data, out_dir, name)
    if executor == "process" and workers is None:
        from ctxtune.experiments.plan import usable_cores

        workers = usable_cores()
    runner = get_executor(executor, workers=workers, address=address, max_attempts=max_attempts)
    report = run_sweep(plan, out_dir, runner, store=store, quiet=quiet)
    counts = report["doc"]["jobs"]
    if json_out:
        emit_json({"out": str(out_dir), "jobs": counts, "stored": report["stored"], "runs": report["doc"]["runs"],
                   "paths": report["paths"]})
    else:
        print(f"sweep {out_dir}: {counts['ok']} ok ({report['stored']} finished before), {counts['failed']} failed, "
              f"{counts['skipped']} skipped, {counts['missing']} not run")
        for run in report["doc"]["runs"]:
            if run["status"] not in ("ok",):
                print(f"  {run['status']} {run['id']}: {run['error']}")
        print(f"report: {report['paths']['html']}  index: {store or out_dir / 'results.sqlite'}")
    if counts["failed"] or counts["skipped"]:
        raise typer.Exit(1)
