"""`ctxtune diagnose`: will a prefix be enough for this task on this base? (see ctxtune.theory.heads).

The LoRA fit is an ordinary run (a RunSpec through `ctxtune.train.run`); the verdict is the "diagnose"
analysis of that run (`ctxtune.experiments.analyses.diagnose_run`), the same one the
diagnose_validation study applies to its cases.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from ctxtune.commands.common import cli_errors, emit_json
from ctxtune.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("diagnose")(diagnose_cmd)


def lora_fit_spec(base: str, task: str, steps: int, rank: int, lr: float, seed: int, eval_examples: int):  # noqa: ANN201
    """The RunSpec of the diagnostic's LoRA fit: rank r on q, k, v, o of every block, alpha = r, cosine."""
    from ctxtune.train import RunSpec, StreamSpec, TrainConfig

    train = TrainConfig(steps=steps, lr=lr, warmup=min(20, steps // 10), schedule="cosine", min_lr_ratio=0.1,
                        weight_decay=0.0, seed=seed, eval_examples=eval_examples)
    options = {"rank": rank, "alpha": float(rank), "targets": ["q", "k", "v", "o"]}
    return RunSpec("tune", "lora", (StreamSpec(task, seed=seed),), train, options=options, base=base)


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
    out: Path = typer.Option(None, help="Keep the LoRA fit in this run folder (default: a temporary one)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Path = typer.Option(None, help="Write a heatmap PNG here."),
) -> None:
    """Fit a cheap LoRA, then say per head whether a prefix could express its change.

    Example: ctxtune diagnose --base runs/asc --task descending --plot heads.png
    """
    from ctxtune.experiments.analyses import diagnose_run
    from ctxtune.theory.heads import Diagnosis, HeadDiagnosis, heatmap, table
    from ctxtune.train import run

    if examples < 1 or eval_examples < 1 or rank < 1 or steps < 1 or seed < 0:
        raise ConfigError("--steps, --rank and --examples must be positive and --seed non-negative")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot must name a .png file, got {plot}")
    spec = lora_fit_spec(str(base), task, steps, rank, lr, seed, eval_examples)
    spec.check_inputs()
    with tempfile.TemporaryDirectory(prefix="ctxtune-diagnose-") as tmp:
        folder = out if out is not None else Path(tmp) / "lora"
        run(spec, folder, resume=out is not None)
        result = diagnose_run(folder, seed, examples)
    heads = [HeadDiagnosis(**{k: v for k, v in h.items() if k != "label"}) for h in result["heads"]]
    diag = Diagnosis(**{**result, "heads": heads, "seconds_fit": result["seconds_fit"] or 0.0})
    if plot is not None:
        heatmap(diag, plot)
    if json_out:
        emit_json(diag.to_dict())
    else:
        typer.echo(table(diag))
