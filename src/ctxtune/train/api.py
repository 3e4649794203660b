"""High-level entry points: pretrain a model, tune a method on it, evaluate. Used by the CLI and studies.

Each writes a run folder (see `ctxtune.train.runs`) when `out_dir` is given, and can resume it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ctxtune import __version__
from ctxtune.errors import ConfigError
from ctxtune.io import atomic_write_json
from ctxtune.methods import Method, make_method
from ctxtune.model import GPT, ModelConfig
from ctxtune.tasks import Task, get_task
from ctxtune.train.config import TrainConfig
from ctxtune.train.evaluate import evaluate
from ctxtune.train.runs import load_base_model, read_config, save_adapter, save_model, write_summary
from ctxtune.train.trainer import Trainer, TrainResult, make_streams


def check_fits(model_cfg: ModelConfig, tasks: list[Task], placeholders: int, extra_positions: int = 0) -> None:
    """Reject tasks whose vocabulary or length the model cannot hold, naming the numbers."""
    for task in tasks:
        if task.d_vocab > model_cfg.d_vocab:
            raise ConfigError(f"task {task.name!r} needs d_vocab >= {task.d_vocab}, the model has {model_cfg.d_vocab}")
        seq = placeholders + task.n_input + task.n_output + extra_positions
        if model_cfg.pos == "learned" and seq > model_cfg.n_ctx:
            raise ConfigError(
                f"task {task.name!r} needs {seq} positions (with placeholders and shifted virtual tokens), "
                f"the model has n_ctx={model_cfg.n_ctx}"
            )


def pretrain(
    model_cfg: ModelConfig,
    task: str | Task,
    train_cfg: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = True,
    device: str = "cpu",
) -> tuple[GPT, TrainResult]:
    """Train a fresh model on `task` (every weight trainable); returns the trained model."""
    task = get_task(task) if isinstance(task, str) else task
    check_fits(model_cfg, [task], train_cfg.placeholders)
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg).to(device)
    method = make_method("full", model)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        write_run_config(
            out, "pretrain", model_cfg, {"key": "full", "options": {}, "n_adapters": 1}, train_cfg, [task.name]
        )
    result = Trainer(method, make_streams([task], train_cfg.seed), train_cfg, out, quiet=quiet).run(resume=resume)
    # The trained weights are the product: drop the method without restoring the initial snapshot.
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if out is not None:
        save_model(out, model)
        write_summary(out, summary(result, method, [task.name]))
    return model, result


def tune(
    base: GPT | str | Path,
    method_key: str,
    tasks: list[str] | list[Task],
    train_cfg: TrainConfig,
    options: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = True,
    device: str | None = None,
) -> tuple[Method, TrainResult]:
    """Train method `method_key` on a frozen base; one adapter per task (a bank when several)."""
    options = dict(options or {})
    base_path = None if isinstance(base, GPT) else Path(base)
    model = base if isinstance(base, GPT) else load_base_model(base)
    if device is not None:
        model.to(device)
    task_objs = [get_task(t) if isinstance(t, str) else t for t in tasks]
    if not task_objs:
        raise ConfigError("tune needs at least one task")
    method = make_method(method_key, model, n_adapters=len(task_objs), **options)
    method.to(next(model.parameters()).device)
    extra = method.content_offset(index=10**9, n_prompt=0)  # positions the method adds before the last token
    check_fits(model.cfg, task_objs, train_cfg.placeholders, extra)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        spec = {"key": method_key, "options": method.config.to_dict(), "n_adapters": len(task_objs)}
        names = [t.name for t in task_objs]
        write_run_config(out, "tune", model.cfg, spec, train_cfg, names, base=str(base_path) if base_path else None)
    result = Trainer(method, make_streams(task_objs, train_cfg.seed), train_cfg, out, quiet=quiet).run(resume=resume)
    if out is not None:
        if method_key == "full":
            save_model(out, model)
        else:
            save_adapter(out, method)
        write_summary(out, summary(result, method, [t.name for t in task_objs]))
    return method, result


def evaluate_run(
    method: Method, tasks: list[str], n_examples: int, seed: int = 0, placeholders: int = 0, adapter: int = 0
) -> dict[str, float]:
    """Accuracy of one adapter on several tasks."""
    task_objs = [get_task(t) for t in tasks]
    accs = evaluate(
        method, task_objs, n_examples, seed=seed, placeholders=placeholders, adapters=[adapter] * len(tasks)
    )
    return dict(zip(tasks, accs, strict=True))


def write_run_config(
    out: Path,
    kind: str,
    model_cfg: ModelConfig,
    method: dict[str, Any],
    train_cfg: TrainConfig,
    tasks: list[str],
    base: str | None = None,
) -> None:
    config = {
        "kind": kind,
        "model": model_cfg.to_dict(),
        "method": method,
        "train": train_cfg.to_dict(),
        "tasks": tasks,
        "base": base,
        "ctxtune_version": __version__,
    }
    config = json.loads(json.dumps(config))  # tuples -> lists, as stored
    existing = out / "config.json"
    if existing.is_file():
        old = read_config(out)
        if {k: v for k, v in old.items() if k != "ctxtune_version"} != {
            k: v for k, v in config.items() if k != "ctxtune_version"
        }:
            # Never mix two configurations in one folder: a resume must continue the same run.
            raise ConfigError(f"{out} holds a run with another configuration; choose a new --out folder")
    atomic_write_json(existing, config)


def summary(result: TrainResult, method: Method, tasks: list[str]) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "accuracy": dict(zip(tasks, result.accuracy, strict=True)),
        "seconds": round(result.seconds, 3),
        **method.describe(),
    }
