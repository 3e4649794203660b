"""`ctxtune approx` (universal approximation by prefixing one head) and `ctxtune suffix-study`."""

from __future__ import annotations

from pathlib import Path

import typer

from ctxtune.commands.common import cli_errors, emit_json
from ctxtune.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("approx")(approx_cmd)
    app.command("suffix-study")(suffix_study_cmd)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--p must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--p must be comma-separated positive integers, got {text!r}")
    return values


@cli_errors
def approx_cmd(
    targets: str = typer.Option("sin3,poly,abs,step", help="Targets: sin3, poly, abs, step."),
    p: str = typer.Option("1,2,4,8,16,32,64", "--p", help="Prefix lengths."),
    mode: str = typer.Option("kernel", help="kernel (hand-set prefix) or fit (Adam from the kernel prefix)."),
    c: float = typer.Option(2.5, help="Kernel sharpness: kappa = (c P / 2 pi)^2."),
    fit_steps: int = typer.Option(300, "--fit-steps", help="Adam steps per prefix in fit mode."),
    out: Path = typer.Option(None, help="Write the results JSON here."),
    plot: Path = typer.Option(None, help="Write the log-log PNG here."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Prefixes of one fixed attention head approximate functions on the circle: error against P.

    Example: ctxtune approx --p 1,2,4,8,16,32,64 --plot ua.png
    """
    from ctxtune.beyond.universal import approximation_study, summarize
    from ctxtune.beyond.universal import plot as plot_fn
    from ctxtune.io import atomic_write_json

    if c <= 0 or fit_steps < 0:
        raise ConfigError(f"--c must be positive and --fit-steps non-negative, got {c} and {fit_steps}")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    result = approximation_study(names, _ints(p), mode, c, fit_steps=fit_steps)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
    if plot is not None:
        plot_fn(result, plot)
    if json_out:
        emit_json(result)
    else:
        typer.echo(summarize(result))


@cli_errors
def suffix_study_cmd(
    out: Path = typer.Option(Path("results/beyond/suffix_vs_prefix.json"), help="Results JSON."),
    bases: Path = typer.Option(Path("runs/beyond_bases"), help="Folder of base runs (pretrained if missing)."),
    steps: int = typer.Option(800, help="Adapter steps per method."),
    seeds: int = typer.Option(2, help="Seeds (one adapter bank)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Suffix vs prefix vs soft prompt at matched budgets, and the per-layer decomposition (minutes on CPU).

    Example: ctxtune suffix-study --steps 800 --seeds 2
    """
    from ctxtune.beyond.suffix import run_study, summarize

    if steps < 1 or seeds < 1:
        raise ConfigError("--steps and --seeds must be positive")
    result = run_study(out, bases, steps=steps, seeds=seeds)
    if json_out:
        emit_json(result)
    else:
        typer.echo(summarize(result))
