"""TransformerLens conventions: pre/post-rotary hooks, the indexable cache, run_with_hooks."""

from __future__ import annotations

import pytest
import torch

from ctxtune.model import GPT, LayerPrefix, ModelConfig
from ctxtune.model.gpt import apply_rotary, rotary_tables
from ctxtune.model.hooks import ActivationCache, act_name


def _model(pos: str) -> GPT:
    torch.manual_seed(4)
    return GPT(ModelConfig(n_layers=3, n_heads=2, d_model=16, n_ctx=32, pos=pos)).double().eval()


def test_hook_q_k_are_pre_rotary_and_rot_hooks_are_what_attention_uses() -> None:
    model = _model("rotary")
    tokens = torch.randint(0, 10, (2, 6))
    positions = torch.arange(3, 9).expand(2, 6)  # [batch, pos]
    _, cache = model.run_with_cache(tokens, position_ids=positions)
    attn = model.blocks[1].attn
    x = cache["normalized", 1, "ln1"]
    q_pre = attn.split_heads(attn.q_proj(x))  # [batch, pos, n_heads, d_head]
    k_pre = attn.split_heads(attn.k_proj(x))
    assert torch.allclose(cache["q", 1], q_pre, atol=1e-14) and torch.allclose(cache["k", 1], k_pre, atol=1e-14)
    cos, sin = rotary_tables(positions, attn.d_head, model.cfg.rotary_base)
    assert torch.allclose(cache["rot_q", 1], apply_rotary(q_pre, cos, sin), atol=1e-14)
    assert torch.allclose(cache["rot_k", 1], apply_rotary(k_pre, cos, sin), atol=1e-14)
    assert not torch.allclose(cache["rot_q", 1], cache["q", 1])  # positions 3.. really rotate
    scores = torch.einsum("bqhd,bkhd->bhqk", cache["rot_q", 1], cache["rot_k", 1]) / attn.d_head**0.5
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # [batch, n_heads, pos, pos]
    assert torch.allclose(cache["pattern", 1], expected, atol=1e-12)


@pytest.mark.parametrize("pos", ["learned", "none"])
def test_rot_hooks_equal_q_k_without_rotary(pos: str) -> None:
    model = _model(pos)
    _, cache = model.run_with_cache(torch.randint(0, 10, (1, 5)))
    for layer in range(3):
        assert torch.equal(cache["rot_q", layer], cache["q", layer])
        assert torch.equal(cache["rot_k", layer], cache["k", layer])


def test_prefix_hooks_hold_the_prefix_keys_unrotated() -> None:
    model = _model("rotary")
    key, value = torch.randn(1, 2, 3, 8, dtype=torch.float64), torch.randn(1, 2, 3, 8, dtype=torch.float64)
    prefix = [LayerPrefix(key=key, value=value), None, LayerPrefix(key=key, value=value)]
    _, cache = model.run_with_cache(torch.randint(0, 10, (2, 4)), prefix=prefix)
    assert torch.equal(cache["prefix_k", 0], key.transpose(1, 2).expand(2, -1, -1, -1))
    assert torch.equal(cache["prefix_v", 2], value.transpose(1, 2).expand(2, -1, -1, -1))
    assert ("prefix_k", 1) not in cache  # no prefix on layer 1: the hook does not fire
    assert cache["pattern", 0].shape[-1] == 3 + 4 and cache["pattern", 1].shape[-1] == 4


def test_cache_short_names_negative_layers_and_dict_behaviour(tiny_model: GPT) -> None:
    _, cache = tiny_model.run_with_cache(torch.randint(0, 10, (1, 5)))
    assert isinstance(cache, ActivationCache) and isinstance(cache, dict)
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["attn", 1] is cache["blocks.1.attn.hook_pattern"]  # TransformerLens alias
    assert cache["resid_pre", 1] is cache["blocks.1.hook_resid_pre"]
    assert cache["resid_post", -1] is cache["blocks.1.hook_resid_post"]
    assert cache["post", 0] is cache["blocks.0.mlp.hook_post"]
    assert cache["normalized", 0, "ln2"] is cache["blocks.0.ln2.hook_normalized"]
    assert cache["embed"] is cache["hook_embed"] and cache["normalized",] is cache["ln_final.hook_normalized"]
    assert ("z", 1) in cache and "blocks.1.attn.hook_z" in cache and ("z", 7) not in cache
    assert len(cache) == len(list(cache.keys())) == len(dict(cache.items()))
    with pytest.raises(KeyError, match="unknown activation name 'nonsense'"):
        cache["nonsense", 0]
    with pytest.raises(KeyError, match="per layer"):
        cache["pattern"]


def test_filtered_cache_names_what_is_missing(tiny_model: GPT) -> None:
    _, cache = tiny_model.run_with_cache(torch.randint(0, 10, (1, 5)), names_filter="blocks.0.attn.hook_z")
    assert list(cache) == ["blocks.0.attn.hook_z"]
    with pytest.raises(KeyError, match="names_filter"):
        cache["pattern", 0]


def test_act_name_matches_transformerlens_layout() -> None:
    assert act_name("q", 3) == "blocks.3.attn.hook_q"
    assert act_name("rot_k", 0) == "blocks.0.attn.hook_rot_k"
    assert act_name("attn_logits", 2) == "blocks.2.attn.hook_attn_scores"
    assert act_name("mlp_out", 1) == "blocks.1.hook_mlp_out"
    assert act_name("pos_embed") == "hook_pos_embed"


def test_run_with_hooks_patches_and_then_removes_hooks(tiny_model: GPT) -> None:
    tokens = torch.randint(0, 10, (2, 6))
    clean = tiny_model(tokens)
    seen: list[str] = []

    def zero_head_0(z: torch.Tensor, hook: object) -> torch.Tensor:
        seen.append(hook.name)  # type: ignore[attr-defined]
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    patched = tiny_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_0)])
    assert seen == ["blocks.1.attn.hook_z"] and not torch.allclose(patched, clean)
    by_filter = tiny_model.run_with_hooks(
        tokens, fwd_hooks=[(lambda name: name == "blocks.1.attn.hook_z", zero_head_0)]
    )
    assert torch.equal(by_filter, patched)
    assert torch.equal(tiny_model(tokens), clean), "hooks must be removed after run_with_hooks"
    with pytest.raises(KeyError, match="no hook point named 'blocks.9.attn.hook_z'"):
        tiny_model.run_with_hooks(tokens, fwd_hooks=[("blocks.9.attn.hook_z", zero_head_0)])


def test_a_hook_on_pre_rotary_q_changes_what_is_rotated() -> None:
    model = _model("rotary")
    tokens = torch.randint(0, 10, (1, 5))

    def double(q: torch.Tensor, hook: object) -> torch.Tensor:
        return 2 * q

    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_rot_q"])
    with model.hooks([("blocks.0.attn.hook_q", double)]):
        _, doubled = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_rot_q"])
    assert torch.allclose(doubled["rot_q", 0], 2 * cache["rot_q", 0], atol=1e-14)
