"""Batch layout, determinism, the rejection rule, the mixture, the registry and error messages."""

from __future__ import annotations

import math
import time
from functools import cache

import pytest
import torch

from ctxtune.errors import ConfigError
from ctxtune.tasks import Batch, count_distinct, get_task, list_tasks, register_task
from ctxtune.tasks.digits import Ascending


@pytest.mark.parametrize("placeholders", [0, 1, 12])
@pytest.mark.parametrize("name", ["ascending", "double_hist", "mix", "induction"])
def test_batch_layout(name: str, placeholders: int) -> None:
    task = get_task(name)
    n = 37
    batch = task.make_batch(n, torch.Generator().manual_seed(0), "test", placeholders=placeholders)
    seq = placeholders + task.n_input + task.n_output
    assert isinstance(batch, Batch)
    assert batch.tokens.shape == (n, seq) and batch.tokens.dtype == torch.int64
    assert batch.loss_mask.shape == (n, seq) and batch.loss_mask.dtype == torch.bool
    assert batch.task_index.shape == (n,) and batch.task_index.dtype == torch.int64
    assert batch.n_prompt == placeholders + task.n_input
    expected_mask = torch.zeros(seq, dtype=torch.bool)
    expected_mask[placeholders + task.n_input :] = True
    assert bool((batch.loss_mask == expected_mask).all())
    assert int(batch.loss_mask.sum()) == n * task.n_output
    assert bool((batch.tokens[:, :placeholders] == 0).all())
    inputs = batch.tokens[:, placeholders : batch.n_prompt]
    assert int(inputs.max()) <= 7
    assert torch.equal(batch.targets, task.outputs(inputs, torch.arange(n)))
    assert torch.equal(batch.prompt, batch.tokens[:, : batch.n_prompt])


@pytest.mark.parametrize("split", ["train", "test"])
def test_same_seed_same_batch_different_seed_differs(split: str) -> None:
    task = get_task("mix")
    a = task.make_batch(64, torch.Generator().manual_seed(42), split, placeholders=3, start_index=5)
    b = task.make_batch(64, torch.Generator().manual_seed(42), split, placeholders=3, start_index=5)
    c = task.make_batch(64, torch.Generator().manual_seed(43), split, placeholders=3, start_index=5)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.task_index, b.task_index)
    assert not torch.equal(a.tokens, c.tokens)
    # Consecutive draws from one generator also differ.
    g = torch.Generator().manual_seed(42)
    assert not torch.equal(task.sample_inputs(64, g, split), task.sample_inputs(64, g, split))


@cache
def _stirling2(n: int, k: int) -> int:
    if n == k:
        return 1
    if k == 0 or k > n:
        return 0
    return k * _stirling2(n - 1, k) + _stirling2(n - 1, k - 1)


def _p_at_most_5_distinct_uniform() -> float:
    """Exact P(10 uniform draws from 8 values show <= 5 distinct values)."""
    ways = sum(math.comb(8, k) * math.factorial(k) * _stirling2(10, k) for k in range(1, 6))
    return ways / 8**10


def test_rejection_rule_fraction() -> None:
    q = _p_at_most_5_distinct_uniform()
    expected = q / (q + 0.5 * (1 - q))  # accept always if <= 5 distinct, else with probability 1/2
    assert abs(q - 0.322) < 1e-3 and abs(expected - 0.488) < 1e-3  # the paper's derived figures
    n = 20_000
    bound = 4.5 * math.sqrt(expected * (1 - expected) / n)
    g = torch.Generator().manual_seed(2024)
    for split in ("train", "test"):
        inputs = get_task("add1").sample_inputs(n, g, split)
        frac = float((count_distinct(inputs, 8) <= 5).double().mean())
        assert abs(frac - expected) < bound, (split, frac, expected)
    # Plain uniform draws give q, far from the accepted fraction.
    uniform = torch.randint(0, 8, (n, 10), generator=g)
    frac_uniform = float((count_distinct(uniform, 8) <= 5).double().mean())
    assert abs(frac_uniform - q) < 4.5 * math.sqrt(q * (1 - q) / n)


def test_digits_are_uniform_over_0_to_7() -> None:
    inputs = get_task("ascending").sample_inputs(5000, torch.Generator().manual_seed(9), "train")
    counts = torch.bincount(inputs.flatten(), minlength=10)
    assert counts[8:].sum() == 0
    freq = counts[:8].double() / inputs.numel()
    assert bool(((freq - 0.125).abs() < 0.01).all()), freq


@pytest.mark.parametrize("start_index", [0, 1, 7])
def test_mixture_task_index_and_outputs(start_index: int) -> None:
    mix = get_task("mix")
    assert mix.subtasks == ("ascending", "descending", "add1", "add2")
    n = 50
    batch = mix.make_batch(
        n, torch.Generator().manual_seed(1), "train", placeholders=2, start_index=start_index
    )
    assert batch.task_index.tolist() == [(start_index + r) % 4 for r in range(n)]
    for row, idx in zip(batch.tokens.tolist(), batch.task_index.tolist(), strict=True):
        sub = get_task(mix.subtasks[idx])
        assert row[12:] == sub.reference(row[2:12])
    # All four tasks actually appear and produce different outputs.
    assert set(batch.task_index.tolist()) == {0, 1, 2, 3}


def test_single_tasks_have_task_index_zero() -> None:
    for name in list_tasks():
        if name == "mix":
            continue
        batch = get_task(name).make_batch(8, torch.Generator().manual_seed(0), start_index=3)
        assert batch.task_index.tolist() == [0] * 8
        assert get_task(name).subtasks == (name,)


def test_sampling_is_fast() -> None:
    task = get_task("mix")
    g = torch.Generator().manual_seed(0)
    task.make_batch(64, g)  # warm-up
    times = []
    for split in ("train", "test"):
        for _ in range(30):
            t0 = time.perf_counter()
            task.make_batch(64, g, split, placeholders=10)
            times.append(time.perf_counter() - t0)
    times.sort()
    assert times[len(times) // 2] < 0.01  # about 0.3 ms on one CPU core; generous bound


def test_unknown_task_message() -> None:
    with pytest.raises(ConfigError) as info:
        get_task("xyz")
    message = str(info.value)
    assert "'xyz'" in message
    assert "ascending" in message and "double_hist" in message and "mix" in message


@pytest.mark.parametrize("n", [0, -3])
def test_nonpositive_n(n: int) -> None:
    task = get_task("ascending")
    with pytest.raises(ConfigError, match=str(n)):
        task.sample_inputs(n, torch.Generator())
    with pytest.raises(ConfigError, match=str(n)):
        task.make_batch(n, torch.Generator())


def test_negative_placeholders_and_start_index() -> None:
    task = get_task("ascending")
    with pytest.raises(ConfigError, match="-1"):
        task.make_batch(4, torch.Generator(), placeholders=-1)
    with pytest.raises(ConfigError, match="-2"):
        task.make_batch(4, torch.Generator(), start_index=-2)


def test_register_task_validation() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_task(Ascending())

    class Upper(Ascending):
        name = "Ascending2"

    with pytest.raises(ValueError, match="lowercase"):
        register_task(Upper())
    assert "Ascending2" not in list_tasks()
    assert list_tasks() == sorted(list_tasks())


def test_registry_contents() -> None:
    expected = {
        "ascending", "descending", "add1", "add2", "ascending_add1", "double_hist", "double_hist_rasp",
        "mix", "copy", "reverse", "histogram", "modsum", "induction",
    }  # fmt: skip
    assert set(list_tasks()) == expected
    for name in expected:
        assert get_task(name).name == name
