"""The method-agnostic trainer.

It sees a `Method` only through `trainable_parameters()`, `forward()`, `init_adapter()` and the
adapter state. A run trains K adapters on K data streams (a bank; K = 1 for a single run): each
stream has its own task and seed, each step draws `batch_size` examples per stream, the loss is the
sum of the per-adapter mean losses, and gradients are clipped per adapter. Since AdamW is
elementwise, adapter k follows the same trajectory as a separate run on stream k (to float
tolerance; tested).

Checkpoints hold the adapter state, the optimiser state and every RNG state, with the step and
the last losses in the same file's metadata: one safetensors file written atomically, so a kill at any
moment leaves either the previous checkpoint or the new one, never a torn pair. `resume=True`
validates the checkpoint completely, then continues a killed run to the bit-identical result of an
uninterrupted one; resuming a finished run changes nothing and raises `RunAlreadyFinished`. While it
runs, the trainer holds `ctxtune.io.run_lock` on its folder, so a second writer is refused at once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ctxtune.errors import CheckpointError, RunAlreadyFinished, TrainingDiverged
from ctxtune.io import (
    TensorFile,
    atomic_write_bytes,
    load_tensors,
    remove_stale_temp_files,
    run_lock,
    save_tensors,
)
from ctxtune.limits import EVAL_BATCH, check_memory, training_bytes
from ctxtune.methods.base import Method
from ctxtune.methods.prefix import PrefixBase
from ctxtune.tasks import Task
from ctxtune.train.config import TrainConfig
from ctxtune.train.evaluate import evaluate
from ctxtune.train.seeds import stream_seeds


@dataclass(frozen=True)
class Stream:
    """One adapter's data: its task and the seeds of its data and initialisation."""

    task: Task
    data_seed: int
    init_seed: int


def make_streams(tasks: list[Task], seed: int) -> list[Stream]:
    """Streams for a bank whose adapter k trains on tasks[k]; seeds derive from (seed, k)."""
    return [Stream(t, *stream_seeds(seed, k)) for k, t in enumerate(tasks)]


CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "ctxtune-checkpoint-2"  # metadata "format" of a checkpoint this trainer can resume
LEGACY_SIDECAR = "checkpoint.json"  # where ctxtune <= 0.1 kept the step, apart from the tensors


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint's metadata records besides its tensors.

    Attributes:
        step: optimiser steps done.
        finished: the run completed (final evaluation done); `accuracy` is then set.
        loss: the per-adapter losses of the last step ([] before the first step).
        optim: indices of the trainable parameters that have AdamW state.
        accuracy: final per-adapter accuracies (finished runs only).
    """

    step: int
    finished: bool
    loss: list[float]
    optim: list[int]
    accuracy: list[float] | None = None

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": str(self.step),
            "finished": "true" if self.finished else "false",
            "loss": json.dumps(self.loss),
            "optim": json.dumps(self.optim),
        }
        if self.accuracy is not None:
            meta["accuracy"] = json.dumps(self.accuracy)
        return meta


@dataclass
class TrainResult:
    """What a run produced: steps done, the last step's per-adapter losses, the final accuracies."""

    steps: int
    final_loss: list[float]
    accuracy: list[float]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains `method` (with `method.n_adapters` == len(streams)) under `cfg`.

    Args:
        method: the attached method; its model supplies the frozen base.
        streams: one data stream per adapter.
        cfg: training configuration.
        out_dir: run folder for metrics.jsonl and checkpoints (None: nothing is written).
        quiet: no progress bar.
        callbacks: functions called as fn(trainer, step, losses) after every step.
    """

    def __init__(
        self,
        method: Method,
        streams: list[Stream],
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        quiet: bool = False,
        callbacks: list[Callable[[Trainer, int, list[float]], None]] | None = None,
    ) -> None:
        if len(streams) != method.n_adapters:
            raise ValueError(f"{len(streams)} streams for a bank of {method.n_adapters} adapters")
        self.method, self.streams, self.cfg = method, streams, cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.quiet = quiet
        self.callbacks = callbacks or []
        self.params = method.trainable_parameters()
        self.device = next(method.model.parameters()).device  # data is generated on CPU, moved here
        self.check_memory()
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, betas=cfg.betas)
        self.generators = [torch.Generator().manual_seed(s.data_seed) for s in streams]
        self.step = 0
        self.last_loss: list[float] = []
        self.checkpoint_step: int | None = None  # step of the last checkpoint written or loaded
        self.history: list[dict[str, Any]] = []

    def check_memory(self) -> None:
        """Refuse a run whose weights, optimiser state, activations or evaluation cache cannot fit.

        Writes nothing; raises ConfigError naming the estimate and the machine's memory.
        """
        cfg, method = self.cfg, self.method
        n_virtual = int(getattr(method.config, "n_virtual", 0))
        prefix_keys = n_virtual if isinstance(method, PrefixBase) else 0
        spliced = 0 if prefix_keys else n_virtual + len(getattr(method.config, "tokens", ()))
        longest = max(s.task.n_input + s.task.n_output for s in self.streams)
        positions = cfg.placeholders + longest + spliced
        rows = len(self.streams) * cfg.batch_size
        first = next(method.model.parameters())
        need, detail = training_bytes(
            method.model.cfg,
            n_trainable=sum(p.numel() for p in self.params),
            trains_model=method.saves == "model",
            rows=rows,
            positions=positions,
            prefix_keys=prefix_keys,
            eval_rows=min(EVAL_BATCH, cfg.eval_examples),
            element_size=first.element_size(),
        )
        what = f"training {method.key} (batch {cfg.batch_size} x {len(self.streams)} adapters)"
        check_memory(need, what, detail, limit=device_memory(self.device))

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.cfg.decay_matrices_only:
            return [{"params": self.params, "weight_decay": self.cfg.weight_decay}]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        return [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ----- one step ----------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        cfg, K = self.cfg, len(self.streams)
        batches = [
            s.task.make_batch(
                cfg.batch_size, g, "train", placeholders=cfg.placeholders, start_index=self.step * cfg.batch_size
            )
            for s, g in zip(self.streams, self.generators, strict=True)
        ]
        device = self.device
        tokens = torch.cat([b.tokens for b in batches]).to(device)  # [K * batch, seq]
        mask = torch.cat([b.loss_mask for b in batches]).to(device)
        ids = torch.arange(K, device=device).repeat_interleave(cfg.batch_size) if K > 1 else None
        return tokens, mask, ids, batches[0].n_prompt

    def losses(self) -> torch.Tensor:
        """Per-adapter mean cross-entropy over output positions: [K]."""
        tokens, mask, ids, n_prompt = self.next_batch()
        with self.autocast():
            logits = self.method(tokens[:, :-1], ids, n_prompt=n_prompt)  # [K*batch, seq-1, d_vocab]
        logits = logits.float()  # the loss in float32 whatever the forward's precision
        target, m = tokens[:, 1:], mask[:, 1:].to(logits.dtype)
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [K*batch, seq-1]
        per_example = (ce * m).sum(1) / m.sum(1)
        return per_example.view(len(self.streams), -1).mean(1)  # [K]

    def autocast(self) -> Any:
        """bfloat16 autocast for the forward pass when `precision` is "bf16" (float32 master weights)."""
        from contextlib import nullcontext

        if self.cfg.precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def clip_per_adapter(self) -> None:
        """Clip the gradient of each adapter to norm grad_clip (torch's formula, per adapter)."""
        K, clip = len(self.streams), self.cfg.grad_clip
        grads = [p.grad for p in self.params if p.grad is not None]
        if clip <= 0 or not grads:
            return
        if K == 1:
            sq = sum(g.double().pow(2).sum() for g in grads)
            coef = torch.clamp(clip / (torch.sqrt(sq) + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
            return
        sq = sum(g.double().reshape(K, -1).pow(2).sum(1) for g in grads)  # [K]
        coef = torch.clamp(clip / (torch.sqrt(sq) + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype).view(K, *([1] * (g.dim() - 1))))

    def train_step(self) -> list[float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr_at(self.step)
        losses = self.losses()
        values = [float(v) for v in losses.detach()]
        if not all(math.isfinite(v) for v in values):
            raise TrainingDiverged(f"loss became {values} at step {self.step}{self.checkpoint_note()}")
        losses.sum().backward()
        self.clip_per_adapter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_loss = values
        return values

    def checkpoint_note(self) -> str:
        """Where a diverged run can be resumed from: true whether or not a checkpoint exists."""
        if self.out_dir is None:
            return ""
        if self.checkpoint_step is None:
            return f"; no checkpoint was written, so there is nothing to resume in {self.out_dir}"
        return f"; the last good checkpoint (step {self.checkpoint_step}) is {self.checkpoint_path()}"

    # ----- the loop ----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        """Train (or, with `resume`, continue from the folder's checkpoint) and evaluate.

        With an output folder the whole run holds `run_lock` on it.

        Raises:
            RunLocked: another process or thread is writing the folder.
            CheckpointError: `resume` found a checkpoint that is invalid (nothing is changed).
            RunAlreadyFinished: `resume` found the final checkpoint of a finished run (nothing is
                changed; the exception carries the result and the method holds the trained state).
            TrainingDiverged: the loss became NaN or infinite.
        """
        if self.out_dir is None:
            return self.train(resume=False)
        with run_lock(self.out_dir):
            remove_stale_temp_files(self.checkpoint_path())
            remove_stale_temp_files(self.metrics_path())
            return self.train(resume)

    def train(self, resume: bool) -> TrainResult:
        cfg = self.cfg
        start = time.perf_counter()
        if resume and self.checkpoint_path().exists():
            self.resume_from_checkpoint()
        else:
            self.start_fresh()
        self.method.model.train(cfg.train_mode)
        if not self.params:  # nothing to train (hard prompt, in-context examples): evaluate only
            with torch.no_grad():
                self.last_loss = [float(v) for v in self.losses()]
            self.log({"step": 0, "loss": self.last_loss, "note": "no trainable parameters: evaluation only"})
        with progress_bar(cfg.steps, self.step, quiet=self.quiet or not self.params) as advance:
            while self.params and self.step < cfg.steps:
                values = self.train_step()
                for cb in self.callbacks:
                    cb(self, self.step, values)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.log({"step": self.step, "loss": values, "lr": cfg.lr_at(self.step - 1)})
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.log({"step": self.step, "eval_accuracy": self.evaluate(min(cfg.eval_examples, 800))})
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                advance(self.step, values)
        self.method.model.eval()
        accuracy = self.evaluate(cfg.eval_examples)
        self.log({"step": self.step, "eval_accuracy": accuracy, "final": True})
        if self.out_dir is not None:
            self.save_checkpoint(accuracy=accuracy)
        return TrainResult(self.step, self.last_loss, accuracy, time.perf_counter() - start, self.history)

    def start_fresh(self) -> None:
        """Initialise every adapter; in a folder, drop any earlier checkpoint and start an empty log."""
        for k, s in enumerate(self.streams):
            self.method.init_adapter(k, torch.Generator().manual_seed(s.init_seed))
        if self.out_dir is not None:
            self.checkpoint_path().unlink(missing_ok=True)
            (self.out_dir / LEGACY_SIDECAR).unlink(missing_ok=True)
            atomic_write_bytes(self.metrics_path(), b"")

    def resume_from_checkpoint(self) -> None:
        """Load the validated checkpoint; a finished run raises RunAlreadyFinished before any write."""
        meta = self.load_checkpoint()
        if meta.finished:
            self.history = read_metrics(self.metrics_path())
            result = TrainResult(meta.step, meta.loss, meta.accuracy or [], 0.0, self.history)
            raise RunAlreadyFinished(
                f"the run in {self.out_dir} already finished ({meta.step} of {self.cfg.steps} steps); "
                "nothing was changed",
                folder=self.out_dir,
                result=result,
            )
        self.truncate_metrics(meta.step)

    def evaluate(self, n: int) -> list[float]:
        tasks = [s.task for s in self.streams]
        return evaluate(self.method, tasks, n, seed=self.cfg.seed, placeholders=self.cfg.placeholders)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is not None:
            with open(self.metrics_path(), "a") as f:
                f.write(json.dumps(record) + "\n")

    # ----- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / CHECKPOINT_NAME

    def metrics_path(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / "metrics.jsonl"

    def save_checkpoint(self, accuracy: list[float] | None = None) -> None:
        """Write adapter, optimiser and RNG state with the step in one atomic safetensors file.

        `accuracy` (the final evaluation) marks the checkpoint as the finished run's.
        """
        if self.out_dir is None:
            return
        tensors = {f"adapter/{k}": v for k, v in self.method.adapter_state().items()}
        with_state = []
        for i, p in enumerate(self.params):
            state = self.optimizer.state.get(p, {})
            if all(name in state for name in OPTIM_KEYS):
                with_state.append(i)
                for name in OPTIM_KEYS:
                    tensors[f"optim/{i}/{name}"] = torch.as_tensor(state[name])
        for k, g in enumerate(self.generators):
            tensors[f"rng/data/{k}"] = g.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        meta = CheckpointMeta(self.step, accuracy is not None, self.last_loss, with_state, accuracy)
        save_tensors(self.checkpoint_path(), tensors, meta.to_metadata())
        self.checkpoint_step = self.step

    def read_checkpoint(self) -> tuple[TensorFile, CheckpointMeta]:
        """The checkpoint's tensors and metadata, validated against this run (all but the adapter
        tensors, which `Method.load_adapter_state` checks). Raises CheckpointError naming the file."""
        path = self.checkpoint_path()
        tensors = load_tensors(path)
        no_steps = self.cfg.steps if self.params else 0
        meta = parse_checkpoint_meta(tensors.metadata, path, no_steps, len(self.streams), len(self.params))
        check_checkpoint_tensors(tensors, meta, path, self.params, len(self.streams))
        return tensors, meta

    def load_checkpoint(self) -> CheckpointMeta:
        """Restore adapter, optimiser and RNG state from a validated checkpoint; returns its metadata."""
        tensors, meta = self.read_checkpoint()
        adapter = {k[len("adapter/") :]: v for k, v in tensors.items() if k.startswith("adapter/")}
        self.method.load_adapter_state(adapter, source=self.checkpoint_path())
        for i in meta.optim:
            self.optimizer.state[self.params[i]] = {name: tensors[f"optim/{i}/{name}"] for name in OPTIM_KEYS}
        for k, g in enumerate(self.generators):
            g.set_state(tensors[f"rng/data/{k}"])
        torch.set_rng_state(tensors["rng/torch"])
        self.step, self.last_loss, self.checkpoint_step = meta.step, meta.loss, meta.step
        return meta

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint, so a resumed log equals an uninterrupted one.

        Called only with the step of a validated checkpoint.
        """
        path = self.metrics_path()
        if not path.is_file():
            return
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step and not r.get("final")]
        self.history = kept
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


OPTIM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def device_memory(device: torch.device) -> int | None:
    """Memory of an accelerator (None for the CPU: the machine's physical memory applies)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a line cut by a kill (or not a JSON object) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def parse_checkpoint_meta(
    meta: dict[str, str], path: Path, max_step: int, n_streams: int, n_params: int
) -> CheckpointMeta:
    """Validate a checkpoint's metadata against the run that reads it.

    Args:
        meta: the safetensors metadata.
        path: the checkpoint, for messages.
        max_step: the run's step count (0 for methods without trainable parameters).
        n_streams: adapters of the run (length of the loss and accuracy lists).
        n_params: trainable tensors of the run (range of the optimiser indices).
    """

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"invalid checkpoint {path}: {what}")

    if meta.get("format") != CHECKPOINT_FORMAT:
        if "format" not in meta and (path.parent / LEGACY_SIDECAR).exists():
            raise bad(f"written by an older ctxtune (step kept in {LEGACY_SIDECAR}), it cannot be resumed safely")
        raise bad(f"metadata format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    text = meta.get("step", "")
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        raise bad(f"step {text!r} is not a non-negative integer")
    step = int(text)
    if step > max_step:
        raise bad(f"step {step} is beyond the run's {max_step} steps")
    if meta.get("finished") not in ("true", "false"):
        raise bad(f"finished must be 'true' or 'false', got {meta.get('finished')!r}")
    finished = meta["finished"] == "true"
    if finished and step != max_step:
        raise bad(f"marked finished at step {step} of {max_step}")
    loss = _json_list(meta.get("loss"), "loss", bad)
    if len(loss) not in ({0, n_streams} if step == 0 else {n_streams}) or not all(_finite(v) for v in loss):
        raise bad(f"loss must be {n_streams} finite numbers, got {meta.get('loss')!r}")
    optim = _json_list(meta.get("optim"), "optim", bad)
    if not all(isinstance(i, int) and 0 <= i < n_params for i in optim) or len(set(optim)) != len(optim):
        raise bad(f"optim must list distinct parameter indices below {n_params}, got {meta.get('optim')!r}")
    accuracy = None
    if finished:
        accuracy = _json_list(meta.get("accuracy"), "accuracy", bad)
        if len(accuracy) != n_streams or not all(_finite(a) and 0 <= a <= 1 for a in accuracy):
            raise bad(f"accuracy must be {n_streams} numbers in [0, 1], got {meta.get('accuracy')!r}")
    return CheckpointMeta(step, finished, [float(v) for v in loss], sorted(optim), accuracy)


def _json_list(text: str | None, name: str, bad: Callable[[str], CheckpointError]) -> list[Any]:
    try:
        value = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list):
        raise bad(f"{name} must be a JSON list, got {text!r}")
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_checkpoint_tensors(
    tensors: dict[str, torch.Tensor], meta: CheckpointMeta, path: Path, params: list[torch.Tensor], n_streams: int
) -> None:
    """Every optimiser and RNG tensor the metadata implies is present with the right dtype and shape,
    and nothing else is there besides the adapter tensors."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"invalid checkpoint {path}: {what}")

    expected = {f"optim/{i}/{name}" for i in meta.optim for name in OPTIM_KEYS}
    expected |= {f"rng/data/{k}" for k in range(n_streams)} | {"rng/torch"}
    present = {k for k in tensors if not k.startswith("adapter/")}
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        raise bad(f"missing tensors {missing[:4]}, unexpected tensors {extra[:4]}")
    rng_size = torch.get_rng_state().numel()
    for name in [f"rng/data/{k}" for k in range(n_streams)] + ["rng/torch"]:
        t = tensors[name]
        if t.dtype != torch.uint8 or t.shape != (rng_size,):
            raise bad(f"{name} must be {rng_size} uint8 values (an RNG state), got {t.dtype} {list(t.shape)}")
    for i in meta.optim:
        for name in ("exp_avg", "exp_avg_sq"):
            t = tensors[f"optim/{i}/{name}"]
            if t.shape != params[i].shape or not t.is_floating_point():
                raise bad(f"optim/{i}/{name} has {t.dtype} {list(t.shape)}, expected {list(params[i].shape)} floats")
        count = tensors[f"optim/{i}/step"]
        if count.dim() != 0 or not count.is_floating_point() or not 0 < float(count) <= meta.step:
            raise bad(f"optim/{i}/step must be a count in [1, {meta.step}], got {count.tolist()}")


class progress_bar:
    """A rich progress bar on stderr when it is a terminal and not quiet; otherwise nothing."""

    def __init__(self, total: int, done: int, quiet: bool) -> None:
        self.total, self.done = total, done
        self.enabled = not quiet and sys.stderr.isatty()
        self.progress: Any = None

    def __enter__(self) -> Callable[[int, list[float]], None]:
        if not self.enabled:
            return lambda step, losses: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.progress.start()
        task = self.progress.add_task("train", total=self.total, completed=self.done, loss="-")

        def advance(step: int, losses: list[float]) -> None:
            mean = sum(losses) / max(1, len(losses))
            self.progress.update(task, completed=step, loss=f"{mean:.4f}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
