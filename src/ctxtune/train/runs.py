"""Run folders: what `ctxtune.train.run.run` leaves on disk, and how to read it back from anywhere.

<run>/config.json          {"schema": "ctxtune.run/1", "spec": RunSpec, "model": the model config,
                            "base": {"path": absolute, "relative": from this folder} or null,
                            "method": {"key", "options", "n_adapters"}, "ctxtune_version"}
<run>/model.safetensors    the whole model, for methods that save one (pretraining, full fine-tuning)
<run>/adapter.safetensors  the adapters, for every other method
<run>/metrics.jsonl        one JSON object per logged step
<run>/summary.json         the RunResult (`ctxtune.train.run`): accuracies per adapter, losses, counts, time
<run>/checkpoint.*         resumable state (adapters, optimiser, RNG)

A base is found from its relative path first (a results folder moved as a whole still reads) and its
absolute path second (a run read from another working directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxtune import __version__
from ctxtune.configs import check_keys
from ctxtune.errors import CheckpointError, ConfigError, not_found
from ctxtune.io import atomic_write_json, load_json, load_tensors, save_tensors
from ctxtune.model import GPT, ModelConfig
from ctxtune.train.spec import SCHEMA, RunSpec

CONFIG, SUMMARY = "config.json", "summary.json"
WEIGHTS = {"model": "model.safetensors", "adapter": "adapter.safetensors"}


@dataclass(frozen=True)
class RunRecord:
    """A run folder read back: its spec, model config and where its base is."""

    path: Path
    spec: RunSpec
    model_config: Any  # ModelConfig, or the Hugging Face base's config summary
    base_path: str | None
    base_relative: str | None

    @property
    def saves(self) -> str:
        from ctxtune.methods import get_method_class

        return get_method_class(self.spec.method).saves

    def base(self) -> BaseRef:
        """The base this run tuned (relative path first, then absolute)."""
        if self.spec.kind != "tune" or self.base_path is None:
            raise CheckpointError(f"{self.path} is a pretraining run: it has no base")
        candidates = [str((self.path.resolve() / self.base_relative).resolve())] if self.base_relative else []
        for candidate in [*candidates, self.base_path]:
            if Path(candidate).exists():
                return resolve_base(candidate)
        if not Path(self.base_path).is_absolute():  # a Hugging Face source such as "smollm2"
            return resolve_base(self.base_path)
        raise CheckpointError(f"the base of {self.path} is gone: neither {candidates[:1]} nor {self.base_path} exists")


@dataclass(frozen=True)
class BaseRef:
    """A base a tuning run can start from: a ctxtune run folder that saved a model, or a Hugging Face LM."""

    kind: str  # "run" or "hf"
    source: str  # absolute run folder, or the Hugging Face source ("smollm2", a folder, a .gguf file)
    model_config: Any

    def load(self) -> Any:
        """The model in eval mode: our GPT from the run folder, or the Hugging Face model wrapped for methods."""
        if self.kind == "run":
            return load_run_model(self.source)
        from ctxtune.hf.backbone import load_backbone

        return load_backbone(self.source)


# ----- reading ---------------------------------------------------------------------------------------------
def is_run_folder(path: str | Path) -> bool:
    """Whether `path` holds a ctxtune run (a config.json with the run schema)."""
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return False
    try:
        data = load_json(cfg)
    except CheckpointError:
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def read_run(run_dir: str | Path) -> RunRecord:
    """Read and validate a run folder's config.json."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise CheckpointError(not_found("run folder", path))
    data = load_json(path / CONFIG)
    where = str(path / CONFIG)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise CheckpointError(f"{where} is not a ctxtune run config (schema {SCHEMA!r} expected)")
    try:
        spec = RunSpec.from_dict(data.get("spec"), f"{where} spec")
        model = data.get("model")
        if not isinstance(model, dict):
            raise ConfigError("model must be a table")
        model_cfg = model if model.get("hf") else ModelConfig.from_dict(model)  # a Hugging Face base: as recorded
        check_keys(data, {"schema", "spec", "model", "base", "method", "ctxtune_version"}, where)
        base = data.get("base") or {}
        check_keys(base, {"path", "relative"}, "base")
        for key in ("path", "relative"):
            value = base.get(key)
            if value is not None and (not isinstance(value, str) or not value or "\x00" in value):
                raise ConfigError(f"base.{key} must be a path (a non-empty string without NUL bytes), got "
                                  f"{value!r:.80}")
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid run config {where}: {exc}") from None
    return RunRecord(path, spec, model_cfg, base.get("path"), base.get("relative"))


