"""Capacity counts, the precision search and the two-token packing limit."""

from __future__ import annotations

import pytest
import torch

from ctxtune.constructions import count_capacity, find_precision_limit, make_conditional, make_unconditional
from ctxtune.constructions.capacity import MAX_EXHAUSTIVE
from ctxtune.constructions.two_token import find_packing_limit, pack_submap, unpack_submap
from ctxtune.errors import CtxtuneError


def test_exhaustive_counts_match_vocab_power() -> None:
    res = count_capacity(make_unconditional(3, 3))
    assert res.exhaustive and res.total == res.n_targets == 27 and res.reached == 27
    assert res.to_dict()["hard_token_completions"] == 1


def test_sampled_counts() -> None:
    res = count_capacity(make_unconditional(10, 5), samples=300, seed=1)
    assert not res.exhaustive and res.total == 300 == res.reached and res.n_targets == 10**5


def test_too_many_targets_need_samples() -> None:
    c = make_conditional(4, 3)
    assert c.n_targets > MAX_EXHAUSTIVE
    with pytest.raises(CtxtuneError, match="--samples"):
        count_capacity(c)
    with pytest.raises(CtxtuneError):
        count_capacity(c, samples=0)


def test_precision_search_finds_float32_limit_of_authors_form() -> None:
    sizes = [(2**k, 2) for k in (9, 11, 13)]
    f32 = find_precision_limit(
        lambda v, n: make_unconditional(v, n, form="authors", dtype=torch.float32), sizes
    )
    assert f32["first_failure"] is not None and f32["first_failure"][0] >= 2**11
    f64 = find_precision_limit(lambda v, n: make_unconditional(v, n, form="authors"), sizes)
    assert f64["first_failure"] is None and f64["largest"] == (2**13, 2)


@pytest.mark.parametrize(("dtype", "limit"), [(torch.float32, 7), (torch.float64, 13)])
def test_two_token_packing_limit(dtype: torch.dtype, limit: int) -> None:
    assert find_packing_limit(dtype) == limit


def test_packing_round_trip_at_demo_size() -> None:
    digits = torch.randint(0, 10, (100, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_submap(pack_submap(digits, 10, torch.float64), 10, 10), digits)
    assert not torch.equal(unpack_submap(pack_submap(digits, 10, torch.float32), 10, 10), digits)
