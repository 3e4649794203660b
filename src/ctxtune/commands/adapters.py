"""What users bring to `check attention`, `eval` and `diagnose`: a trained adapter (`--adapter PATH`) and a task
file (`--task-file FILE`, see `ctxtune.tasks.user`).

PATH is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors: prefix tuning, prompt tuning,
LoRA) or a ctxtune run folder (a `tune` run: its adapter on its base; a `full` fine-tuning run). A PEFT
adapter needs its base model: `--model`/`--base`, else the adapter's own `base_model_name_or_path` when that
is a local Hugging Face folder. What the adapter is decides what can be said about it: its method's
`identity` fact ("holds": the Section 4 checks apply to it; "none": weights change, they do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctxtune.errors import ConfigError, not_found


@dataclass
class Adapter:
    """A trained adapter, attached to its own copy of its base model.

    Attributes:
        method: the ctxtune method with the trained state (its model: `method.model`).
        path: where it was read from; origin: "peft" or "run".
        base: the base model's source (a run folder, a Hugging Face folder, a .gguf file or "smollm2").
        description: one line for reports.
        task: the task a run trained on (None for PEFT adapters); placeholders: the run's (0 for PEFT).
    """

    method: Any
    path: str
    origin: str
    base: str
    description: str
    task: str | None = None
    placeholders: int = 0

    @property
    def identity(self) -> str:
        return self.method.identity

    @property
    def key(self) -> str:
        return self.method.key

    def load_base(self, dtype: torch.dtype) -> Any:
        """A fresh, unadapted copy of the base model (for weight controls and the per-head diagnosis)."""
        from ctxtune.train.runs import resolve_base

        return resolve_base(self.base).load().to(dtype).eval()


def open_adapter(path: str | Path, base: str | None = None, index: int = 0,
                 dtype: torch.dtype = torch.float32) -> Adapter:
    """The adapter at `path` (module docstring), attached to a copy of its base, in eval mode and `dtype`.

    Args:
        base: the base model of a PEFT adapter (a run folder records its own base: another one given is refused).
        index: which adapter of a run's bank.

    Raises:
        ConfigError: the path is neither a PEFT folder nor a ctxtune run folder, a run without an adapter, an
            unknown base, or an adapter index out of range.
    """
    from ctxtune.hf.adapters import is_peft_folder
    from ctxtune.train.runs import is_run_folder

    path = Path(path).expanduser()
    if is_peft_folder(path):
        return _open_peft(path, base, dtype)
    if is_run_folder(path):
        return _open_run(path, index, dtype, base)
    if not path.exists():
        raise ConfigError(not_found("--adapter", path))
    raise ConfigError(f"--adapter {path} is neither a PEFT adapter folder (adapter_config.json) nor a ctxtune run "
                      "folder (config.json of a run)")


def peft_base(path: Path, base: str | None) -> str:
    from ctxtune.hf.adapters import read_adapter_config

    if base:
        return base
    recorded = read_adapter_config(path).get("base_model_name_or_path")
    if isinstance(recorded, str) and recorded and Path(recorded).expanduser().is_dir():
        return recorded
    raise ConfigError(f"the PEFT adapter {path} needs its base model: pass it with --model/--base (the adapter "
                      f"records {recorded!r}, which is not a local folder)")


def _open_peft(path: Path, base: str | None, dtype: torch.dtype) -> Adapter:
    from ctxtune.hf.adapters import describe_peft, peft_adapter_method
    from ctxtune.train.runs import resolve_base

    source = peft_base(path, base)
    ref = resolve_base(source)
    if ref.kind != "hf":
        raise ConfigError(f"a PEFT adapter needs a Hugging Face base model, got the ctxtune run {source}")
    model = ref.load().to(dtype).eval()
    method = peft_adapter_method(model, path).to(dtype)
    return Adapter(method, str(path), "peft", ref.source, describe_peft(path))


def _open_run(path: Path, index: int, dtype: torch.dtype, given_base: str | None = None) -> Adapter:
    from ctxtune.tasks.user import register_run_tasks
    from ctxtune.train.runs import load_run_method, read_run

    register_run_tasks(path)
    record = read_run(path)
    n = len(record.spec.streams)
    if not 0 <= index < n:
        raise ConfigError(f"--index {index} out of range: {path} has {n} adapter(s)")
    if record.spec.kind == "pretrain":
        raise ConfigError(f"{path} is a pretraining run: it holds a model, not an adapter (pass it as --model/--base)")
    base = record.base().source
    if given_base is not None and not _same_model(given_base, base):
        raise ConfigError(f"{path} is a ctxtune run on its own base {base}; the base given with it ({given_base}) "
                          "is another model: leave it out, or give the run's base")
    method = load_run_method(path, adapter=index if record.saves == "adapter" else None).to(dtype)
    method.model.to(dtype).eval()
    stream = record.spec.streams[index]
    return Adapter(method, str(path), "run", base, f"ctxtune {record.spec.method} run (adapter {index}, task "
                   f"{stream.task})", stream.task, record.spec.train.placeholders)


def _same_model(given: str, recorded: str) -> bool:
    """Whether a model named on the command line is the base a run recorded (paths compared resolved)."""
    if given == recorded:
        return True
    mine, theirs = Path(given).expanduser(), Path(recorded).expanduser()
    return mine.exists() and theirs.exists() and mine.resolve() == theirs.resolve()


def file_task(path: str | Path, base_source: str) -> Any:
    """A JSONL task file tokenised by the base model's tokenizer (a Hugging Face model's), registered by its name."""
    from ctxtune.hf.text import encoders, model_tokenizer
    from ctxtune.tasks.user import text_task_from_file
    from ctxtune.train.runs import resolve_base

    if resolve_base(base_source).kind != "hf":
        raise ConfigError(f"--task-file needs a Hugging Face base model (its tokenizer); {base_source} is a ctxtune "
                          "run: give a task by name (--task)")
    return text_task_from_file(path, *encoders(model_tokenizer(base_source)), tokenizer=base_source)
