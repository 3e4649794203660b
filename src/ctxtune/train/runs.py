"""Run folders: what a training run leaves on disk, and how to load it back.

<run>/config.json         {"kind": "pretrain"|"tune", "model": ModelConfig, "method": {...}, "train": TrainConfig,
                           "tasks": [...], "base": "<base run folder>" (tune only), "ctxtune_version"}
<run>/model.safetensors   full model weights (pretrain, and tune with method "full")
<run>/adapter.safetensors adapter tensors (tune with any other method)
<run>/metrics.jsonl       one JSON object per logged step
<run>/summary.json        final accuracies, losses, parameter counts, time
<run>/checkpoint.*        resumable state (adapter, optimiser, RNG)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctxtune.errors import CheckpointError, ConfigError
from ctxtune.io import atomic_write_json, load_json, load_tensors, save_tensors
from ctxtune.methods import Method, make_method
from ctxtune.methods.full import load_model_state, model_state
from ctxtune.model import GPT, ModelConfig


def save_model(run_dir: Path, model: GPT) -> None:
    save_tensors(run_dir / "model.safetensors", model_state(model))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    config = load_json(run_dir / "config.json")
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{run_dir / 'config.json'} is not a ctxtune run config (no 'model' entry)")
    return config


def load_base_model(run_dir: str | Path) -> GPT:
    """The model a run folder describes: its own weights, or its base run's weights."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"invalid model config in {run_dir / 'config.json'}: {exc}") from None
    model = GPT(cfg)
    weights = run_dir / "model.safetensors"
    if weights.is_file():
        load_model_state(model, load_tensors(weights))
    elif config.get("base"):
        base = load_base_model(resolve_base(run_dir, config["base"]))
        if base.cfg != cfg:
            raise CheckpointError(f"base run of {run_dir} has another model shape")
        model = base
    else:
        raise CheckpointError(f"no model.safetensors in {run_dir} and no base run recorded")
    model.eval()
    return model


def resolve_base(run_dir: Path, base: str) -> Path:
    path = Path(base)
    return path if path.is_absolute() else (run_dir / path).resolve() if (run_dir / path).exists() else path


def save_adapter(run_dir: Path, method: Method) -> None:
    save_tensors(run_dir / "adapter.safetensors", method.adapter_state())


def load_method(run_dir: str | Path, model: GPT) -> Method:
    """Attach the method a tune run trained to `model` and load its adapter state."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    spec = config.get("method")
    if not isinstance(spec, dict) or "key" not in spec:
        raise CheckpointError(f"{run_dir} is not a tune run (no method recorded)")
    method = make_method(spec["key"], model, n_adapters=int(spec.get("n_adapters", 1)), **spec.get("options", {}))
    name = "model.safetensors" if spec["key"] == "full" else "adapter.safetensors"
    try:
        method.load_adapter_state(load_tensors(run_dir / name))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return method


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(run_dir / "summary.json", summary)
