"""`ctxtune diagnose`: will a prefix be enough for this task on this base? (see ctxtune.beyond.diagnose)."""

from __future__ import annotations

from pathlib import Path

import typer

from ctxtune.commands.common import cli_errors, emit_json
from ctxtune.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("diagnose")(diagnose_cmd)


@cli_errors
def diagnose_cmd(
    base: Path = typer.Option(..., help="Pretrain run folder of the base model."),
    task: str = typer.Option(..., help="Task to adapt to (e.g. descending, double_hist)."),
    steps: int = typer.Option(300, help="LoRA training steps."),
    rank: int = typer.Option(4, help="LoRA rank (on q, k, v, o of every block)."),
    lr: float = typer.Option(1e-2, help="LoRA learning rate (cosine)."),
    seed: int = typer.Option(0, help="Seed of the LoRA fit and the analysis data."),
    examples: int = typer.Option(256, help="Test examples for the per-head analysis."),
    eval_examples: int = typer.Option(500, "--eval-examples", help="Test examples for the LoRA's accuracy."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Path = typer.Option(None, help="Write a heatmap PNG here."),
) -> None:
    """Fit a cheap LoRA, then say per head whether a prefix could express its change.

    Example: ctxtune diagnose --base runs/asc --task descending --plot heads.png
    """
    import torch

    from ctxtune.beyond.diagnose import diagnose, heatmap, table
    from ctxtune.tasks import get_task

    get_task(task)  # unknown task: one line before any work
    if examples < 1 or eval_examples < 1 or rank < 1 or steps < 1 or seed < 0:
        raise ConfigError("--steps, --rank and --examples must be positive and --seed non-negative")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot must name a .png file, got {plot}")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    diag = diagnose(
        base, task, steps=steps, rank=rank, lr=lr, seed=seed, n_examples=examples, eval_examples=eval_examples
    )
    if plot is not None:
        heatmap(diag, plot)
    if json_out:
        emit_json(diag.to_dict())
    else:
        typer.echo(table(diag))
