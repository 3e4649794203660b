"""The diagnostic's pieces: the prefix-form fit, the per-head analysis, the verdict rule, the report section."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ctxtune.beyond import beyond_section
from ctxtune.beyond.diagnose import TV_MIN, analyse, fit_prefix_form
from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig


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


def test_beyond_section_renders_and_tolerates_missing(tmp_path: Path) -> None:
    assert "No results" in beyond_section(tmp_path)
    from ctxtune.beyond.universal import approximation_study

    (tmp_path / "universal.json").write_text(json.dumps(approximation_study(["abs"], (2, 4))))
    text = beyond_section(tmp_path)
    assert text.startswith("## Beyond the paper") and "| abs | sup |" in text


@pytest.mark.slow
def test_suffix_study_and_validation_pipeline(tmp_path: Path) -> None:
    from ctxtune.beyond.diagnose import validate
    from ctxtune.beyond.suffix import run_study

    model = {"n_layers": 2, "n_heads": 2, "d_model": 16, "n_ctx": 32, "act": "relu", "dropout": 0.0}
    bases = {"tiny": {"task": "ascending", "model": model, "steps": 5}}
    cases = [{"case": "c", "base": "tiny", "task": "descending", "prefix_len": 1}]
    res = run_study(
        tmp_path / "s.json", tmp_path / "bases", steps=3, seeds=2, eval_examples=8, n_decomp=8, cases=cases, bases=bases
    )
    assert {r["method"] for r in res["learning"]} == {"prefix", "soft_prompt", "suffix"}
    sfx = [r for r in res["decomposition"] if r["method"] == "suffix"]
    assert sfx[0]["fixed_bias_unexplained"] < 1e-20 and sfx[1]["value_dependence"] > 0
    import ctxtune.beyond.suffix as sfx_mod

    sfx_mod.QUICK_BASES["tiny_test"] = bases["tiny"]
    try:
        val = validate(
            tmp_path / "bases",
            tmp_path / "v.json",
            steps=3,
            prefix_steps=3,
            eval_examples=8,
            cases=[
                {
                    "case": "c",
                    "base": "tiny_test",
                    "task": "descending",
                    "expected": "failure",
                    "prefix": {"n_virtual": 1},
                }
            ],
        )
    finally:
        del sfx_mod.QUICK_BASES["tiny_test"]
    assert val["cases"][0]["predicted"] in ("success", "failure") and "/" in val["agreement_paper"]
    (tmp_path / "suffix_vs_prefix.json").write_text((tmp_path / "s.json").read_text())
    (tmp_path / "diagnose_validation.json").write_text((tmp_path / "v.json").read_text())
    assert "| c |" in beyond_section(tmp_path)
