"""The GPT: hooks and shapes, fused vs explicit attention, causality, positions, KV cache."""

from __future__ import annotations

import pytest
import torch

from ctxtune.model import GPT, KVCache, LayerPrefix, ModelConfig

EXPECTED_HOOKS = {
    "hook_embed": ("batch", "pos", "d_model"),
    "hook_pos_embed": ("batch", "pos", "d_model"),
    "blocks.{l}.hook_resid_pre": ("batch", "pos", "d_model"),
    "blocks.{l}.ln1.hook_normalized": ("batch", "pos", "d_model"),
    "blocks.{l}.attn.hook_q": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{l}.attn.hook_k": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{l}.attn.hook_v": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{l}.attn.hook_rot_q": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{l}.attn.hook_rot_k": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{l}.attn.hook_attn_scores": ("batch", "n_heads", "pos", "keys"),
    "blocks.{l}.attn.hook_pattern": ("batch", "n_heads", "pos", "keys"),
    "blocks.{l}.attn.hook_z": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{l}.attn.hook_result": ("batch", "pos", "n_heads", "d_model"),
    "blocks.{l}.hook_attn_out": ("batch", "pos", "d_model"),
    "blocks.{l}.hook_resid_mid": ("batch", "pos", "d_model"),
    "blocks.{l}.ln2.hook_normalized": ("batch", "pos", "d_model"),
    "blocks.{l}.mlp.hook_pre": ("batch", "pos", "d_mlp"),
    "blocks.{l}.mlp.hook_post": ("batch", "pos", "d_mlp"),
    "blocks.{l}.hook_mlp_out": ("batch", "pos", "d_model"),
    "blocks.{l}.hook_resid_post": ("batch", "pos", "d_model"),
    "ln_final.hook_normalized": ("batch", "pos", "d_model"),
}
PREFIX_HOOKS = {
    "blocks.{l}.attn.hook_prefix_k": ("batch", "n_virtual", "n_heads", "d_head"),
    "blocks.{l}.attn.hook_prefix_v": ("batch", "n_virtual", "n_heads", "d_head"),
}


@pytest.mark.parametrize("n_virtual", [0, 3])
def test_every_hook_is_cached_with_its_documented_shape(tiny_model: GPT, n_virtual: int) -> None:
    cfg = tiny_model.cfg
    tokens = torch.randint(0, 10, (2, 7))
    prefix = None
    if n_virtual:
        prefix = [LayerPrefix(hidden=torch.randn(1, n_virtual, cfg.d_model, dtype=torch.float64))] * cfg.n_layers
    _, cache = tiny_model.run_with_cache(tokens, prefix=prefix)
    sizes = {
        "batch": 2,
        "pos": 7,
        "n_virtual": n_virtual,
        "keys": 7 + n_virtual,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_head": cfg.head_dim,
        "d_mlp": cfg.mlp_dim,
    }
    expected_names = set()
    for template, dims in (EXPECTED_HOOKS | (PREFIX_HOOKS if n_virtual else {})).items():
        for layer in range(cfg.n_layers) if "{l}" in template else [0]:
            name = template.format(l=layer)
            expected_names.add(name)
            assert tuple(cache[name].shape) == tuple(sizes[d] for d in dims), name
    assert expected_names == set(cache)


@pytest.mark.parametrize("pos", ["learned", "rotary", "none"])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_fused_and_explicit_attention_agree(pos: str, with_prefix: bool) -> None:
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, pos=pos)).double().eval()
    tokens = torch.randint(0, 10, (3, 9))
    prefix = [LayerPrefix(hidden=torch.randn(3, 2, 16, dtype=torch.float64)) for _ in range(2)] if with_prefix else None
    fused = model(tokens, prefix=prefix)
    with model.hooks([(lambda n: n.endswith("hook_pattern"), lambda x, hp: None)]):
        explicit = model(tokens, prefix=prefix)
    assert torch.allclose(fused, explicit, atol=1e-12, rtol=0)
    assert not any(hp.active for hp in model.hook_dict.values()), "hooks must be removed on exit"


