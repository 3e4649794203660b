"""The method-agnostic trainer.

It sees a `Method` only through `trainable_parameters()`, `forward()`, `init_adapter()` and the
adapter state. A run trains K adapters on K data streams (a bank; K = 1 for a single run): each
stream has its own task and seed, each step draws `batch_size` examples per stream, the loss is the
sum of the per-adapter mean losses, and gradients are clipped per adapter. Since AdamW is
elementwise, adapter k follows the same trajectory as a separate run on stream k (to float
tolerance; tested).

Checkpoints hold the adapter state, the optimiser state and every RNG state, written atomically;
`resume=True` continues a killed run to the bit-identical result of an uninterrupted one.
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

from ctxtune.errors import TrainingDiverged
from ctxtune.io import atomic_write_bytes, atomic_write_json, load_json, load_tensors, save_tensors
from ctxtune.methods.base import Method
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


@dataclass
class TrainResult:
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
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, betas=cfg.betas)
        self.generators = [torch.Generator().manual_seed(s.data_seed) for s in streams]
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.device = next(method.model.parameters()).device  # data is generated on CPU, moved here

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
        logits = self.method(tokens[:, :-1], ids, n_prompt=n_prompt)  # [K*batch, seq-1, d_vocab]
        target, m = tokens[:, 1:], mask[:, 1:].to(logits.dtype)
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [K*batch, seq-1]
        per_example = (ce * m).sum(1) / m.sum(1)
        return per_example.view(len(self.streams), -1).mean(1)  # [K]

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
            where = f"; the last good checkpoint is in {self.out_dir}" if self.out_dir else ""
            raise TrainingDiverged(f"loss became {values} at step {self.step}{where}")
        losses.sum().backward()
        self.clip_per_adapter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return values

    # ----- the loop ----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        start = time.perf_counter()
        if resume and self.checkpoint_path().is_file():
            self.load_checkpoint()
        else:
            for k, s in enumerate(self.streams):
                self.method.init_adapter(k, torch.Generator().manual_seed(s.init_seed))
            if self.out_dir is not None:
                atomic_write_bytes(self.out_dir / "metrics.jsonl", b"")
        self.method.model.train(cfg.train_mode)
        values: list[float] = []
        if not self.params:  # nothing to train (hard prompt, in-context examples): evaluate only
            with torch.no_grad():
                values = [float(v) for v in self.losses()]
            self.log({"step": 0, "loss": values, "note": "no trainable parameters: evaluation only"})
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
            self.save_checkpoint()
        return TrainResult(self.step, values, accuracy, time.perf_counter() - start, self.history)

    def evaluate(self, n: int) -> list[float]:
        tasks = [s.task for s in self.streams]
        return evaluate(self.method, tasks, n, seed=self.cfg.seed, placeholders=self.cfg.placeholders)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ----- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / "checkpoint.safetensors"

    def save_checkpoint(self) -> None:
        if self.out_dir is None:
            return
        tensors = {f"adapter/{k}": v for k, v in self.method.adapter_state().items()}
        for i, p in enumerate(self.params):
            state = self.optimizer.state.get(p, {})
            for name in ("exp_avg", "exp_avg_sq", "step"):
                if name in state:
                    tensors[f"optim/{i}/{name}"] = torch.as_tensor(state[name])
        for k, g in enumerate(self.generators):
            tensors[f"rng/data/{k}"] = g.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        save_tensors(self.checkpoint_path(), tensors)
        atomic_write_json(self.out_dir / "checkpoint.json", {"step": self.step})

    def load_checkpoint(self) -> None:
        assert self.out_dir is not None
        tensors = load_tensors(self.checkpoint_path())
        meta = load_json(self.out_dir / "checkpoint.json")
        adapter = {k[len("adapter/") :]: v for k, v in tensors.items() if k.startswith("adapter/")}
        self.method.load_adapter_state(adapter)
        for i, p in enumerate(self.params):
            if f"optim/{i}/step" in tensors:
                self.optimizer.state[p] = {
                    "step": tensors[f"optim/{i}/step"],
                    "exp_avg": tensors[f"optim/{i}/exp_avg"],
                    "exp_avg_sq": tensors[f"optim/{i}/exp_avg_sq"],
                }
        for k, g in enumerate(self.generators):
            g.set_state(tensors[f"rng/data/{k}"])
        torch.set_rng_state(tensors["rng/torch"])
        self.step = int(meta["step"])
        self.truncate_metrics(self.step)

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint, so a resumed log equals an uninterrupted one."""
        path = self.out_dir / "metrics.jsonl" if self.out_dir else None
        if path is None or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if record.get("step", 0) <= step and not record.get("final"):
                kept.append(record)
        self.history = kept
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


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
