"""`ctxtune reproduce`: the paper's Sections 5-6 studies with a report; `ctxtune report DIR`: rebuild it."""

from __future__ import annotations

from pathlib import Path

import typer

from ctxtune.commands.common import check_not_in_run_folder, cli_errors, emit_json
from ctxtune.errors import ConfigError
from ctxtune.limits import MAX_EVAL_EXAMPLES, MAX_SEEDS, check_threads


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_cmd)
    app.command("report")(report_cmd)


@cli_errors
def reproduce_cmd(
    scale: str = typer.Option("quick", help="quick (2-core CPU, the default), standard (longer CPU) or paper (GPU)."),
    seeds: int = typer.Option(3, help="Seeds per study (0..N-1)."),
    only: list[str] = typer.Option(None, help="Run only this study; repeat for several. Paper: "
                                   "cannot_learn_new_attention, elicit, compose_vs_new, prefix_vs_lora; beyond the "
                                   "paper: suffix_vs_prefix, diagnose_validation, real_lm (standard scale only)."),
    group: str = typer.Option("paper", help="Without --only: the paper's studies (paper), ours (beyond) or all."),
    out: Path = typer.Option(None, help="Results folder (default results/<scale>)."),
    executor: str = typer.Option("process", help="process (parallel worker processes, the default), local (one "
                                 "job after another in this process) or ray."),
    workers: int = typer.Option(None, help="Jobs at once (default: one per usable core)."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 (bfloat16 autocast in training; needs native "
                                  "bfloat16: the report says so)."),
    device: str = typer.Option("cpu", help="Torch device for training and evaluation (cpu, cuda, cuda:0)."),
    max_steps_factor: float = typer.Option(1.0, "--max-steps-factor",
                                           help="Multiply every step count by this factor (a shortened run; the "
                                                "report says so)."),
    steps: int = typer.Option(None, help="Override every run's step count (smoke tests)."),
    eval_examples: int = typer.Option(None, "--eval-examples", help="Override the number of test examples."),
    threads: int = typer.Option(None, help="torch threads per job (default: torch's choice in this process, "
                                "1 per worker process)."),
    quiet: bool = typer.Option(False, help="No progress output."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Reproduce the paper's experiments (Sections 5-6) and write DIR/report.html, report.md, results.json.

    Exit code 1 when a job failed (the report still shows what finished).

    Example: ctxtune reproduce --scale quick --seeds 3 --out results/quick
    """
    from ctxtune.experiments.reproduce import reproduce

    if not 1 <= seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be from 1 to {MAX_SEEDS:,} (each seed runs every study again), got {seeds:,}")
    if eval_examples is not None and not 1 <= eval_examples <= MAX_EVAL_EXAMPLES:
        raise ConfigError(f"--eval-examples must be from 1 to {MAX_EVAL_EXAMPLES:,}, got {eval_examples:,}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if executor not in ("local", "process", "ray"):
        raise ConfigError(f"unknown executor {executor!r}; choose local, process or ray")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if threads is not None:
        check_threads(threads, "--threads")
    if out is not None:
        check_not_in_run_folder(out, "--out")
    override = {"steps": steps} if steps is not None else None
    summary = reproduce(scale=scale, seeds=seeds, only=only or None, out=out, executor=executor, workers=workers,
                        device=device, step_factor=max_steps_factor, train_override=override,
                        eval_examples=eval_examples, threads=threads, quiet=quiet or json_out, group=group,
                        precision=precision)
    if json_out:
        emit_json(summary)
    else:
        print_summary(summary)
    if summary["failed"]:
        raise typer.Exit(1)


def print_summary(summary: dict) -> None:
    typer.echo(f"report: {summary['paths']['html']}")
    typer.echo(f"jobs: {summary['jobs']['ok']} ok, {summary['jobs']['failed']} failed, "
               f"{summary['jobs']['skipped']} skipped; wall {summary['wall_seconds']:.0f} s")
    for name, why in summary.get("skipped_studies", {}).items():
        typer.echo(f"  skipped study {name}: {why}")
    for job_id, error in summary["failed"].items():
        typer.echo(f"  failed {job_id}: {error}")
    for claim, holds in summary["claims"].items():
        typer.echo(f"  {claim}: {'holds' if holds else 'not measured' if holds is None else 'does NOT hold'}")
    if any(holds is False for holds in summary["claims"].values()):
        typer.echo("  why a claim does not hold: its section in the report shows each failing seed's learning curve "
                   "and what the other scales measured")


@cli_errors
def report_cmd(
    results_dir: Path = typer.Argument(..., help="A results folder written by ctxtune reproduce."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Rebuild results.json, report.md and report.html from a results folder's run folders.

    Example: ctxtune report results/quick
    """
    from ctxtune.report import build_report

    if not results_dir.is_dir():
        raise ConfigError(f"results folder not found: {results_dir}")
    report = build_report(results_dir)
    doc = report["doc"]
    claims = {f"{n}/{c['id']}": c["holds"] for n, st in doc["studies"].items() for c in st["claims"]}
    if json_out:
        emit_json({"paths": report["paths"], "jobs": doc["jobs"], "claims": claims})
        return
    typer.echo(f"report: {report['paths']['html']}")