def test_causality(tiny_model: GPT) -> None:
    tokens = torch.randint(0, 10, (1, 10))
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 10
    a, b = tiny_model(tokens), tiny_model(changed)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_kv_cache_matches_full_forward(pos: str) -> None:
    torch.manual_seed(2)
    model = GPT(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, pos=pos)).double().eval()
    tokens = torch.randint(0, 10, (2, 12))
    prefix = [
        LayerPrefix(
            key=torch.randn(1, 2, 3, 8, dtype=torch.float64), value=torch.randn(1, 2, 3, 8, dtype=torch.float64)
        )
        for _ in range(2)
    ]
    full = model(tokens, prefix=prefix)
    cache = KVCache(2)
    parts = [model(tokens[:, :5], prefix=prefix, cache=cache)]
    for i in range(5, 12):
        parts.append(model(tokens[:, i : i + 1], cache=cache))
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-12)


def test_no_position_id_removes_positional_embedding(tiny_model: GPT) -> None:
    emb = torch.randn(1, 3, tiny_model.cfg.d_model, dtype=torch.float64)
    _, cache = tiny_model.run_with_cache(embeds=emb, position_ids=torch.tensor([[-1, 0, -1]]))
    pe = cache["hook_pos_embed"]
    assert torch.equal(pe[0, 0], torch.zeros_like(pe[0, 0])) and torch.equal(pe[0, 2], pe[0, 0])
    assert torch.equal(pe[0, 1], tiny_model.pos_embed.weight[0])


def test_rotary_content_scores_are_shift_invariant() -> None:
    torch.manual_seed(3)
    model = GPT(ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=64, pos="rotary")).double().eval()
    tokens = torch.randint(0, 10, (1, 6))
    a, _ = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    _, ca = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    _, cb = model.run_with_cache(
        tokens, position_ids=torch.arange(7, 13)[None], names_filter="blocks.0.attn.hook_pattern"
    )
    assert torch.allclose(ca["blocks.0.attn.hook_pattern"], cb["blocks.0.attn.hook_pattern"], atol=1e-12)


def test_switches_change_structure() -> None:
    cfg = ModelConfig(n_layers=1, n_heads=1, d_model=8, n_ctx=8, norm="none", residual=False, mlp=False, pos="none")
    model = GPT(cfg).double()
    assert model.blocks[0].mlp is None and model.pos_embed is None
    no_attn_norm = GPT(ModelConfig(n_layers=1, n_heads=1, d_model=8, n_ctx=8, attn_norm=False))
    assert isinstance(no_attn_norm.blocks[0].ln1.norm, torch.nn.Identity)
    assert isinstance(no_attn_norm.blocks[0].ln2.norm, torch.nn.LayerNorm)
    # without residual the block output is the MLP output alone
    model2 = GPT(ModelConfig(n_layers=1, n_heads=1, d_model=8, n_ctx=8, residual=False)).double()
    _, cache = model2.run_with_cache(torch.randint(0, 10, (1, 4)))
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.0.hook_mlp_out"])


def test_tied_embeddings_counted_once() -> None:
    tied = GPT(ModelConfig(n_layers=1, n_heads=1, d_model=8, n_ctx=8, tie_embeddings=True))
    untied = GPT(ModelConfig(n_layers=1, n_heads=1, d_model=8, n_ctx=8))
    assert untied.num_parameters() - tied.num_parameters() == 10 * 8


def test_out_of_vocab_and_too_long_are_clear_errors(tiny_model: GPT) -> None:
    from ctxtune.errors import CtxtuneError

    with pytest.raises(CtxtuneError, match="token id out of range"):
        tiny_model(torch.tensor([[1, 12]]))
    with pytest.raises(CtxtuneError, match="sequence too long"):
        tiny_model(torch.zeros(1, 40, dtype=torch.long))
