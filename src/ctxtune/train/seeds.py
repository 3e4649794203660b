"""Every seed a run derives, in one place.

A run has a seed s (`TrainConfig.seed`); adapter k of seed s (several seeds may share one bank) draws
its training data and its initialisation from the seeds below. Evaluation data come from their own
seed, so changing the number of training steps never changes the test examples.
"""

from __future__ import annotations


def stream_seeds(seed: int, index: int) -> tuple[int, int]:
    """(data seed, initialisation seed) of adapter `index` of run seed `seed`."""
    return seed * 1000 + index, seed * 1000 + index + 500


def eval_seed(seed: int) -> int:
    """Seed of the evaluation examples of run seed `seed` (separate from every training stream)."""
    return 1_000_003 * (seed + 1) + 17
