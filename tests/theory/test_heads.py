"""The diagnostic's pieces: the prefix-form fit, the per-head analysis, the verdict rule."""

from __future__ import annotations

import copy

import pytest
import torch

from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig
from ctxtune.theory.heads import TV_MIN, analyse, fit_prefix_form, verdict


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
