"""The paper's digit tasks (Section 5-6 experiments; authors' ``data_tools.py``).

Inputs are 10 digits from {0..7} (see :mod:`ctxtune.tasks.base` for the sampling rule), the
vocabulary is 10 (ids 0..9) and outputs are 10 tokens. Every task documents one encoded example on
the input ``2 6 0 1 4 6 3 0 1 2`` (the one the paper discusses) or a more telling one.
"""

from __future__ import annotations

from collections import Counter

import torch

from ctxtune.tasks.base import Task, register_task


def _value_counts(inputs: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-row histogram: [n, length] int64 -> [n, n_bins] int64 counts of each value."""
    counts = torch.zeros(inputs.shape[0], n_bins, dtype=torch.int64)  # [n, n_bins]
    return counts.scatter_add_(1, inputs, torch.ones_like(inputs))


def _position_counts(inputs: torch.Tensor) -> torch.Tensor:
    """[n, length] -> [n, length]: how many times each position's value occurs in its row."""
    same = inputs.unsqueeze(2) == inputs.unsqueeze(1)  # [n, length, length]
    return same.sum(dim=2)


class Ascending(Task):
    """Sort the input non-decreasing.

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 0 0 1 1 2 2 3 4 6 6``.
    """

    name = "ascending"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        return sorted(inputs)

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.sort(inputs, dim=1).values


class Descending(Task):
    """Sort the input non-increasing.

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 6 6 4 3 2 2 1 1 0 0``.
    """

    name = "descending"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        return sorted(inputs, reverse=True)

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.sort(inputs, dim=1, descending=True).values


class Add1(Task):
    """Add 1 to every digit, keeping the order (inputs <= 7, so outputs <= 8).

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 3 7 1 2 5 7 4 1 2 3``.
    """

    name = "add1"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        return [v + 1 for v in inputs]

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return inputs + 1


class Add2(Task):
    """Add 2 to every digit, keeping the order (inputs <= 7, so outputs <= 9).

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 4 8 2 3 6 8 5 2 3 4``.
    """

    name = "add2"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        return [v + 2 for v in inputs]

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return inputs + 2


class AscendingAdd1(Task):
    """Sort ascending, then add 1 (the composed task of experiment 3).

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 1 1 2 2 3 3 4 5 7 7``.
    """

    name = "ascending_add1"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        return [v + 1 for v in sorted(inputs)]

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.sort(inputs, dim=1).values + 1


class DoubleHist(Task):
    """The authors' "double histogram": ``out_i`` = number of occurrences of ``x_i`` in the input.

    This is the definition in the authors' code (RASP would call it "histogram"; the RASP variant
    is :class:`DoubleHistRasp`). The count lies in 1..10 and is 10 only when all ten digits are
    equal, which would fall outside the vocabulary: the sampler of this task therefore resamples
    such inputs (:meth:`is_valid_input`; probability 8 / 8**10, about 7.5e-9, per draw), so every
    sampled output stays in 0..9. :meth:`reference` itself still returns 10s for such an input.

    Example: ``5 5 5 1 1 2 3 3 7 0 -> 3 3 3 2 2 1 2 2 1 1``.
    """

    name = "double_hist"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        counts = Counter(inputs)
        return [counts[v] for v in inputs]

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return _position_counts(inputs)

    def is_valid_input(self, inputs: torch.Tensor) -> torch.Tensor:
        """Reject inputs whose ten digits are all equal (their output would be 10, out of vocabulary)."""
        return (inputs != inputs[:, :1]).any(dim=1)


class DoubleHistRasp(Task):
    """RASP's "double histogram" (Weiss et al. 2021).

    ``out_i`` = number of distinct values whose count in the input equals the count of ``x_i``.
    With inputs from {0..7} at most 8 distinct values exist, so outputs lie in 1..8.

    Example: ``5 5 5 1 1 2 3 3 7 0 -> 1 1 1 2 2 3 2 2 3 3`` (counts 3, 2, 1 are shared by 1, 2 and
    3 distinct values: {5}, {1, 3}, {2, 7, 0}).
    """

    name = "double_hist_rasp"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        counts = Counter(inputs)
        how_many = Counter(counts.values())
        return [how_many[counts[v]] for v in inputs]

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        hist = _value_counts(inputs, self.d_vocab)  # [n, d_vocab]
        own = _position_counts(inputs)  # [n, n_input], each >= 1, so absent values never match
        same = hist.unsqueeze(1) == own.unsqueeze(2)  # [n, n_input, d_vocab]
        return same.sum(dim=2)


class Mixture(Task):
    """The unlabelled pretraining mixture (the authors' "random" task).

    The example with index ``i`` is labelled by ``[ascending, descending, add1, add2][i % 4]``;
    nothing in the sequence says which. ``Batch.task_index`` records it.

    Example: ``2 6 0 1 4 6 3 0 1 2`` at index 5 (descending) ``-> 6 6 4 3 2 2 1 1 0 0``.
    """

    name = "mix"

    def __init__(self, parts: tuple[Task, ...]) -> None:
        self.parts = parts

    @property
    def subtasks(self) -> tuple[str, ...]:
        """Names of the mixed tasks, in index order."""
        return tuple(p.name for p in self.parts)

    def task_indices(self, n: int, start_index: int = 0) -> torch.Tensor:
        """[n] int64: (start_index + row) % number of parts."""
        return (start_index + torch.arange(n, dtype=torch.int64)) % len(self.parts)

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        return self.parts[index % len(self.parts)].reference(inputs)

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        n = inputs.shape[0]
        every = torch.stack([p.outputs(inputs) for p in self.parts])  # [n_parts, n, n_output]
        choice = index % len(self.parts)  # [n]
        return every[choice, torch.arange(n)]  # [n, n_output]


ASCENDING = Ascending()
DESCENDING = Descending()
ADD1 = Add1()
ADD2 = Add2()
ASCENDING_ADD1 = AscendingAdd1()
DOUBLE_HIST = DoubleHist()
DOUBLE_HIST_RASP = DoubleHistRasp()
MIX = Mixture((ASCENDING, DESCENDING, ADD1, ADD2))

PAPER_TASKS: tuple[Task, ...] = (
    ASCENDING,
    DESCENDING,
    ADD1,
    ADD2,
    ASCENDING_ADD1,
    DOUBLE_HIST,
    DOUBLE_HIST_RASP,
    MIX,
)

for _task in PAPER_TASKS:
    register_task(_task)
