"""Named hooks on Hugging Face models (HFBackbone): the hook names of ctxtune's GPT with the same meaning, the
same ActivationCache, run_with_hooks; one analysis function runs on both model types."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctxtune.hf.backbone import HFBackbone, load_backbone
from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig
from ctxtune.model.hooks import ActivationCache

pytestmark = pytest.mark.hf
TOKENS = torch.randint(3, 48, (2, 9), generator=torch.Generator().manual_seed(3))


def attention_summary(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """One analysis script for any ctxtune model: read the cache by TransformerLens names, rebuild layer 0's head
    outputs from its pattern and values, and ablate head 0 of layer 0 with a hook."""
    logits, cache = model.run_with_cache(tokens)
    pattern, v, z = cache["pattern", 0], cache["v", 0], cache["z", 0]  # [b, h, q, k], [b, k, kvh, d], [b, q, h, d]
    v = v.repeat_interleave(pattern.shape[1] // v.shape[2], dim=2)  # [b, k, h, d]: grouped-query heads share values
    rebuilt = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    resid = cache["resid_post", -1]

    def zero_head_0(act: torch.Tensor, hook: object) -> torch.Tensor:
        act = act.clone()
        act[:, :, 0] = 0.0
        return act

    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_0)])
    return {
        "rows_sum_to_one": float((pattern.sum(-1) - 1).abs().max()),
        "z_rebuilt": float((rebuilt - z).abs().max()),
        "rot_differs_from_q": float((cache["rot_q", 0] - cache["q", 0]).abs().max()),
        "ablation_effect": float((ablated - logits).abs().max()),
        "resid_shape_ok": float(resid.shape == (*tokens.shape, resid.shape[-1])),
        "is_activation_cache": float(isinstance(cache, ActivationCache)),
    }


def test_one_analysis_runs_on_our_gpt_and_a_hugging_face_llama(llama_dir: Path) -> None:
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, d_vocab=64, pos="rotary")).double().eval()
    hf = load_backbone(str(llama_dir), torch.float64)
    for model in (gpt, hf):
        out = attention_summary(model, TOKENS)
        assert out["rows_sum_to_one"] < 1e-12 and out["z_rebuilt"] < 1e-12, out
        assert out["rot_differs_from_q"] > 1e-3 and out["ablation_effect"] > 1e-6, out  # rotary: rot_q is not q
        assert out["resid_shape_ok"] == 1.0 and out["is_activation_cache"] == 1.0


def test_hook_values_mean_what_the_hugging_face_model_computes(llama_dir: Path) -> None:
    model = load_backbone(str(llama_dir), torch.float64)
    hf = model.hf
    logits, cache = model.run_with_cache(TOKENS)
    with torch.no_grad():
        ref = hf(input_ids=TOKENS, output_hidden_states=True)
    assert torch.allclose(logits, ref.logits, atol=1e-12)
    assert torch.allclose(cache["resid_pre", 0], ref.hidden_states[0], atol=1e-12)
    assert torch.allclose(cache["resid_post", 0], ref.hidden_states[1], atol=1e-12)
    assert torch.allclose(cache["normalized"], ref.hidden_states[-1], atol=1e-12)  # HF's last state is after the norm
    assert torch.allclose(hf.lm_head(cache["normalized"]), logits, atol=1e-12)
    layer = hf.model.layers[0]
    x = layer.input_layernorm(cache["resid_pre", 0])
    assert torch.allclose(cache["normalized", 0, "ln1"], x, atol=1e-12)
    q = layer.self_attn.q_proj(x).view(2, 9, 4, 8)  # [b, pos, n_heads, d_head] BEFORE rotary
    k = layer.self_attn.k_proj(x).view(2, 9, 2, 8)  # [b, pos, n_kv_heads, d_head]
    assert torch.allclose(cache["q", 0], q, atol=1e-12) and torch.allclose(cache["k", 0], k, atol=1e-12)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = hf.model.rotary_emb(x, torch.arange(9)[None])
    rq, rk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [b, heads, pos, d_head]
    assert torch.allclose(cache["rot_q", 0], rq.transpose(1, 2), atol=1e-12)
    assert torch.allclose(cache["rot_k", 0], rk.transpose(1, 2), atol=1e-12)
    eager = load_backbone(str(llama_dir), torch.float64).hf
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(input_ids=TOKENS, output_attentions=True).attentions
    assert torch.allclose(cache["pattern", 1], attentions[1], atol=1e-12)
    assert torch.allclose(cache["attn_out", 0] + cache["resid_pre", 0], cache["resid_post", 0] - cache["mlp_out", 0],
                          atol=1e-12)


def test_replacing_activations_changes_the_forward_pass(llama_dir: Path) -> None:
    model = load_backbone(str(llama_dir), torch.float64)
    zero_z = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_z", lambda a, h: torch.zeros_like(a))])
    zero_out = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_attn_out", lambda a, h: torch.zeros_like(a))])
    assert torch.allclose(zero_z, zero_out, atol=1e-12)  # Llama's o_proj has no bias: the same intervention
    with torch.no_grad():
        plain = model(TOKENS)
    assert float((plain - zero_z).abs().max()) > 1e-4
    doubled = model.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda a, h: a)])
    assert torch.allclose(doubled, plain, atol=1e-12)  # the explicit softmax path equals the fused one
    assert not any(hp.active for hp in model.hook_dict.values())  # hooks are gone after the call
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.hf.modules())
    with pytest.raises(KeyError, match="no hook point named 'blocks.0.hook_resid_mid'"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_resid_mid", lambda a, h: None)])


def test_prefix_rows_never_reach_content_hooks(llama_dir: Path) -> None:
    model = load_backbone(str(llama_dir), torch.float64)
    method = make_method("prefix", model, n_virtual=3).double()
    method.init_adapter(0, torch.Generator().manual_seed(1))
    seen: dict[str, tuple] = {}

    def shape(a: torch.Tensor, hook: object) -> None:
        seen[hook.name] = tuple(a.shape)

    names = ["blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_k", "blocks.0.attn.hook_prefix_k",
             "blocks.0.attn.hook_pattern"]
    with model.hooks([(names, shape)]):
        method(TOKENS)
    assert seen == {names[0]: (2, 9, 32), names[1]: (2, 9, 2, 8), names[2]: (2, 3, 2, 8), names[3]: (2, 4, 9, 12)}


def test_gpt2_fused_projection_hooks(gpt2_dir: Path) -> None:
    model = load_backbone(str(gpt2_dir), torch.float64)
    assert isinstance(model, HFBackbone)
    _, cache = model.run_with_cache(TOKENS)
    x = cache["normalized", 0, "ln1"]
    q, k, v = model.hf.transformer.h[0].attn.c_attn(x).split(32, dim=-1)  # [b, pos, d_model] each
    assert torch.allclose(cache["q", 0], q.view(2, 9, 4, 8), atol=1e-12)
    assert torch.equal(cache["rot_q", 0], cache["q", 0]) and torch.equal(cache["rot_k", 0], cache["k", 0])
    out = attention_summary(model, TOKENS)
    assert out["z_rebuilt"] < 1e-12 and out["rot_differs_from_q"] == 0.0 and out["ablation_effect"] > 1e-6
