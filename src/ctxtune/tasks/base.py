"""Batch layout, the Task base class, the digit-input sampler and the task registry.

Every task maps ``n_input`` digit tokens to ``n_output`` tokens. A training or evaluation sequence
is ``[placeholders zeros] ++ input ++ output`` (no separator, no task token); the loss covers the
output positions only, and at evaluation the model is given the first ``n_prompt`` tokens and
generates the rest. This matches the authors' generator (official-code.md, section 3).

Input distribution (the authors' sampling loop, vectorised):

1. draw ``n_input`` digits i.i.d. uniform on ``{0, ..., n_values - 1}`` (0..7 for the paper);
2. toss a fair coin; on heads, reject the draw if it has more than 5 distinct values;
3. reject the draw if it is not in the requested split (:mod:`ctxtune.tasks.split`);
4. reject it if the task declares it invalid (:meth:`Task.is_valid_input`; only ``double_hist``
   does, see there).

A rejected draw is replaced by a fresh one with a fresh coin. Candidates are independent, so
drawing many candidates at once, applying steps 2-4 to each row and keeping the first ``n``
survivors gives exactly the distribution of the sequential loop.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ctxtune.errors import ConfigError
from ctxtune.tasks.split import check_split, in_split_torch

MAX_DISTINCT = 5
"""Draws with more than this many distinct values are rejected on a heads coin."""

REJECT_PROBABILITY = 0.5
"""Probability of the coin that enables the distinct-value rejection."""


@dataclass(frozen=True)
class Batch:
    """A batch of task sequences.

    Attributes:
        tokens: [batch, seq] int64, ``placeholders ++ input ++ output`` (full sequence, unshifted).
        loss_mask: [batch, seq] bool, True exactly at the output positions.
        n_prompt: number of leading tokens given to the model at evaluation (placeholders + input).
        task_index: [batch] int64, the sub-task that produced each row (0 for single tasks).
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    n_prompt: int
    task_index: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(self.tokens.shape)}")
        if self.loss_mask.shape != self.tokens.shape:
            raise ValueError(
                f"loss_mask shape {tuple(self.loss_mask.shape)} != tokens shape {tuple(self.tokens.shape)}"
            )
        if self.task_index.shape != (self.tokens.shape[0],):
            raise ValueError(f"task_index must be [batch], got shape {tuple(self.task_index.shape)}")
        if not 0 <= self.n_prompt <= self.tokens.shape[1]:
            raise ValueError(f"n_prompt {self.n_prompt} outside 0..{self.tokens.shape[1]}")

    @property
    def prompt(self) -> torch.Tensor:
        """[batch, n_prompt] tokens given to the model at evaluation."""
        return self.tokens[:, : self.n_prompt]

    @property
    def targets(self) -> torch.Tensor:
        """[batch, seq - n_prompt] tokens the model must produce."""
        return self.tokens[:, self.n_prompt :]


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"number of examples must be a positive integer, got {n!r}")
    return n


