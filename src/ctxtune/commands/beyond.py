"""`ctxtune approx`: universal approximation by prefixing one fixed attention head.

(The suffix-vs-prefix study and the diagnose validation are study specs: `ctxtune reproduce --group beyond`.)"""

from __future__ import annotations

from pathlib import Path

import typer

from ctxtune.commands.common import check_output_path, cli_errors, emit_json
from ctxtune.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("approx")(approx_cmd)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--p must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--p must be comma-separated positive integers, got {text!r}")
    return values


def _check_own_result(out: Path) -> None:
    """An existing --out file is replaced only when it is an earlier `ctxtune approx` result."""
    import json

    if not out.exists():
        return
    try:
        kind = json.loads(out.read_text()).get("kind")
    except (OSError, ValueError, RecursionError, AttributeError):
        kind = None
    if kind != "universal":
        raise ConfigError(f"--out {out} exists and is not a `ctxtune approx` result; choose a new file")


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
    from ctxtune.constructions.universal import approximation_study
    from ctxtune.io import atomic_write_json
    from ctxtune.report.sections import universal_plot, universal_table

    if c <= 0 or fit_steps < 0:
        raise ConfigError(f"--c must be positive and --fit-steps non-negative, got {c} and {fit_steps}")
    if out is not None:
        check_output_path(out, "--out", "file")
        _check_own_result(out)
    if plot is not None:
        check_output_path(plot, "--plot", "file")
        if plot.suffix.lower() != ".png":
            raise ConfigError(f"--plot must name a .png file, got {plot}")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    result = approximation_study(names, _ints(p), mode, c, fit_steps=fit_steps)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
    if plot is not None:
        universal_plot(result, plot)
    if json_out:
        emit_json(result)
    else:
        typer.echo(universal_table(result))
