"""The diagnostic's pieces: the prefix-form fit, the per-head analysis, the verdict rule."""

from __future__ import annotations

import copy

import pytest
import torch

from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig
from ctxtune.theory.heads import FIT_MIN_ACCURACY, TV_MIN, analyse, analyse_batches, conclude, fit_prefix_form, verdict


def test_fit_prefix_form_recovers_exact_prefix_data() -> None:
    gen = torch.Generator().manual_seed(0)
    r_base = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    alpha = torch.rand(300, generator=gen, dtype=torch.float64)
    u = 3 * torch.randn(8, generator=gen, dtype=torch.float64)
    r_ft = (1 - alpha)[:, None] * r_base + alpha[:, None] * u
    a_hat, u_hat = fit_prefix_form(r_ft, r_base, iters=200)
    fit = (1 - a_hat)[:, None] * r_base + a_hat[:, None] * u_hat
    assert float((fit - r_ft).pow(2).sum() / (r_ft - r_base).pow(2).sum()) < 1e-6


def test_fit_prefix_form_cannot_explain_a_value_map_change() -> None:
    gen = torch.Generator().manual_seed(1)
    r_base = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    r_ft = r_base @ torch.randn(8, 8, generator=gen, dtype=torch.float64)  # an input-dependent linear change
    a_hat, u_hat = fit_prefix_form(r_ft, r_base)
    fit = (1 - a_hat)[:, None] * r_base + a_hat[:, None] * u_hat
    delta = r_ft - r_base
    assert float((fit - r_ft).pow(2).sum() / (delta - delta.mean(0)).pow(2).sum()) > 0.5


@pytest.fixture
def setup() -> tuple[GPT, GPT, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=24)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    tokens = torch.randint(0, 10, (16, 12), generator=torch.Generator().manual_seed(2))
    return copy.deepcopy(model), model, tokens


def test_analyse_zero_lora_changes_nothing(setup: tuple) -> None:
    base, model, tokens = setup
    method = make_method("lora", model, 1, rank=2, targets=["q", "k", "v", "o"]).double()
    heads = analyse(base, method, tokens)
    assert len(heads) == 4
    assert all(h.change < 1e-20 and h.attention_tv < 1e-12 and not h.needs_new_attention for h in heads)


def test_analyse_flags_a_first_layer_query_key_change(setup: tuple) -> None:
    base, model, tokens = setup
    method = make_method("lora", model, 1, rank=2, targets=["q", "k"]).double()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, b in method.B.items():
            if name.startswith("0_"):
                b.copy_(5 * torch.randn(b.shape, generator=gen, dtype=torch.float64))
    heads = analyse(base, method, tokens)
    first = [h for h in heads if h.layer == 0]
    assert all(h.attention_tv >= TV_MIN for h in first) and all(h.needs_new_attention for h in first)
    assert not any(h.needs_new_attention for h in heads if h.layer == 1)  # deeper heads are never flagged
    flagged, sentence = verdict(heads)
    assert flagged == [h.label for h in first] and sentence.startswith("these heads need new attention patterns")
    assert verdict([]) == ([], "a prefix can express this change")


def test_batches_of_several_layouts_pool_their_rows(setup: tuple) -> None:
    """Two batches of different lengths give the same per-head numbers as the rows they hold analysed at once."""
    base, model, tokens = setup
    method = make_method("lora", model, 1, rank=2, targets=["q", "k", "v", "o"]).double()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for b in method.B.values():
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64))
    whole = analyse_batches(base, method, [(tokens, 6), (tokens, 6)])
    split = analyse_batches(base, method, [(tokens[:8], 6), (tokens[8:], 6), (tokens, 6)])
    for a, b in zip(whole, split, strict=True):
        assert a.change == pytest.approx(b.change, rel=1e-9) and a.attention_tv == pytest.approx(b.attention_tv)
    shorter = analyse_batches(base, method, [(tokens[:, :9], 6)])  # another layout: other rows, other numbers
    assert any(abs(a.attention_tv - c.attention_tv) > 1e-6 for a, c in zip(whole, shorter, strict=True))


def test_conclude_is_inconclusive_without_a_working_fit(setup: tuple) -> None:
    base, model, tokens = setup
    method = make_method("lora", model, 1, rank=2, targets=["q", "k"]).double()
    with torch.no_grad():
        for name, b in method.B.items():
            if name.startswith("0_"):
                b.copy_(5 * torch.randn(b.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    heads = analyse(base, method, tokens)
    assert conclude(heads, 0.9, True).predicted == "failure"
    low = conclude(heads, FIT_MIN_ACCURACY - 0.01, True)
    assert low.predicted == "inconclusive" and "did not learn the task" in low.reason and low.flagged
    assert conclude(heads, None, True).predicted == "inconclusive"
    blind = conclude(heads, 0.9, False)
    assert blind.predicted == "inconclusive" and "no query or key map" in blind.reason
    calm = [h for h in heads if not h.needs_new_attention]
    assert conclude(calm, 0.9, True).predicted == "success"
