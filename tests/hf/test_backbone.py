"""Hugging Face models behind ctxtune's model interface: the same methods, the identity, training, decoding."""

from __future__ import annotations

import pytest
import torch

from ctxtune.errors import ConfigError, CtxtuneError
from ctxtune.hf import HFBackbone, disable, hf_layout, load_model
from ctxtune.methods import make_method
from ctxtune.theory import capture_method, check_layers, check_weights_control
from ctxtune.theory.attention import perturbed_copy
from ctxtune.theory.capture import capture_for
from ctxtune.theory.cross_layer import cross_layer_changes

pytestmark = pytest.mark.hf


def _backbone(request: pytest.FixtureRequest, name: str, dtype: torch.dtype) -> HFBackbone:
    return HFBackbone(request.getfixturevalue(name).to(dtype)).eval()


def _method(model: HFBackbone, key: str, p: int, seed: int, **options: object) -> object:
    method = make_method(key, model, n_virtual=p, **options)
    method.init_adapter(0, torch.Generator().manual_seed(seed))
    return method.to(next(model.parameters()).dtype)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("method", ["prefix", "prefix_kv", "soft_prompt"])
@pytest.mark.parametrize("p", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_identity_on_hf(request: pytest.FixtureRequest, name: str, method: str, p: int, dtype: torch.dtype) -> None:
    model = _backbone(request, name, dtype)
    m = _method(model, method, p, seed=p)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    layers = capture_method(m, ids)
    lay = model.layout
    assert layers[0].pattern.shape == (2, lay.n_heads, 9, p + 9)
    assert layers[0].prefix_k.shape == (2, lay.n_heads, p, lay.d_head)  # GQA expanded
    results = check_layers(layers)
    for la in layers:
        results += check_weights_control(la, perturbed_copy(lay.attn[la.layer], seed=1))
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    limit = 1e-12 if dtype == torch.float64 else 1e-5
    assert max(r.max_abs_err / max(1.0, r.tol / limit) for r in results if not r.control) <= limit
    assert min(r.margin for r in results if r.control) > 100


def test_gqa_sizes_counts_and_rotary(tiny_llama: torch.nn.Module) -> None:
    model = HFBackbone(tiny_llama)
    assert (model.cfg.family, model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.head_dim) == ("llama", 6, 2, 8)
    kv = make_method("prefix_kv", model, n_virtual=3)
    assert kv.num_trainable() == kv.expected_num_trainable() == 2 * 2 * 3 * 2 * 8  # sized to the kv heads
    lora = make_method("lora", model, rank=2, targets=["q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out"])
    assert lora.num_trainable() == lora.expected_num_trainable()
    lora.detach()
    assert make_method("prefix", model, n_virtual=2).num_trainable() == 2 * 2 * 48


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_no_method_equals_eager_and_methods_detach(request: pytest.FixtureRequest, name: str) -> None:
    hf = request.getfixturevalue(name).double()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos, use_cache=False).logits
        model = HFBackbone(hf).eval()
        ours = model(ids, position_ids=pos)
        changed = _method(model, "prefix", 2, seed=0)(ids)
        back = model(ids, position_ids=pos)
    assert torch.allclose(ours, ref, atol=1e-12)
    assert (changed - ref).abs().max() > 1e-3
    assert torch.allclose(back, ref, atol=1e-12)
    disable(hf)
    assert hf.config._attn_implementation == "eager"


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("key", ["prefix", "prefix_kv", "soft_prompt", "suffix", "lora"])
def test_greedy_decoding_with_cache_equals_teacher_forcing(request: pytest.FixtureRequest, name: str, key: str) -> None:
    """The KV-cached greedy decode (the evaluator's) agrees with one teacher-forced pass on HF models too."""
    if key == "lora" and name == "tiny_gpt2":
        options: dict = {"targets": ["o", "mlp_in", "mlp_out"]}
    else:
        options = {"targets": ["q", "v"]} if key == "lora" else {"n_virtual": 3}
    model = _backbone(request, name, torch.float64)
    method = make_method(key, model, **options)
    method.init_adapter(0, torch.Generator().manual_seed(1))
    if key == "lora":
        with torch.no_grad():
            for b in method.B.values():
                b.normal_(generator=torch.Generator().manual_seed(2))
    method.double()
    prompt = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(0))
    out = method.generate(prompt, 4)
    logits = method(torch.cat([prompt, out], dim=1)[:, :-1], n_prompt=5)  # [3, 8, vocab]
    assert torch.equal(logits[:, 4:].argmax(-1), out)


def test_lora_target_gpt2_fused_qkv_is_refused(tiny_gpt2: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="does not exist on this model"):
        make_method("lora", HFBackbone(tiny_gpt2), targets=["q"])


def test_position_id_minus_one_means_no_position_on_gpt2(tiny_gpt2: torch.nn.Module) -> None:
    """Position id -1 ("no position", the keep policy's virtual tokens) on learned positions: that row enters the
    first block without a position embedding; the others with theirs."""
    model = HFBackbone(tiny_gpt2.double()).eval()
    x = torch.randn(1, 3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    handle = tiny_gpt2.transformer.h[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(embeds=x, position_ids=torch.tensor([[-1, 0, 1]]))
    handle.remove()
    wpe = tiny_gpt2.transformer.wpe.weight
    expected = torch.stack([x[0, 0], x[0, 1] + wpe[0], x[0, 2] + wpe[1]])
    assert torch.allclose(seen[0][0], expected, atol=1e-12)


def test_cross_layer_on_hf(tiny_llama: torch.nn.Module) -> None:
    model = HFBackbone(tiny_llama.double()).eval()
    method = _method(model, "prefix", 3, seed=0)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    layers = capture_method(method, ids)
    base = capture_for(model)(model, ids, position_ids=layers[0].position_ids)
    changes = cross_layer_changes(layers, base)
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
    assert hf_layout(model).family == "gpt2"


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("policy", ["keep", "shift"])
def test_precomputed_soft_prompt_on_hf(request: pytest.FixtureRequest, name: str, policy: str) -> None:
    """The soft prompt run once as a key/value prefix equals the spliced sequence on Hugging Face models."""
    model = _backbone(request, name, torch.float64)
    plain = make_method("soft_prompt", model, 2, n_virtual=4, position_policy=policy).double()
    fast = make_method("soft_prompt", model, 2, n_virtual=4, position_policy=policy, precompute=True).double()
    fast.load_adapter_state(plain.adapter_state())
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    route = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        assert torch.allclose(plain(ids, route), fast(ids, route), atol=1e-10, rtol=0)
        assert torch.equal(plain.generate(ids[:, :4], 3, route), fast.generate(ids[:, :4], 3, route))
