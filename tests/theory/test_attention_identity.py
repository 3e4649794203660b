"""Section 4 identity on our GPT in float64: random shapes, seeds, both prefix forms, soft prompts."""

from __future__ import annotations

import copy

import pytest
import torch

from ctxtune.methods import make_method
from ctxtune.model import GPT, LayerPrefix, ModelConfig
from ctxtune.theory import capture_gpt, check_layers, check_weights_control, decompose
from ctxtune.theory.attention import alpha_stats, check_alpha_control, perturbed_copy
from ctxtune.theory.capture import capture_method

SHAPES = [
    dict(n_layers=2, n_heads=4, d_model=32, pos="learned"),
    dict(n_layers=3, n_heads=2, d_model=24, pos="rotary", norm="rmsnorm"),
    dict(n_layers=1, n_heads=3, d_model=24, pos="learned", attn_norm=False),
    dict(n_layers=2, n_heads=1, d_model=16, pos="none", bias=False),
]


def _model(seed: int, **kw: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_ctx=32, d_vocab=11, **kw)).double().eval()  # type: ignore[arg-type]


def _prefix(model: GPT, form: str, p: int, gen: torch.Generator) -> list[LayerPrefix | None]:
    cfg = model.cfg
    out: list[LayerPrefix | None] = []
    for _ in range(cfg.n_layers):
        if form == "hidden":
            out.append(LayerPrefix(hidden=torch.randn(1, p, cfg.d_model, generator=gen, dtype=torch.float64)))
        else:
            shape = (1, cfg.n_heads, p, cfg.head_dim)
            k = torch.randn(*shape, generator=gen, dtype=torch.float64)
            out.append(LayerPrefix(key=k, value=torch.randn(*shape, generator=gen, dtype=torch.float64)))
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['pos']}-L{s['n_layers']}H{s['n_heads']}")
@pytest.mark.parametrize("form", ["hidden", "kv"])
@pytest.mark.parametrize("p", [1, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_identity_holds_float64(shape: dict, form: str, p: int, seed: int) -> None:
    model = _model(seed, **shape)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (3, 9), generator=gen)
    layers = capture_gpt(model, tokens, prefix=_prefix(model, form, p, gen))
    results = check_layers(layers)
    identity = [r for r in results if not r.control]
    assert {r.kind for r in identity} == {"attention", "output", "span"}
    assert len(identity) == 3 * shape["n_layers"] * shape["n_heads"]
    for r in identity:
        assert r.tol == pytest.approx(1e-12) or r.tol <= 1e-12 * 100
        assert r.passed, r
    for r in results:
        if r.control:
            assert not r.passed and r.margin > 1e6, r  # fails by many orders of magnitude


@pytest.mark.parametrize("policy", ["keep", "shift"])
@pytest.mark.parametrize("key", ["prefix", "prefix_kv", "soft_prompt"])
def test_identity_through_methods(key: str, policy: str) -> None:
    model = _model(3, n_layers=2, n_heads=4, d_model=32, pos="rotary")
    method = make_method(key, model, n_virtual=3, position_policy=policy).double()
    tokens = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(0))
    layers = capture_method(method, tokens)
    assert all(la.n_virtual == 3 for la in layers)
    results = check_layers(layers)
    assert all(r.ok for r in results)
    assert max(r.max_abs_err for r in results if not r.control) <= 1e-12


def test_decomposition_sums_to_whole() -> None:
    model = _model(0, n_layers=2, n_heads=4, d_model=32)
    gen = torch.Generator().manual_seed(0)
    layers = capture_gpt(
        model, torch.randint(0, 11, (2, 6), generator=gen), prefix=_prefix(model, "hidden", 3, gen)
    )
    for la in layers:
        parts = decompose(la)
        total = parts["content"] + parts["prefix"].sum(3)
        assert torch.allclose(total, parts["whole"], atol=1e-13, rtol=0)
        assert torch.allclose(parts["prefix"].sum(3), parts["bias"], atol=1e-15, rtol=0)
        # the prefix attention plus the rescaled content attention is the whole row
        assert torch.allclose(la.pattern.sum(-1), torch.ones_like(la.pattern.sum(-1)), atol=1e-14)


def test_alpha_stats_ordered_and_in_range() -> None:
    model = _model(0, n_layers=1, n_heads=2, d_model=16)
    gen = torch.Generator().manual_seed(0)
    la = capture_gpt(model, torch.randint(0, 11, (2, 5), generator=gen), prefix=_prefix(model, "kv", 2, gen))[
        0
    ]
    for s in alpha_stats(la):
        assert 0 < s.min <= s.median <= s.max < 1


@pytest.mark.parametrize("delta", [0.01, 0.1])
def test_alpha_control_fails_by_measured_margin(delta: float) -> None:
    model = _model(1, n_layers=1, n_heads=4, d_model=32)
    gen = torch.Generator().manual_seed(1)
    la = capture_gpt(
        model, torch.randint(0, 11, (2, 6), generator=gen), prefix=_prefix(model, "hidden", 1, gen)
    )[0]
    res = check_alpha_control(la, delta=delta)
    assert all(r.control and not r.passed for r in res)
    assert min(r.max_abs_err for r in res) > 1e3 * max(r.tol for r in res)


def test_weight_update_controls_fail() -> None:
    """LoRA on W_Q/W_V and a full (rank-1 everywhere) update both break the per-layer identity."""
    model = _model(2, n_layers=2, n_heads=4, d_model=32)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 11, (2, 6), generator=gen)
    layers = capture_gpt(model, tokens, prefix=_prefix(model, "hidden", 2, gen))
    twin = copy.deepcopy(model)
    lora = make_method("lora", twin, rank=1, targets=("q", "v")).double()
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(0, 0.5, generator=gen)
    for la in layers:
        for adapted in (twin.blocks[la.layer].attn, perturbed_copy(model.blocks[la.layer].attn, seed=0)):
            res = check_weights_control(la, adapted)
            assert {r.kind for r in res} == {"control_weights_attention", "control_weights_output"}
            assert all(r.control and not r.passed and r.ok for r in res)
            assert min(r.margin for r in res) > 1e6
    # the unmodified module is no control at all: it matches exactly
    same = check_weights_control(layers[0], model.blocks[0].attn)
    assert all(r.max_abs_err == 0.0 for r in same)


def test_float32_within_relative_tolerance() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, d_vocab=11)).eval()
    gen = torch.Generator().manual_seed(0)
    prefix = [LayerPrefix(hidden=torch.randn(1, 3, 32, generator=gen)) for _ in range(2)]
    results = check_layers(capture_gpt(model, torch.randint(0, 11, (2, 8), generator=gen), prefix=prefix))
    assert all(r.ok for r in results)
    assert all(r.tol >= 1e-5 for r in results if not r.control)


def test_capture_refuses_train_mode() -> None:
    model = _model(0, n_layers=1, n_heads=2, d_model=16).train()
    with pytest.raises(ValueError, match="eval"):
        capture_gpt(model, torch.zeros(1, 3, dtype=torch.long))