def resolve_base(source: str | Path | None) -> BaseRef:
    """What a tuning run's `base` names: a run folder that saved a model, or a Hugging Face model."""
    if source is None:
        raise ConfigError("no base given: pass a pretraining run folder or a Hugging Face model")
    path = Path(source).expanduser()
    if is_run_folder(path):
        record = read_run(path)
        if record.saves != "model":
            hint = f" (its base is {record.base_path})" if record.base_path else ""
            raise ConfigError(
                f"{path} is a {record.spec.method} run: it saved an adapter, not a model{hint}; tune needs a base "
                "that saved a model: a pretraining or full fine-tuning run, or a Hugging Face model"
            )
        if not (path / WEIGHTS["model"]).is_file():
            raise CheckpointError(f"{path} has no {WEIGHTS['model']}: the run did not finish")
        return BaseRef("run", str(record.path.resolve()), record.model_config)
    if not path.exists() and str(source) != "smollm2":
        raise ConfigError(f"base not found: {source} (expected a run folder, a Hugging Face folder, a .gguf file "
                          "or 'smollm2')")
    if path.is_dir() and (path / CONFIG).is_file() and not _is_hf_folder(path):
        raise ConfigError(f"{path} is neither a ctxtune run folder nor a Hugging Face model folder")
    if path.is_dir() and not (path / CONFIG).is_file():
        raise ConfigError(f"{path} has no config.json: not a run folder or a Hugging Face model folder")
    from ctxtune.hf.backbone import hf_base_config

    return BaseRef("hf", str(path.resolve()) if path.exists() else str(source), hf_base_config(str(source)))


def _is_hf_folder(path: Path) -> bool:
    data = load_json(path / CONFIG)
    return isinstance(data, dict) and "model_type" in data


def load_run_model(run_dir: str | Path) -> Any:
    """The model a run folder describes, in eval mode: its own weights, or its base's model."""
    record = read_run(run_dir)
    if record.saves != "model":
        return record.base().load()
    if not isinstance(record.model_config, ModelConfig):
        raise CheckpointError(f"{record.path} saved a fine-tuned Hugging Face model, which ctxtune cannot reload")
    from ctxtune.methods.full import load_model_state

    model = GPT(record.model_config)
    load_model_state(model, load_tensors(record.path / WEIGHTS["model"]))
    return model.eval()


def load_run_method(run_dir: str | Path, model: Any = None, adapter: int | None = None) -> Any:
    """The run's method attached to `model` (default: the run's own model) with its trained state.

    adapter: load only this adapter of the bank (a one-adapter method); None loads the whole bank.
    """
    from ctxtune.methods import make_method

    record = read_run(run_dir)
    n = len(record.spec.streams)
    if adapter is not None and not 0 <= adapter < n:
        raise ConfigError(f"adapter {adapter} out of range: {record.path} has {n} adapter(s)")
    model = load_run_model(run_dir) if model is None else model
    method = make_method(record.spec.method, model, n_adapters=1 if adapter is not None else n, **record.spec.options)
    if record.saves == "adapter":
        path = record.path / WEIGHTS["adapter"]
        state = load_tensors(path)
        if adapter is not None:
            state = {name: t[adapter : adapter + 1] for name, t in state.items()}  # [1, ...] of the bank's [K, ...]
        method.load_adapter_state(state)  # names the tensor and the file when it does not fit
    return method


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's summary.json when it is a finished run's result, else None."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        data = load_json(path)
    except CheckpointError:
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA and data.get("status") == "ok" else None


# ----- writing ---------------------------------------------------------------------------------------------
def write_config(out: Path, spec: RunSpec, model_config: Any, n_adapters: int) -> None:
    """config.json of a run; a folder holding another run's config is refused."""
    base = None
    if spec.base is not None:
        absolute = Path(spec.base).expanduser()
        if absolute.exists():
            absolute = absolute.resolve()
            base = {"path": str(absolute), "relative": os.path.relpath(absolute, out.resolve())}
        else:
            base = {"path": spec.base, "relative": None}
    config = {
        "schema": SCHEMA,
        "spec": spec.to_dict(),
        "model": model_config.to_dict() if hasattr(model_config, "to_dict") else model_config,
        "base": base,
        "method": {"key": spec.method, "options": spec.options, "n_adapters": n_adapters},
        "ctxtune_version": __version__,
    }
    existing = out / CONFIG
    if existing.is_file():
        old = read_run(out)
        if old.spec.fingerprint() != spec.fingerprint():
            raise ConfigError(f"{out} holds a run with another configuration; choose a new output folder")
    atomic_write_json(existing, config)


def save_weights(out: Path, method: Any) -> None:
    """model.safetensors or adapter.safetensors, as the method says it saves."""
    from ctxtune.methods.full import model_state

    if method.saves == "model":
        save_tensors(out / WEIGHTS["model"], model_state(method.model))
    else:
        save_tensors(out / WEIGHTS["adapter"], method.adapter_state())


def save_run(out: str | Path, spec: RunSpec, model_config: Any, method: Any) -> Path:
    """Write a run folder for a model or adapters made outside `train.run` (hand-built weights, imported or
    edited adapters): config.json and the weights the method saves, no training log. Returns the folder."""
    out = Path(out)
    write_config(out, spec, model_config, method.n_adapters)
    save_weights(out, method)
    return out
