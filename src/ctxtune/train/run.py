"""`run(spec, out)`: the only code that turns a RunSpec into a trained run folder.

1. Check the inputs (base readable, tasks fit the model) before anything is written.
2. Return the stored result when the folder holds this run, finished (a second call changes nothing).
3. Build the model (a fresh GPT, or the base) and attach the method with one adapter per stream.
4. Train (`Trainer`), resuming from the folder's checkpoint when `resume` and one exists.
5. Evaluate every adapter on its evaluation tasks (`spec.eval`), save the weights the method saves,
   write summary.json (the `RunResult`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctxtune.errors import ConfigError
from ctxtune.io import atomic_write_json
from ctxtune.train.spec import SCHEMA, RunSpec


@dataclass
class RunResult:
    """What a run produced (also its summary.json).

    Attributes:
        rows: one per adapter: {"row", "task", "seed", "index", "accuracy": {eval task: exact match}}.
        trainer_accuracy: the trainer's own final greedy check, per adapter (train.eval_examples examples).
        cached: True when the stored result of a finished run was returned.
    """

    kind: str
    method: str
    out_dir: str
    steps: int
    final_loss: list[float]
    rows: list[dict[str, Any]]
    trainer_accuracy: list[float]
    trainable_per_adapter: int
    trainable: int
    expected_trainable: int
    n_adapters: int
    config: dict[str, Any]
    train_seconds: float
    seconds: float
    device: str
    resumed: bool
    status: str = "ok"
    cached: bool = False
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("history")
        return {"schema": SCHEMA, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        keep = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**keep)

    def accuracy(self, row: int = 0) -> dict[str, float]:
        return dict(self.rows[row]["accuracy"])


def run(spec: RunSpec, out: str | Path, resume: bool = True, quiet: bool = True) -> RunResult:
    """Train `spec` into the folder `out` (see the module docstring)."""
    from ctxtune.io import run_lock
    from ctxtune.train.runs import read_summary

    out = Path(out)
    base = spec.check_inputs()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a folder")
    stored = read_summary(out)
    if stored is not None and _same_run(out, spec):
        return RunResult.from_dict({**stored, "cached": True})
    start = time.perf_counter()
    model, model_cfg, method = build(spec, base)  # bad options fail here, before anything is written
    trainer = make_trainer(spec, method, out, quiet)  # checks the memory the run needs; writes nothing
    with run_lock(out):
        stored = read_summary(out)  # another process may have finished it meanwhile
        if stored is not None and _same_run(out, spec):
            return RunResult.from_dict({**stored, "cached": True})
        return _train(spec, out, model, model_cfg, method, trainer, resume, start)


def _same_run(out: Path, spec: RunSpec) -> bool:
    from ctxtune.train.runs import read_run

    return read_run(out).spec.fingerprint() == spec.fingerprint()


def build(spec: RunSpec, base: Any) -> tuple[Any, Any, Any]:
    """(model, model config, method attached with one adapter per stream), on the spec's device."""
    import torch

    from ctxtune.methods import make_method

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = check_device(spec.device)
    if spec.train.precision == "bf16" and not bf16_supported(device):
        raise ConfigError(f"precision bf16 needs native bfloat16 on {device} (AVX512-BF16 or AMX on a CPU, "
                          "compute capability 8.0 or newer on a GPU); use fp32")
    if spec.kind == "pretrain":
        from ctxtune.model import GPT

        torch.manual_seed(spec.train.seed)
        model, model_cfg = GPT(spec.model), spec.model
    else:
        model, model_cfg = base.load(), base.model_config
    model.to(device)
    method = make_method(spec.method, model, n_adapters=len(spec.streams), **spec.options)
    method.to(device)
    return model, model_cfg, method


def make_trainer(spec: RunSpec, method: Any, out: Path, quiet: bool) -> Any:
    """The trainer of the run: one data stream per adapter, seeds from `stream_seeds`."""
    from ctxtune.tasks import get_task
    from ctxtune.train.seeds import stream_seeds
    from ctxtune.train.trainer import Stream, Trainer

    streams = [Stream(get_task(s.task), *stream_seeds(s.seed, s.index)) for s in spec.streams]
    return Trainer(method, streams, spec.train, out, quiet=quiet)


def _train(spec: RunSpec, out: Path, model: Any, model_cfg: Any, method: Any, trainer: Any, resume: bool,
           start: float) -> RunResult:
    from ctxtune.errors import RunAlreadyFinished
    from ctxtune.train.runs import save_weights, write_config

    write_config(out, spec, model_cfg, len(spec.streams))
    resumed = resume and trainer.checkpoint_path().is_file()
    try:
        result = trainer.run(resume=resumed)
    except RunAlreadyFinished as exc:  # killed after its final checkpoint: the method holds the trained state
        result = exc.result
    if spec.kind == "pretrain":  # the trained weights are the product: keep them, frozen
        for p in model.parameters():
            p.requires_grad_(False)
    model.eval()
    rows = evaluate_streams(method, spec, result.accuracy)
    method.to("cpu")
    model.to("cpu")
    save_weights(out, method)
    info = method.describe()
    res = RunResult(
        kind=spec.kind, method=spec.method, out_dir=str(out), steps=result.steps, final_loss=result.final_loss,
        rows=rows, trainer_accuracy=[float(a) for a in result.accuracy],
        trainable_per_adapter=info["trainable"] // len(spec.streams), trainable=info["trainable"],
        expected_trainable=info["expected_trainable"], n_adapters=len(spec.streams), config=info["config"],
        train_seconds=round(result.seconds, 3), seconds=round(time.perf_counter() - start, 3),
        device=spec.device, resumed=resumed, history=result.history,
    )
    atomic_write_json(out / "summary.json", res.to_dict())
    return res


def evaluate_streams(method: Any, spec: RunSpec, trainer_accuracy: list[float]) -> list[dict[str, Any]]:
    """Every adapter on its evaluation tasks (spec.eval); without an eval spec, the trainer's final check."""
    from ctxtune.tasks import get_task
    from ctxtune.train.evaluate import evaluate

    rows = []
    for k, s in enumerate(spec.streams):
        if spec.eval.examples:
            names = list(s.evaluated_on)
            accs = evaluate(method, [get_task(t) for t in names], spec.eval.examples, seed=s.seed,
                            placeholders=spec.train.placeholders, mode=spec.eval.mode, adapters=[k] * len(names))
            accuracy = dict(zip(names, accs, strict=True))
        else:
            accuracy = {s.task: float(trainer_accuracy[k])}
        rows.append({"row": s.row, "task": s.task, "seed": s.seed, "index": s.index, "accuracy": accuracy})
    return rows


def bf16_supported(device: Any) -> bool:
    """Whether `device` computes bfloat16 natively (autocast elsewhere would be slower, not faster)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def check_device(name: str) -> Any:
    """The torch device `name`; a device torch cannot use here is a ConfigError."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r} (--device): expected cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r} (--device): expected cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but CUDA is not available on this machine")
    return dev