def _check_nonneg(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def count_distinct(inputs: torch.Tensor, n_values: int) -> torch.Tensor:
    """Number of distinct values in each row.

    Args:
        inputs: [n, length] int64 with values in 0..n_values-1.
        n_values: size of the value range.

    Returns:
        [n] int64.
    """
    counts = torch.zeros(inputs.shape[0], n_values, dtype=torch.int64)  # [n, n_values]
    counts.scatter_add_(1, inputs, torch.ones_like(inputs))
    return (counts > 0).sum(dim=1)


class Task(ABC):
    """A sequence-to-sequence task on digit tokens.

    Subclasses set the class attributes and implement :meth:`_reference` (pure Python, the
    definition) and :meth:`_outputs` (vectorised torch version of the same map).

    Attributes:
        name: registry key, lowercase.
        d_vocab: vocabulary size the task needs (inputs and outputs are in 0..d_vocab-1).
        n_input: number of input tokens.
        n_output: number of output tokens.
        n_values: inputs are drawn from 0..n_values-1.
        subtasks: names of the sub-tasks ``task_index`` refers to (``(name,)`` for single tasks).
    """

    name: str = ""
    d_vocab: int = 10
    n_input: int = 10
    n_output: int = 10
    n_values: int = 8

    @property
    def subtasks(self) -> tuple[str, ...]:
        """Names of the sub-tasks indexed by ``Batch.task_index``."""
        return (self.name,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def token_labels(self, tokens: Sequence[int]) -> list[str]:
        """Short readable labels of token ids, for plots of attention patterns (the ids themselves here)."""
        return [str(int(t)) for t in tokens]

    # ----------------------------------------------------------------------------------- definition
    def reference(self, inputs: Sequence[int], index: int = 0) -> list[int]:
        """Pure-Python definition of the task.

        Args:
            inputs: ``n_input`` integers.
            index: example index (only the mixture uses it).

        Returns:
            ``n_output`` integers.
        """
        values = [int(v) for v in inputs]
        if len(values) != self.n_input:
            raise ValueError(f"task {self.name!r} expects {self.n_input} inputs, got {len(values)}")
        out = self._reference(values, int(index))
        assert len(out) == self.n_output
        return out

    def outputs(self, inputs: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Vectorised :meth:`reference`.

        Args:
            inputs: [n, n_input] integer tensor.
            index: [n] example indices (only the mixture uses them; None means 0..n-1).

        Returns:
            [n, n_output] int64.
        """
        if inputs.dim() != 2 or inputs.shape[1] != self.n_input:
            raise ValueError(
                f"task {self.name!r} expects inputs [n, {self.n_input}], got {tuple(inputs.shape)}"
            )
        x = inputs.to(torch.int64)
        if index is None:
            index = torch.arange(x.shape[0], dtype=torch.int64)
        return self._outputs(x, index.to(torch.int64))

    @abstractmethod
    def _reference(self, inputs: list[int], index: int) -> list[int]:
        """Pure-Python definition on a validated list of ``n_input`` ints."""

    @abstractmethod
    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Vectorised definition: [n, n_input] int64, [n] int64 -> [n, n_output] int64."""

    def is_valid_input(self, inputs: torch.Tensor) -> torch.Tensor:
        """Task-specific extra rejection rule applied while sampling.

        Args:
            inputs: [n, n_input] int64.

        Returns:
            [n] bool, True for inputs the task accepts (all of them by default).
        """
        return torch.ones(inputs.shape[0], dtype=torch.bool)

    def task_indices(self, n: int, start_index: int = 0) -> torch.Tensor:
        """[n] int64 sub-task index of rows with example indices start_index .. start_index+n-1."""
        return torch.zeros(n, dtype=torch.int64)

    # ------------------------------------------------------------------------------------- sampling
    def sample_inputs(self, n: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """Draw ``n`` inputs from the task's input distribution (see the module docstring).

        Args:
            n: number of inputs, positive.
            generator: torch random generator (CPU); the result is a deterministic function of it.
            split: "train" or "test".

        Returns:
            [n, n_input] int64.

        Raises:
            ConfigError: for ``n <= 0`` or an unknown split.
        """
        _check_n(n)
        check_split(split)
        # Expected acceptance is about split_fraction * 0.66 (0.496 train, 0.165 test); planning with
        # a slightly lower rate makes one pass enough almost always.
        p_accept = (0.25 if split == "test" else 0.75) * 0.6
        chunks: list[torch.Tensor] = []
        have = 0
        while have < n:
            m = math.ceil((n - have) / p_accept) + 16
            cand = torch.randint(0, self.n_values, (m, self.n_input), generator=generator, dtype=torch.int64)
            heads = torch.rand(m, generator=generator) < REJECT_PROBABILITY
            too_many = count_distinct(cand, self.n_values) > MAX_DISTINCT
            keep = ~(heads & too_many) & in_split_torch(cand, split) & self.is_valid_input(cand)
            accepted = cand[keep][: n - have]  # [k, n_input]
            chunks.append(accepted)
            have += accepted.shape[0]
        return torch.cat(chunks, dim=0)  # [n, n_input]

    def make_batch(
        self,
        n: int,
        generator: torch.Generator,
        split: str = "train",
        placeholders: int = 0,
        start_index: int = 0,
    ) -> Batch:
        """Sample a batch of full sequences.

        Args:
            n: batch size, positive.
            generator: torch random generator.
            split: "train" or "test".
            placeholders: number of leading zero tokens (the prefix length P of the experiments).
            start_index: example index of the first row (the mixture uses task (start_index + row) % 4).

        Returns:
            A :class:`Batch` with ``tokens`` [n, placeholders + n_input + n_output].
        """
        _check_nonneg("placeholders", placeholders)
        _check_nonneg("start_index", start_index)
        inputs = self.sample_inputs(n, generator, split)  # [n, n_input]
        task_index = self.task_indices(n, start_index)  # [n]
        example_index = start_index + torch.arange(n, dtype=torch.int64)  # [n]
        outs = self.outputs(inputs, example_index)  # [n, n_output]
        pad = torch.zeros(n, placeholders, dtype=torch.int64)  # [n, P]
        tokens = torch.cat([pad, inputs, outs], dim=1)  # [n, P + n_input + n_output]
        n_prompt = placeholders + self.n_input
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)  # [n, seq]
        loss_mask[:, n_prompt:] = True
        return Batch(tokens=tokens, loss_mask=loss_mask, n_prompt=n_prompt, task_index=task_index)


    def make_batches(
        self,
        n: int,
        generator: torch.Generator,
        split: str = "train",
        placeholders: int = 0,
        start_index: int = 0,
    ) -> list[Batch]:
        """`n` examples as a list of batches, one per sequence layout (n_prompt, length).

        Tasks whose examples all share one layout (every digit task) return one batch, `make_batch`'s. Tasks
        with examples of several lengths (`ctxtune.tasks.user.TextTask`) return one batch per layout, so
        evaluation covers every layout while each batch stays rectangular.
        """
        return [self.make_batch(n, generator, split, placeholders, start_index)]

# ----------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Task] = {}
_FAMILIES: dict[str, Callable[[str], Task]] = {}
"""Task families: names whose tasks are built on first lookup (name -> builder)."""
_BUILT: dict[str, Task] = {}
"""Tasks of families built so far (kept apart from `_REGISTRY`: `list_tasks` lists the registered tasks only)."""


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or name != name.lower() or not name.isidentifier():
        raise ValueError(f"task name must be a non-empty lowercase identifier, got {name!r}")
    if name in _REGISTRY or name in _FAMILIES:
        raise ValueError(f"task {name!r} is already registered")


def register_task(task: Task) -> None:
    """Add a task instance to the registry under ``task.name``.

    Raises:
        ValueError: if the name is empty, not lowercase, or already registered.
    """
    _check_name(task.name)
    _REGISTRY[task.name] = task


def register_task_family(names: Sequence[str], build: Callable[[str], Task]) -> None:
    """Declare task names whose tasks are built on their first lookup by `get_task`: ``build(name)``.

    For tasks that need something expensive or from a higher layer to build, such as a model's tokenizer
    (`ctxtune.tasks.lm`, registered by `ctxtune.train.lm_tasks`). A study spec that names one is validated by
    `is_task` without building it; a run builds it once per process.

    Raises:
        ValueError: a name is not a lowercase identifier or is already registered.
    """
    names = list(names)
    for name in names:
        _check_name(name)
    if len(set(names)) != len(names):
        raise ValueError(f"task family names repeat: {names}")
    for name in names:
        _FAMILIES[name] = build


def is_task(name: str) -> bool:
    """Whether `name` is a registered task or a name of a task family (without building it)."""
    return isinstance(name, str) and (name in _REGISTRY or name in _FAMILIES)


def get_task(name: str) -> Task:
    """Look up a registered task, or build a family's task on its first lookup.

    Raises:
        ConfigError: for an unknown name (the message names it and lists the known tasks), or a family's task
            that cannot be built here (the builder's message).
    """
    if isinstance(name, str):
        if name in _REGISTRY:
            return _REGISTRY[name]
        if name in _BUILT:
            return _BUILT[name]
        if name in _FAMILIES:
            task = _FAMILIES[name](name)
            if task.name != name:
                raise ConfigError(f"the builder of task {name!r} made a task named {task.name!r}")
            _BUILT[name] = task
            return task
    families = f"; built on demand: {', '.join(sorted(_FAMILIES))}" if _FAMILIES else ""
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}{families}")


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted (task families' names: `list_task_families`)."""
    return sorted(_REGISTRY)


def list_task_families() -> list[str]:
    """Names of the tasks built on demand (`register_task_family`), sorted."""
    return sorted(_FAMILIES)
