"""The identity on tiny random HF models (Llama with GQA, GPT-2), attach mechanics, offline loading."""

from __future__ import annotations

import pytest
import torch

from ctxtune.errors import CtxtuneError
from ctxtune.hf import attach_prefix_kv, disable, enable, hf_layout, load_model, random_attachment
from ctxtune.theory import check_layers, check_weights_control
from ctxtune.theory.attention import perturbed_copy
from ctxtune.theory.cross_layer import cross_layer_changes

pytestmark = pytest.mark.hf


def _model(request: pytest.FixtureRequest, name: str, dtype: torch.dtype) -> torch.nn.Module:
    return request.getfixturevalue(name).to(dtype)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("method", ["prefix", "prefix_kv", "soft_prompt"])
@pytest.mark.parametrize("p", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_identity_on_hf(
    request: pytest.FixtureRequest, name: str, method: str, p: int, dtype: torch.dtype
) -> None:
    model = _model(request, name, dtype)
    att = random_attachment(model, method, p, seed=p)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    layers = att.capture(ids)
    lay = hf_layout(model)
    assert layers[0].pattern.shape == (2, lay.n_heads, 9, p + 9)
    assert layers[0].prefix_k.shape == (2, lay.n_heads, p, lay.d_head)  # GQA expanded
    results = check_layers(layers)
    for la in layers:
        results += check_weights_control(la, perturbed_copy(lay.attn[la.layer], seed=1))
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    limit = 1e-12 if dtype == torch.float64 else 1e-5
    assert max(r.max_abs_err / max(1.0, r.tol / limit) for r in results if not r.control) <= limit
    assert min(r.margin for r in results if r.control) > 100
    att.detach()


def test_gqa_sizes_and_rotary(tiny_llama: torch.nn.Module) -> None:
    lay = enable(tiny_llama)
    assert (lay.family, lay.n_heads, lay.n_kv_heads, lay.d_head) == ("llama", 6, 2, 8)
    with pytest.raises(CtxtuneError, match="shape"):
        attach_prefix_kv(tiny_llama, torch.zeros(2, 6, 1, 8), torch.zeros(2, 6, 1, 8))
    disable(tiny_llama)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_attached_without_prefix_equals_eager(request: pytest.FixtureRequest, name: str) -> None:
    model = _model(request, name, torch.float64)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        enable(model)
        ours = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        att = random_attachment(model, "prefix", 2, seed=0)
        changed = att.forward(ids)
        att.detach()
        back = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert torch.allclose(ours, ref, atol=1e-12)
    assert (changed - ref).abs().max() > 1e-3
    assert torch.allclose(back, ref, atol=1e-12)
    assert model.config._attn_implementation == "eager"


def test_cross_layer_on_hf(tiny_llama: torch.nn.Module) -> None:
    model = tiny_llama.double()
    att = random_attachment(model, "prefix", 3, seed=0)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    changes = cross_layer_changes(att.capture(ids), att.capture_base(ids))
    assert max(c.max_abs_change for c in changes if c.layer == 0) < 1e-12
    assert max(c.max_abs_change for c in changes if c.layer == 1) > 1e-6


def test_load_model_folder_and_errors(tiny_gpt2: torch.nn.Module, tmp_path: object) -> None:
    folder = tmp_path / "gpt2"  # type: ignore[operator]
    tiny_gpt2.save_pretrained(folder)
    model, _ = load_model(str(folder), torch.float64)
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float64
    with pytest.raises(CtxtuneError, match="not found"):
        load_model(str(folder / "missing"))
    with pytest.raises(CtxtuneError, match="neither"):
        load_model(str(tmp_path))
    with pytest.raises(CtxtuneError):
        random_attachment(model, "suffix", 1)
