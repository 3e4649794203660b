"""Construction of Theorem 1: every target in [V]^N is generated from one virtual token."""

from __future__ import annotations

import pytest
import torch

from ctxtune.constructions import count_capacity, count_reached, intended_attention, make_unconditional
from ctxtune.constructions.unconditional import decode_text, default_beta, encode_text
from ctxtune.errors import CtxtuneError

FORMS = ["authors", "residual"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("vocab", "length"), [(3, 3), (5, 4), (7, 3)])
def test_every_sequence_is_reached(form: str, vocab: int, length: int) -> None:
    c = make_unconditional(vocab, length, form=form)
    targets = c.all_targets()
    assert targets.shape == (vocab**length, length)
    assert torch.equal(c.run(targets), c.reference(targets))


@pytest.mark.parametrize("form", FORMS)
def test_ascii_sentence_from_one_virtual_token(form: str) -> None:
    c = make_unconditional(94, 20, form=form)
    sentence = "I love transformers!"
    out = c.run(encode_text(sentence)[None])
    assert decode_text(out[0]) == sentence


@pytest.mark.parametrize("form", FORMS)
def test_sampled_large_vocab(form: str) -> None:
    c = make_unconditional(94, 20, form=form)
    targets = c.random_targets(200, torch.Generator().manual_seed(0))
    assert count_reached(c, targets) == 200


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", FORMS)
def test_float32_and_float64(form: str, dtype: torch.dtype) -> None:
    c = make_unconditional(5, 4, form=form, dtype=dtype)
    assert c.model.embed.weight.dtype == dtype
    assert c.virtual_token([1, 2, 3, 4]).dtype == dtype
    res = count_capacity(c)
    assert res.reached == res.total == 625


@pytest.mark.parametrize("form", FORMS)
def test_hard_tokens_reach_at_most_vocab(form: str) -> None:
    res = count_capacity(make_unconditional(5, 4, form=form))
    assert 1 <= res.hard_token_completions <= 5
    assert res.hard_token_completions == 1  # every hard token embeds to zero: one completion
    assert res.reached == 625 > 5


def test_authors_mechanism_attention_on_intended_keys() -> None:
    c = make_unconditional(94, 20, form="authors")
    targets = c.random_targets(64, torch.Generator().manual_seed(1))
    att = intended_attention(c, targets)
    eps = 1.0 / (4 * 94)
    assert att["min_mass_pos_self"] >= 1 - eps
    assert att["min_mass_first_key0"] >= 1 - eps


def test_residual_mechanism_uniform_attention() -> None:
    c = make_unconditional(7, 5, form="residual")
    att = intended_attention(c, c.random_targets(32, torch.Generator().manual_seed(2)))
    assert att["max_uniform_error"] < 1e-12


def test_residual_writes_stay_in_declared_slots() -> None:
    """Block 1 writes only u (attention) and w (MLP); block 2 writes only the V logit slots."""
    vocab, length = 5, 4
    c = make_unconditional(vocab, length, form="residual")
    embeds = torch.cat([c.virtual_tokens(torch.tensor([[1, 2, 3, 4]]))[:, None],
                        c.model.embed(torch.tensor([[1, 2, 3]]))], dim=1)  # [1, N, d_model]
    _, cache = c.model.run_with_cache(embeds=embeds)
    assert cache["blocks.0.hook_attn_out"][..., length:].abs().max() == 0
    not_w = [i for i in range(c.model.cfg.d_model) if i != length]
    assert cache["blocks.0.hook_mlp_out"][..., not_w].abs().max() == 0
    assert cache["blocks.1.hook_attn_out"].abs().max() == 0
    assert cache["blocks.1.hook_mlp_out"][..., : length + 1].abs().max() == 0
    w = cache["blocks.0.hook_mlp_out"][0, :, length]  # [N]
    assert torch.allclose(w, torch.tensor([1, 2, 3, 4], dtype=w.dtype) / vocab, atol=1e-12)


def test_negative_control_low_inverse_temperature_breaks_authors_form() -> None:
    vocab, length = 7, 3
    assert default_beta(vocab, length) > 1.0
    c = make_unconditional(vocab, length, form="authors", beta=1.0)
    res = count_capacity(c)
    assert res.reached < res.total


def test_negative_control_small_margin_breaks_residual_form() -> None:
    c = make_unconditional(7, 3, form="residual", margin=2.0)  # the proof needs M >= 4
    res = count_capacity(c)
    assert res.reached < res.total
    first_ok = c.run(c.all_targets())[:, 0] == c.all_targets()[:, 0]
    assert not first_ok.all()  # the position-1 read-out (z_a - z_b = 2) is what fails


@pytest.mark.parametrize(("vocab", "length", "form"), [(1, 3, "residual"), (3, 0, "authors"), (3, 3, "nope")])
def test_bad_sizes_raise(vocab: int, length: int, form: str) -> None:
    with pytest.raises(CtxtuneError):
        make_unconditional(vocab, length, form=form)


def test_encode_text_rejects_non_printable() -> None:
    with pytest.raises(CtxtuneError):
        encode_text("tab\there")
