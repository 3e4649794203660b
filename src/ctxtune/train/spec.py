"""One training run as data: `RunSpec`. `ctxtune.train.run.run(spec, out)` turns it into a run folder.

Every way of training something builds RunSpecs: `ctxtune pretrain` and `ctxtune tune`, the study specs of
`ctxtune reproduce`, sweeps and `ctxtune diagnose`. A spec is validated when it is built (method, options,
tasks, numbers); `check_inputs()` also reads the base it names and checks that every task fits the model,
so a bad spec fails before anything is written.

    kind      "pretrain" (a fresh model, every weight trained) or "tune" (a method on a frozen base)
    method    a method key ("full" for pretraining); options: that method's options
    model     the architecture (pretrain only)
    base      the base to tune (tune only): a run folder whose method saved a model (a pretraining or full
              fine-tuning run), or a Hugging Face causal LM (a folder, a .gguf file, or "smollm2")
    streams   one per adapter: training task, seed, index within the seed, evaluation tasks, report label
    train     TrainConfig
    eval      evaluation after training (EvalSpec)
    device    torch device; threads: torch threads for this run (0: leave as is)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctxtune.configs import check_keys
from ctxtune.errors import ConfigError
from ctxtune.model import ModelConfig
from ctxtune.train.config import TrainConfig

KINDS = ("pretrain", "tune")
EVAL_MODES = ("greedy", "teacher")
SCHEMA = "ctxtune.run/1"


def _int(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class StreamSpec:
    """One adapter of a run.

    Attributes:
        task: training task.
        seed: the run seed this adapter belongs to (seeds may be stacked as adapters of one bank).
        index: the adapter's index among those of its seed; data and initialisation seeds derive from
            (seed, index) through `ctxtune.train.seeds.stream_seeds`.
        eval_tasks: tasks evaluated after training (empty: the training task).
        row: the adapter's label in reports (free text, e.g. "prefix.descending").
    """

    task: str
    seed: int = 0
    index: int = 0
    eval_tasks: tuple[str, ...] = ()
    row: str = ""

    def __post_init__(self) -> None:
        from ctxtune.tasks import get_task

        if not isinstance(self.task, str):
            raise ConfigError(f"stream task must be a task name, got {self.task!r}")
        get_task(self.task)
        _int(self.seed, "stream seed")
        _int(self.index, "stream index")
        object.__setattr__(self, "eval_tasks", tuple(self.eval_tasks))
        for t in self.eval_tasks:
            if not isinstance(t, str):
                raise ConfigError(f"evaluation tasks must be task names, got {t!r}")
            get_task(t)
        if not isinstance(self.row, str):
            raise ConfigError(f"stream row must be a string, got {self.row!r}")

    @property
    def evaluated_on(self) -> tuple[str, ...]:
        return self.eval_tasks or (self.task,)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, "index": self.index, "eval_tasks": list(self.eval_tasks),
                "row": self.row}

    @classmethod
    def from_dict(cls, data: Any, where: str = "stream") -> StreamSpec:
        check_keys(data, {"task", "seed", "index", "eval_tasks", "row"}, where, {"task"})
        eval_tasks = data.get("eval_tasks", [])
        if not isinstance(eval_tasks, (list, tuple)):
            raise ConfigError(f"{where}.eval_tasks must be a list of task names, got {eval_tasks!r}")
        return cls(data["task"], data.get("seed", 0), data.get("index", 0), tuple(eval_tasks), data.get("row", ""))


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation after training.

    Attributes:
        examples: fresh test examples per (adapter, evaluation task); 0 keeps only the trainer's own final
            check (greedy, `train.eval_examples` examples of each adapter's training task).
        mode: "greedy" (decode with the KV cache) or "teacher" (one forward pass; the same verdict).
    """

    examples: int = 0
    mode: str = "teacher"

    def __post_init__(self) -> None:
        _int(self.examples, "eval.examples")
        if self.mode not in EVAL_MODES:
            raise ConfigError(f"eval.mode must be one of {', '.join(EVAL_MODES)}, got {self.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "mode": self.mode}


@dataclass(frozen=True)
class RunSpec:
    """One training run (module docstring). Options are completed by the method (`resolve_options`) and
    validated against its config when the spec is built."""

    kind: str
    method: str
    streams: tuple[StreamSpec, ...]
    train: TrainConfig
    options: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig | None = None
    base: str | None = None
    eval: EvalSpec = field(default_factory=EvalSpec)
    device: str = "cpu"
    threads: int = 0

    def __post_init__(self) -> None:
        from ctxtune.methods import get_method_class
        from ctxtune.tasks import get_task

        if self.kind not in KINDS:
            raise ConfigError(f"run kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.train, TrainConfig):
            raise ConfigError("train must be a TrainConfig")
        streams = tuple(self.streams)
        object.__setattr__(self, "streams", streams)
        if not streams or not all(isinstance(s, StreamSpec) for s in streams):
            raise ConfigError("a run needs at least one stream (one adapter and its task)")
        keys = [(s.seed, s.index) for s in streams]
        if len(set(keys)) != len(keys):
            raise ConfigError("two adapters of one run share a (seed, index): they would train identically")
        cls = get_method_class(self.method)
        if len(streams) > 1 and not cls.supports_bank:
            raise ConfigError(f"method {self.method!r} trains one adapter per run; give one task")
        if self.kind == "pretrain":
            if cls.saves != "model" or not isinstance(self.model, ModelConfig) or self.base is not None:
                raise ConfigError("a pretraining run needs a model config, a method that trains every weight "
                                  "(full) and no base")
        elif self.base is None or not isinstance(self.base, str) or self.model is not None:
            raise ConfigError("a tuning run needs a base (a run folder or a Hugging Face model) and no model config")
        options = self.options if isinstance(self.options, dict) else None
        if options is None:
            raise ConfigError(f"method options must be a table, got {self.options!r}")
        tasks = [get_task(s.task) for s in streams]
        resolved = cls.resolve_options(options, tasks, self.train.seed)
        object.__setattr__(self, "options", cls.config_cls.from_dict(resolved, method=self.method).to_dict())
        if not isinstance(self.eval, EvalSpec):
            raise ConfigError("eval must be an EvalSpec")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"device must be a torch device name, got {self.device!r}")
        _int(self.threads, "threads")

    # ----- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {
            "kind": self.kind, "method": self.method, "options": self.options,
            "streams": [s.to_dict() for s in self.streams], "train": self.train.to_dict(),
            "model": self.model.to_dict() if self.model is not None else None, "base": self.base,
            "eval": self.eval.to_dict(), "device": self.device, "threads": self.threads,
        }
        return json.loads(json.dumps(data))  # tuples become lists, as stored

    @classmethod
    def from_dict(cls, data: Any, where: str = "run spec") -> RunSpec:
        """Build from a mapping (a job, a run folder's config.json), strictly: unknown keys are errors."""
        keys = {"kind", "method", "options", "streams", "train", "model", "base", "eval", "device", "threads"}
        check_keys(data, keys, where, {"kind", "method", "streams", "train"})
        streams = data["streams"]
        if not isinstance(streams, list):
            raise ConfigError(f"{where}.streams must be a list of streams")
        model = data.get("model")
        return cls(
            kind=data["kind"], method=data["method"],
            streams=tuple(StreamSpec.from_dict(s, f"{where}.streams[{i}]") for i, s in enumerate(streams)),
            train=TrainConfig.from_dict(data["train"]),
            options=dict(data.get("options") or {}),
            model=ModelConfig.from_dict(model) if model is not None else None,
            base=data.get("base"),
            eval=EvalSpec(**check_keys(data.get("eval") or {}, {"examples", "mode"}, f"{where}.eval")),
            device=data.get("device", "cpu"), threads=data.get("threads", 0),
        )

    def fingerprint(self, base_identity: str | None = None) -> str:
        """sha256 of what determines the result: device and threads excluded, and the base named by what it
        is, not where it lies (`base_identity`; default: read from the base, see `base_identity`), so a
        moved results folder still finds its finished runs."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("device", "threads")}
        if self.base is not None:
            data["base"] = base_identity if base_identity is not None else base_identity_of(self.base)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    # ----- what the run reads --------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return [s.task for s in self.streams]

    def check_inputs(self) -> Any:
        """Read the base (without loading weights) and check every task fits; returns the base reference.

        Raises ConfigError / CheckpointError naming the problem; nothing is written.
        """
        from ctxtune.train.runs import resolve_base

        base = resolve_base(self.base) if self.kind == "tune" else None
        model_cfg = self.model if base is None else base.model_config
        check_fits(self, model_cfg)
        return base


def base_identity_of(base: str) -> str:
    """What a base is: "run:<its spec's fingerprint>" for a ctxtune run folder, else "hf:<source>"."""
    from ctxtune.train.runs import is_run_folder, read_run

    if is_run_folder(base):
        return "run:" + read_run(base).spec.fingerprint()
    return f"hf:{base}"


def positions_added(spec: RunSpec) -> int:
    """Positions the run's method adds to every sequence (asked from the method's own definition)."""
    from ctxtune.methods import get_method_class

    cls = get_method_class(spec.method)
    return cls.positions_added(cls.config_cls.from_dict(spec.options, method=spec.method))


def check_fits(spec: RunSpec, model_cfg: Any) -> None:
    """Reject tasks whose vocabulary or length the model cannot hold, naming the numbers."""
    from ctxtune.tasks import get_task

    extra = positions_added(spec)
    for name in {t for s in spec.streams for t in (s.task, *s.evaluated_on)}:
        task = get_task(name)
        if task.d_vocab > model_cfg.d_vocab:
            raise ConfigError(f"task {name!r} needs d_vocab >= {task.d_vocab}, the model has {model_cfg.d_vocab}")
        seq = spec.train.placeholders + task.n_input + task.n_output + extra
        if model_cfg.pos == "learned" and seq > model_cfg.n_ctx:
            raise ConfigError(
                f"task {name!r} needs {seq} positions (with placeholders and positions the method adds), "
                f"the model has n_ctx={model_cfg.n_ctx}"
            )


def read_spec_file(path: str | Path) -> RunSpec:
    """A RunSpec from a JSON file (a job file)."""
    from ctxtune.io import load_json

    return RunSpec.from_dict(load_json(path), str(path))
