"""`ctxtune bench`: run the benchmarks of a source checkout (benchmarks/run.py), as `make bench` does.

The output folder is checked before any benchmark runs; the runner writes into a temporary folder and
results.json and results.md are then moved into place atomically, so they are never half-written.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import typer

from ctxtune.commands.common import check_output_path, cli_errors
from ctxtune.errors import CtxtuneError
from ctxtune.io import atomic_write_bytes

RESULT_FILES = ("results.json", "results.md")


def find_runner() -> Path:
    """benchmarks/run.py of the checkout this package was installed from (editable), or of the current folder."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / "benchmarks" / "run.py"
        if candidate.is_file():
            return candidate
    raise CtxtuneError("benchmarks/run.py not found: run `ctxtune bench` from a ctxtune source checkout")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)


@cli_errors
def bench_cmd(
    quick: bool = typer.Option(False, help="Tiny sizes (a smoke run of every benchmark)."),
    only: str = typer.Option(None, help="Run one benchmark by name."),
    out: Path = typer.Option(None, help="Folder for results.md / results.json (default: benchmarks/)."),
) -> None:
    """Run the benchmarks and write results.md and results.json (goals beside measured ratios).

    Example: ctxtune bench --only banks --out /tmp/bench
    """
    runner = find_runner()
    target = out if out is not None else runner.parent
    check_output_path(target, "--out", "folder")
    with tempfile.TemporaryDirectory(prefix="ctxtune-bench-") as tmp:
        args = [sys.executable, str(runner), "--out", tmp]
        if quick:
            args.append("--quick")
        if only:
            args += ["--only", only]
        code = subprocess.call(args)
        if code:
            raise typer.Exit(code)
        for name in RESULT_FILES:
            atomic_write_bytes(target / name, (Path(tmp) / name).read_bytes())
