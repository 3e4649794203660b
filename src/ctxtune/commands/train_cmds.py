"""`ctxtune pretrain`, `ctxtune tune`, `ctxtune eval`: the pieces by hand.

Options come from flags or a TOML file (`--config`), flags winning; every value is validated before
anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ctxtune.commands.common import cli_errors, emit_json, given
from ctxtune.configs import check_keys, load_toml, table
from ctxtune.errors import ConfigError
from ctxtune.limits import MAX_EVAL_EXAMPLES, MAX_SEED
from ctxtune.methods import get_method_class
from ctxtune.model import ModelConfig
from ctxtune.tasks import get_task
from ctxtune.train import RunResult, RunSpec, StreamSpec, run
from ctxtune.train.config import TrainConfig

TRAIN_FLAGS = dict(
    steps=typer.Option(None, help="Optimiser steps."),
    batch_size=typer.Option(None, "--batch-size", help="Examples per adapter per step."),
    lr=typer.Option(None, help="Peak learning rate."),
    weight_decay=typer.Option(None, "--weight-decay", help="AdamW weight decay."),
    warmup=typer.Option(None, help="Linear warm-up steps."),
    schedule=typer.Option(None, help="constant or cosine."),
    seed=typer.Option(None, help="Seed of initialisation and data."),
    placeholders=typer.Option(None, help="Leading zero tokens before each input (the authors' layout)."),
    eval_examples=typer.Option(None, "--eval-examples", help="Test examples for the final accuracy."),
    checkpoint_every=typer.Option(None, "--checkpoint-every", help="Resumable checkpoint every N steps."),
    precision=typer.Option(None, help="fp32 (default) or bf16 (autocast, float32 master weights; needs native "
                           "bfloat16)."),
)


def train_config(toml: dict[str, Any], params: dict[str, Any], defaults: dict[str, Any], where: Any) -> TrainConfig:
    """Defaults, then the TOML [train] table, then the train flags the user gave (from the command's params)."""
    flags = given(**{name: params[name] for name in TRAIN_FLAGS})
    return TrainConfig.from_dict({**defaults, **table(toml, "train", str(where)), **flags})


def options_file(config: Path | None, allowed: set[str]) -> dict[str, Any]:
    """The --config TOML file (empty without one), its top-level keys checked."""
    if config is None:
        return {}
    return check_keys(load_toml(config), allowed, str(config))


def out_folder(out: Path, resume: bool) -> Path:
    """Refuse to overwrite a finished or foreign run unless resuming it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise ConfigError(f"--out {out} is not empty; pass --resume to continue that run or choose a new folder")
    return out


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_cmd)
    app.command("tune")(tune_cmd)
    app.command("eval")(eval_cmd)


@cli_errors
def pretrain_cmd(
    task: str = typer.Option(None, help="Task to pretrain on (e.g. ascending, mix)."),
    out: Path = typer.Option(..., help="Run folder to create."),
    config: Path = typer.Option(None, help="TOML file: model and train tables, top-level task."),
    layers: int = typer.Option(None, help="n_layers."),
    heads: int = typer.Option(None, help="n_heads."),
    d_model: int = typer.Option(None, "--d-model", help="Residual width."),
    d_mlp: int = typer.Option(None, "--d-mlp", help="MLP width (default 4 d_model)."),
    n_ctx: int = typer.Option(None, "--n-ctx", help="Positions."),
    pos: str = typer.Option(None, help="learned, rotary or none."),
    norm: str = typer.Option(None, help="layernorm, rmsnorm or none."),
    attn_norm: bool = typer.Option(None, "--attn-norm/--no-attn-norm", help="Keep the pre-attention norm."),
    act: str = typer.Option(None, help="gelu or relu."),
    dropout: float = typer.Option(None, help="Dropout."),
    steps: int = TRAIN_FLAGS["steps"],
    batch_size: int = TRAIN_FLAGS["batch_size"],
    lr: float = TRAIN_FLAGS["lr"],
    weight_decay: float = TRAIN_FLAGS["weight_decay"],
    warmup: int = TRAIN_FLAGS["warmup"],
    schedule: str = TRAIN_FLAGS["schedule"],
    seed: int = TRAIN_FLAGS["seed"],
    placeholders: int = TRAIN_FLAGS["placeholders"],
    eval_examples: int = TRAIN_FLAGS["eval_examples"],
    checkpoint_every: int = TRAIN_FLAGS["checkpoint_every"],
    precision: str = TRAIN_FLAGS["precision"],
    resume: bool = typer.Option(False, help="Continue a killed run in --out from its last checkpoint."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Pretrain a small GPT on a task (all weights trainable).

    Example: ctxtune pretrain --task ascending --layers 1 --heads 1 --d-model 64 --steps 1500 --lr 3e-3 --out runs/asc
    """
    toml = options_file(config, {"task", "model", "train"})
    model_flags = given(
        n_layers=layers,
        n_heads=heads,
        d_model=d_model,
        d_mlp=d_mlp,
        n_ctx=n_ctx,
        pos=pos,
        norm=norm,
        attn_norm=attn_norm,
        act=act,
        dropout=dropout,
    )
    model_cfg = ModelConfig.from_dict({"n_ctx": 32, **table(toml, "model", str(config)), **model_flags})
    defaults = {**get_method_class("full").train_defaults, "train_mode": True}
    train_cfg = train_config(toml, locals(), defaults, config)
    task_name = task or toml.get("task")
    if not task_name:
        raise ConfigError("no task given: pass --task or set task in the config file")
    get_task(task_name)
    spec = RunSpec("pretrain", "full", (StreamSpec(task_name, seed=train_cfg.seed),), train_cfg, model=model_cfg)
    result = run(spec, out_folder(out, resume), resume=resume, quiet=quiet)
    report(
        json_out,
        {
            "out": str(out),
            "task": task_name,
            "steps": result.steps,
            "final_loss": result.final_loss[0],
            "accuracy": result.trainer_accuracy[0],
            "seconds": round(result.train_seconds, 2),
            **already_finished(result),
        },
    )


@cli_errors
def tune_cmd(
    base: Path = typer.Option(..., help="Pretrained run folder (from ctxtune pretrain)."),
    method: str = typer.Option(
        None, help="hard_prompt, in_context, soft_prompt, prefix, prefix_kv, suffix, lora, full."
    ),
    task: list[str] = typer.Option(None, help="Task; repeat for a bank of adapters (one per task)."),
    out: Path = typer.Option(..., help="Run folder to create."),
    config: Path = typer.Option(None, help="TOML file: top-level method and task, options and train tables."),
    n_virtual: int = typer.Option(None, "--n-virtual", help="Prefix / prompt / suffix length P."),
    position_policy: str = typer.Option(None, "--position-policy", help="keep or shift (context methods)."),
    rank: int = typer.Option(None, help="LoRA rank."),
    alpha: float = typer.Option(None, help="LoRA alpha."),
    targets: str = typer.Option(None, help="LoRA targets, comma-separated: q,k,v,o,mlp_in,mlp_out."),
    reparam_dim: int = typer.Option(None, "--reparam-dim", help="prefix_kv MLP reparameterisation width."),
    tokens: str = typer.Option(None, help="hard_prompt token ids, comma-separated."),
    examples: int = typer.Option(None, help="in_context: number of solved examples in the prompt."),
    steps: int = TRAIN_FLAGS["steps"],
    batch_size: int = TRAIN_FLAGS["batch_size"],
    lr: float = TRAIN_FLAGS["lr"],
    weight_decay: float = TRAIN_FLAGS["weight_decay"],
    warmup: int = TRAIN_FLAGS["warmup"],
    schedule: str = TRAIN_FLAGS["schedule"],
    seed: int = TRAIN_FLAGS["seed"],
    placeholders: int = TRAIN_FLAGS["placeholders"],
    eval_examples: int = TRAIN_FLAGS["eval_examples"],
    checkpoint_every: int = TRAIN_FLAGS["checkpoint_every"],
    precision: str = TRAIN_FLAGS["precision"],
    resume: bool = typer.Option(False, help="Continue a killed run in --out."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Tune a method on a frozen pretrained model; report test exact-match accuracy.

    Example: ctxtune tune --base runs/asc --method prefix --n-virtual 1 --task descending --lr 2e-2 --out runs/p
    """
    toml = options_file(config, {"method", "task", "options", "train"})
    key = method or toml.get("method")
    if not key:
        raise ConfigError("no method given: pass --method or set method in the config file")
    cls = get_method_class(key)
    task_names = list(task) if task else toml.get("task", [])
    task_names = [task_names] if isinstance(task_names, str) else task_names
    if not isinstance(task_names, list) or not task_names:
        raise ConfigError("no task given: pass --task (repeatable) or set task in the config file")
    repeated = sorted({t for t in task_names if task_names.count(t) > 1})
    if repeated:
        raise ConfigError(f"task {repeated[0]!r} given twice: a bank trains one adapter per task, give each task once")
    options = {
        **table(toml, "options", str(config)),
        **given(n_virtual=n_virtual, position_policy=position_policy, rank=rank, alpha=alpha, reparam_dim=reparam_dim,
                examples=examples),
    }
    if targets is not None:
        options["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
    if tokens is not None:
        try:
            options["tokens"] = [int(t) for t in tokens.split(",")]
        except ValueError:
            raise ConfigError(f"--tokens must be comma-separated integers, got {tokens!r}") from None
    train_cfg = train_config(toml, locals(), dict(cls.train_defaults), config)
    streams = tuple(StreamSpec(t, seed=train_cfg.seed, index=k) for k, t in enumerate(task_names))
    spec = RunSpec("tune", key, streams, train_cfg, options=options, base=str(base))
    spec.check_inputs()
    result = run(spec, out_folder(out, resume), resume=resume, quiet=quiet)
    report(
        json_out,
        {
            "out": str(out),
            "method": key,
            "tasks": task_names,
            "steps": result.steps,
            "trainable": result.trainable,
            "final_loss": result.final_loss,
            "accuracy": dict(zip(task_names, result.trainer_accuracy, strict=True)),
            "seconds": round(result.train_seconds, 2),
            **already_finished(result),
        },
    )


@cli_errors
def eval_cmd(
    run: Path = typer.Option(None, help="A pretrain run (the base alone) or a tune run (base + its method)."),
    adapter: str = typer.Option(None, "--adapter", help="A trained adapter instead of --run: a PEFT adapter folder "
                                "(prefix tuning, prompt tuning, LoRA; with --base) or a ctxtune run folder."),
    base: str = typer.Option(None, "--base", help="Base model of a PEFT --adapter: Hugging Face folder, .gguf or "
                             "smollm2 (default: the adapter's base_model_name_or_path when it is a local folder)."),
    task: list[str] = typer.Option(None, help="Task(s) to evaluate on; repeatable."),
    task_file: Path = typer.Option(None, "--task-file", help="A JSONL file of prompt/completion pairs (Hugging "
                                   "Face models; docs/bring-your-own-model.md), evaluated on its test split."),
    examples: int = typer.Option(None, help="Test examples per task (default 3200; a --task-file's test split: "
                                 "each example once)."),
    seed: int = typer.Option(0, help="Seed of the evaluation data."),
    index: int = typer.Option(0, "--index", help="Which adapter of a bank to evaluate."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Exact-match accuracy (greedy decoding) of a run or an adapter on one or more tasks.

    Example: ctxtune eval --run runs/asc-prefix --task descending --task ascending

    Example: ctxtune eval --adapter adapters/lora --base models/llama --task-file task.jsonl
    """
    from ctxtune.commands.adapters import file_task
    from ctxtune.train.evaluate import evaluate

    if adapter is not None and adapter.isdigit() and not Path(adapter).exists():
        raise ConfigError(f"--adapter names an adapter folder now; the adapter of a bank is --index {adapter}")
    if (run is None) == (adapter is None):
        raise ConfigError("give exactly one of --run (a run folder) and --adapter (a PEFT or run folder)")
    if examples is not None and examples <= 0:
        raise ConfigError(f"--examples must be positive, got {examples}")
    if examples is not None and examples > MAX_EVAL_EXAMPLES:
        raise ConfigError(f"--examples must be at most {MAX_EVAL_EXAMPLES:,} (hours of decoding), got {examples:,}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be from 0 to {MAX_SEED:,} (evaluation seeds derive from it within 64 bits), "
                          f"got {seed:,}")
    if not task and task_file is None:
        raise ConfigError("no task given: pass --task (repeatable) or --task-file")
    method, base_source, placeholders = _eval_target(run, adapter, base, index)
    names = list(task or [])
    if task_file is not None:
        names.append(file_task(task_file, base_source).name)
    task_objs = [get_task(t) for t in names]
    counts = [examples or _default_examples(t) for t in task_objs]
    k = 0 if method.n_adapters == 1 else index
    if len(set(counts)) == 1:  # one call: task i draws its data from the evaluation seed and i
        accs = evaluate(method, task_objs, counts[0], seed=seed, placeholders=placeholders, adapters=[k] * len(names))
    else:
        accs = [evaluate(method, [t], n, seed=seed, placeholders=placeholders, adapters=[k])[0]
                for t, n in zip(task_objs, counts, strict=True)]
    where = {"run": str(run)} if run is not None else {"adapter": adapter, "base": base_source}
    report(json_out, {**where, "index": index, "examples": dict(zip(names, counts, strict=True)),
                      "accuracy": dict(zip(names, accs, strict=True))})


def _eval_target(run: Path | None, adapter: str | None, base: str | None, index: int) -> tuple[Any, str, int]:
    """(the method to evaluate, its base model's source, placeholders) of --run or --adapter."""
    from ctxtune.tasks.user import register_run_tasks
    from ctxtune.train.runs import load_run_method, read_run

    if adapter is not None:
        from ctxtune.commands.adapters import open_adapter

        opened = open_adapter(adapter, base, index)
        return opened.method, opened.base, opened.placeholders
    assert run is not None
    register_run_tasks(run)
    record = read_run(run)
    if not 0 <= index < len(record.spec.streams):
        raise ConfigError(f"--index {index} out of range: the run has {len(record.spec.streams)} adapter(s)")
    source = record.base().source if record.spec.kind == "tune" else str(run)
    return load_run_method(run), source, record.spec.train.placeholders


def _default_examples(task: Any) -> int:
    """3200 examples, or every test example of a task with a finite test split once."""
    by_split = getattr(task, "by_split", None)
    return len(by_split["test"]) if by_split is not None else 3200


def already_finished(result: RunResult) -> dict[str, Any]:
    """A note for a --resume of a run that had already finished (its stored result is reported unchanged)."""
    return {"note": "the run had already finished; nothing was changed"} if result.cached else {}


def report(json_out: bool, payload: dict[str, Any]) -> None:
    if json_out:
        emit_json(payload)
        return
    from rich.console import Console

    console = Console()
    for key, value in payload.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        console.print(f"[bold]{key}[/bold]: {value}")
