"""Extra digit tasks beyond the paper, on the same input distribution and vocabulary 10.

Inputs are 10 digits from {0..7} sampled as for the paper's tasks; outputs are 10 tokens in 0..9.
"""

from __future__ import annotations

import torch

from ctxtune.tasks.base import Task, register_task

MODULUS = 8
"""Modulus of :class:`ModSum` (the size of the input alphabet)."""


class Copy(Task):
    """Output the input unchanged.

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 2 6 0 1 4 6 3 0 1 2``.
    """

    name = "copy"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        return list(inputs)

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return inputs.clone()


class Reverse(Task):
    """Output the input in reverse order: ``out_i = x_{9-i}``.

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 2 1 0 3 6 4 1 0 6 2``.
    """

    name = "reverse"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        return inputs[::-1]

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.flip(inputs, dims=[1])


class Histogram(Task):
    """Value-indexed histogram: ``out_v`` = number of occurrences of the digit ``v`` in the input.

    The output position names the value (position 0 counts the 0s, ..., position 9 the 9s), unlike
    ``double_hist`` whose output position names an input position. Each output needs an attention
    pattern selecting the input positions holding one fixed value. Counts are clipped at 9 so that
    every output is in the vocabulary; a count of 10 (all ten digits equal, probability about 7.5e-9
    per draw) is written as 9. Positions 8 and 9 are always 0 on inputs from {0..7}.

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 2 2 2 1 1 0 2 0 0 0``.
    """

    name = "histogram"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        return [min(inputs.count(v), self.d_vocab - 1) for v in range(self.n_output)]

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(inputs.shape[0], self.n_output, dtype=torch.int64)  # [n, n_output]
        counts.scatter_add_(1, inputs, torch.ones_like(inputs))
        return counts.clamp(max=self.d_vocab - 1)


class ModSum(Task):
    """Prefix sums modulo 8: ``out_i = (x_0 + ... + x_i) mod 8``.

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 2 0 0 1 5 3 6 6 7 1``
    (prefix sums 2 8 8 9 13 19 22 22 23 25).
    """

    name = "modsum"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        out: list[int] = []
        total = 0
        for v in inputs:
            total += v
            out.append(total % MODULUS)
        return out

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(inputs, dim=1) % MODULUS


class Induction(Task):
    """Follow the input's successor links, as an induction head would.

    Define ``succ(v) = x_{(j + 1) mod 10}`` where ``j`` is the first position with ``x_j = v`` (the
    input is read cyclically, so the successor of position 9 is position 0). The output continues
    the sequence by induction: ``out_0 = succ(x_9)`` and ``out_k = succ(out_{k-1})``. Every output
    token is therefore found by locating an earlier occurrence of the token just before it (the
    last input token or the previous output) and copying the token that followed that occurrence
    ("[A][B] ... [A] -> [B]"). Every output value occurs in the input, so ``succ`` is always defined.

    Example: ``2 6 0 1 4 6 3 0 1 2 -> 6 0 1 4 6 0 1 4 6 0``
    (x_9 = 2 first occurs at 0, followed by 6; 6 first occurs at 1, followed by 0; 0 -> 1; 1 -> 4;
    4 -> 6; and the cycle 6 0 1 4 repeats).
    """

    name = "induction"

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        length = len(inputs)

        def succ(v: int) -> int:
            return inputs[(inputs.index(v) + 1) % length]

        out: list[int] = []
        current = inputs[-1]
        for _ in range(self.n_output):
            current = succ(current)
            out.append(current)
        return out

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        n, length = inputs.shape
        positions = torch.arange(length, dtype=torch.int64).expand(n, length)  # [n, length]
        first = torch.full((n, self.d_vocab), length, dtype=torch.int64)  # [n, d_vocab]; length = absent
        first.scatter_reduce_(1, inputs, positions, reduce="amin")
        # Successor of each value (absent values get position 1's token; they are never queried).
        succ = torch.gather(inputs, 1, (first + 1) % length)  # [n, d_vocab]
        rows = torch.arange(n)
        current = inputs[:, -1]  # [n]
        out = torch.empty(n, self.n_output, dtype=torch.int64)  # [n, n_output]
        for k in range(self.n_output):
            current = succ[rows, current]
            out[:, k] = current
        return out


COPY = Copy()
REVERSE = Reverse()
HISTOGRAM = Histogram()
MODSUM = ModSum()
INDUCTION = Induction()

EXTRA_TASKS: tuple[Task, ...] = (COPY, REVERSE, HISTOGRAM, MODSUM, INDUCTION)

for _task in EXTRA_TASKS:
    register_task(_task)
