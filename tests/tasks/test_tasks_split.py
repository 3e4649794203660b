"""Stable hash split: python/torch agreement, pinned values, split fraction and disjointness."""

from __future__ import annotations

import math

import pytest
import torch

from ctxtune.errors import ConfigError
from ctxtune.tasks import get_task
from ctxtune.tasks.split import (
    check_split,
    in_split_torch,
    split_bucket,
    split_bucket_torch,
    split_of,
    splitmix64,
    stable_hash,
    stable_hash_torch,
)

MASK64 = (1 << 64) - 1


def test_splitmix64_matches_reference_generator() -> None:
    # First two outputs of the published splitmix64 generator seeded with 0 (states 0 and gamma).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


@pytest.mark.parametrize(
    ("digits", "expected_hash", "expected_bucket"),
    [
        ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0x1FDD7128F310C389, 1),
        ([2, 6, 0, 1, 4, 6, 3, 0, 1, 2], 0xDE0180758D271191, 1),
        ([7, 7, 7, 7, 7, 7, 7, 7, 7, 7], 0xBAF7182DD78A3CB0, 0),
        ([1, 2, 3, 4, 5, 6, 7, 0, 1, 2], 0x1BDFD00AED4E1AA2, 2),
    ],
)
def test_hash_is_pinned(digits: list[int], expected_hash: int, expected_bucket: int) -> None:
    """Literal values computed once; a change here silently moves examples between train and test."""
    assert stable_hash(digits) == expected_hash
    assert split_bucket(digits) == expected_bucket
    assert split_of(digits) == ("test" if expected_bucket == 0 else "train")
    tensor_hash = int(stable_hash_torch(torch.tensor([digits]))[0])
    assert tensor_hash & MASK64 == expected_hash
    assert int(split_bucket_torch(torch.tensor([digits]))[0]) == expected_bucket


@pytest.mark.parametrize("length", [1, 3, 10, 15])
def test_python_and_torch_hash_agree(length: int) -> None:
    g = torch.Generator().manual_seed(100 + length)
    inputs = torch.randint(0, 16, (2000, length), generator=g)
    torch_hash = stable_hash_torch(inputs)
    torch_bucket = split_bucket_torch(inputs)
    for row, h, b in zip(inputs.tolist(), torch_hash.tolist(), torch_bucket.tolist(), strict=True):
        expected = stable_hash(row)
        assert 0 <= expected <= MASK64
        assert h & MASK64 == expected
        assert b == expected % 4


def test_hash_separates_lengths_and_orders() -> None:
    assert stable_hash([0]) != stable_hash([0, 0])
    assert stable_hash([1, 2]) != stable_hash([2, 1])
    assert stable_hash([]) == splitmix64(1)


def test_hash_rejects_unsupported_inputs() -> None:
    with pytest.raises(ValueError):
        stable_hash([16])
    with pytest.raises(ValueError):
        stable_hash([0] * 16)
    with pytest.raises(ValueError):
        stable_hash_torch(torch.tensor([[16]]))


def test_test_fraction_of_uniform_inputs_is_a_quarter() -> None:
    n = 40_000
    g = torch.Generator().manual_seed(7)
    inputs = torch.randint(0, 8, (n, 10), generator=g)
    frac = float((split_bucket_torch(inputs) == 0).double().mean())
    sigma = math.sqrt(0.25 * 0.75 / n)
    assert abs(frac - 0.25) < 4.5 * sigma, frac
    # Buckets 1..3 are also balanced (the hash is not just biased toward/away from 0).
    for b in (1, 2, 3):
        frac_b = float((split_bucket_torch(inputs) == b).double().mean())
        assert abs(frac_b - 0.25) < 4.5 * sigma, (b, frac_b)


def test_in_split_partitions() -> None:
    g = torch.Generator().manual_seed(3)
    inputs = torch.randint(0, 8, (1000, 10), generator=g)
    train = in_split_torch(inputs, "train")
    test = in_split_torch(inputs, "test")
    assert bool((train ^ test).all())


def test_sampled_train_and_test_are_disjoint() -> None:
    task = get_task("ascending")
    g = torch.Generator().manual_seed(11)
    train = task.sample_inputs(6000, g, "train")
    test = task.sample_inputs(6000, g, "test")
    assert bool((split_bucket_torch(test) == 0).all())
    assert bool((split_bucket_torch(train) != 0).all())
    train_set = {tuple(r) for r in train.tolist()}
    test_set = {tuple(r) for r in test.tolist()}
    assert train_set.isdisjoint(test_set)
    for row in test.tolist()[:200]:
        assert split_of(row) == "test"
    for row in train.tolist()[:200]:
        assert split_of(row) == "train"


@pytest.mark.parametrize("bad", ["valid", "TRAIN", "", "val"])
def test_bad_split_name(bad: str) -> None:
    with pytest.raises(ConfigError, match=repr(bad)):
        check_split(bad)
    with pytest.raises(ConfigError, match=repr(bad)):
        get_task("add1").sample_inputs(4, torch.Generator().manual_seed(0), bad)
