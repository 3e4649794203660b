"""Training configuration: frozen, validated, JSON-serialisable.

Defaults are the paper's adapter settings (official-code.md §4): AdamW, betas (0.9, 0.95), gradient
clipping 1.0, batch 64, constant learning rate. Pretraining uses weight decay 0.1 on matrices only
(`decay_matrices_only`), dropout as the model config says, and `train_mode=True`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ctxtune.configs import strict_from_dict
from ctxtune.errors import ConfigError
from ctxtune.limits import MAX_EVAL_EXAMPLES, MAX_SEED, MAX_STEPS, check_int64, is_finite_number

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Attributes:
    steps: optimiser steps.
    batch_size: examples per adapter per step.
    lr: peak learning rate.
    weight_decay: AdamW decoupled weight decay.
    betas: AdamW betas.
    grad_clip: max gradient norm per adapter (0 disables).
    warmup: linear warm-up steps.
    schedule: "constant" or "cosine" (after warm-up, decays to lr * min_lr_ratio).
    min_lr_ratio: final learning rate of the cosine schedule, as a fraction of lr.
    decay_matrices_only: apply weight decay only to tensors with 2+ dimensions (pretraining).
    train_mode: model in train mode (dropout active); adapters train with the model in eval mode.
    seed: seeds initialisation and data.
    placeholders: leading zero tokens before every input (the authors' layout; 0 = none).
    eval_examples: test examples for the final exact-match accuracy (paper: 3,200).
    eval_every: also evaluate every this many steps (0: only at the end).
    checkpoint_every: write a resumable checkpoint every this many steps (0: only at the end).
    log_every: append a metrics line every this many steps.
    precision: "fp32", or "bf16": the forward and loss under bfloat16 autocast with float32 master weights and
        optimiser state (opt-in where the CPU or GPU computes bfloat16 natively; evaluation stays float32).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    decay_matrices_only: bool = False
    train_mode: bool = False
    seed: int = 0
    placeholders: int = 0
    eval_examples: int = 3200
    eval_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    precision: str = "fp32"

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_rates()
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def _check_counts(self) -> None:
        """Integers: positive or non-negative, within int64, and the bounds of `ctxtune.limits`."""
        for name in ("steps", "batch_size", "eval_examples", "log_every"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("warmup", "eval_every", "checkpoint_every", "placeholders", "seed"):
            _check_int(name, getattr(self, name), low=0)
        _check_at_most("steps", self.steps, MAX_STEPS, "(a larger count is almost certainly a typo)")
        _check_at_most("warmup", self.warmup, MAX_STEPS, "(warm-up steps, bounded like steps)")
        _check_at_most("seed", self.seed, MAX_SEED, "(derived torch seeds must stay within 64 bits)")
        _check_at_most("eval_examples", self.eval_examples, MAX_EVAL_EXAMPLES, "(hours of decoding per evaluation)")

    def _check_rates(self) -> None:
        """Floats: finite and in range."""
        for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise ConfigError(f"train.{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr * self.weight_decay >= 1:
            raise ConfigError(
                f"train.lr * train.weight_decay must be below 1 (AdamW scales weights by 1 - lr * weight_decay"
                f" each step), got {self.lr} * {self.weight_decay}"
            )
        betas = self.betas
        pair = isinstance(betas, (tuple, list)) and len(betas) == 2
        if not (pair and all(is_finite_number(b) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {betas!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys and wrongly typed values by name."""
        return strict_from_dict(cls, data, "train")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step `step` (0-based)."""
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        import math

        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_int(name: str, value: object, low: int) -> None:
    """An int (not a bool) >= low that fits in 64 bits."""
    kind = "a positive integer" if low == 1 else "a non-negative integer"
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"train.{name} must be {kind}, got {value!r}")
    check_int64(value, f"train.{name}")


def _check_at_most(name: str, value: int, bound: int, reason: str) -> None:
    if value > bound:
        raise ConfigError(f"train.{name} must be at most {bound:,} {reason}, got {value:,}")
