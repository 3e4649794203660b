"""Construction C: one virtual token realises any map [V] -> [V]^N."""

from __future__ import annotations

import pytest
import torch

from ctxtune.constructions import count_capacity, count_reached, intended_attention, make_conditional
from ctxtune.constructions.conditional import default_beta
from ctxtune.errors import CtxtuneError


@pytest.mark.parametrize(("vocab", "length"), [(3, 1), (3, 2)])
def test_every_map_is_realised(vocab: int, length: int) -> None:
    c = make_conditional(vocab, length)
    maps = c.all_targets()
    assert maps.shape == (vocab ** (vocab * length), vocab, length)
    assert torch.equal(c.run(maps), c.reference(maps))


def test_reference_is_the_lookup_table() -> None:
    c = make_conditional(4, 2)
    f = torch.tensor([[[3, 0], [1, 1], [0, 2], [2, 3]]])
    out = c.run(f)
    for u in range(4):
        assert out[0, u].tolist() == f[0, u].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampled_maps(dtype: torch.dtype) -> None:
    c = make_conditional(8, 4, dtype=dtype)
    maps = c.random_targets(100, torch.Generator().manual_seed(0))
    assert count_reached(c, maps) == 100


def test_case_swap_demo_printable_ascii() -> None:
    """The authors' Part 3 demo: V = 94 printable ASCII, the map swaps letter case."""
    vocab = 94
    table = torch.arange(vocab)
    for t in range(vocab):
        ch = chr(t + 32)
        table[t] = ord(ch.swapcase()) - 32 if ch.isalpha() else t
    c = make_conditional(vocab, 1)
    out = c.run(table[None, :, None])[0, :, 0]
    assert torch.equal(out, table)
    assert chr(int(out[ord("f") - 32]) + 32) == "F"


def test_hard_tokens_select_at_most_vocab_maps() -> None:
    res = count_capacity(make_conditional(3, 1))
    assert res.total == res.reached == 27
    assert res.hard_token_completions <= 3


def test_mechanism_attention_on_intended_keys() -> None:
    c = make_conditional(6, 3)
    att = intended_attention(c, c.random_targets(32, torch.Generator().manual_seed(3)))
    eps = 1.0 / (4 * 6)
    assert att["min_mass_table_key0"] >= 1 - eps
    assert att["min_mass_user_key1"] >= 1 - eps


def test_negative_control_uniform_attention_breaks() -> None:
    assert default_beta(4, 3) > 0
    c = make_conditional(4, 3, beta=0.0)
    assert count_reached(c, c.random_targets(50, torch.Generator().manual_seed(0))) < 50


def test_negative_control_weak_gate_breaks() -> None:
    c = make_conditional(4, 3, gate=0.5)  # the proof needs B > 1
    assert count_reached(c, c.random_targets(50, torch.Generator().manual_seed(0))) < 50


@pytest.mark.parametrize(("vocab", "length"), [(1, 1), (3, 0)])
def test_bad_sizes_raise(vocab: int, length: int) -> None:
    with pytest.raises(CtxtuneError):
        make_conditional(vocab, length)
