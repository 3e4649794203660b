"""Per-layer attention internals of a prefixed run, for the Section 4 checks.

One interface, `LayerAttention`, holds what a head saw and produced at one layer of a run with a
context method (a prefix or a leading soft prompt), restricted to the content queries:

    x          [batch, pos, d_model]                  attention input after the layer's norm
    q          [batch, n_heads, pos, d_head]          content queries (after rotary, if any: hook_rot_q)
    k, v       [batch, n_heads, pos, d_head]          content keys (after rotary: hook_rot_k) and values (GQA expanded)
    prefix_k   [batch, n_heads, n_virtual, d_head]    prefix keys (GQA expanded)
    prefix_v   [batch, n_heads, n_virtual, d_head]
    pattern    [batch, n_heads, pos, n_virtual + pos] softmax over prefix keys, then content keys
    z          [batch, pos, n_heads, d_head]          per-head output before W_O

plus `recompute(module=None)`, which runs the SAME layer's real attention module (or another model's
module for that layer, for the weight-update negative control) WITHOUT the prefix on the SAME input `x`
and the SAME content position ids, returning (pattern [batch, n_heads, pos, pos], z). Holding the
layer input and the position ids fixed is what the per-layer identity needs (paper.md §5).

A leading soft prompt is handled as a prefix: under causal masking the virtual tokens' hidden states
at every layer depend only on the soft prompt, so at each layer they act as fixed prefix keys/values
for the content queries. Their rows are dropped and their columns become the prefix columns.

Per model type, one capture function (`register_capture`): `capture_gpt` for our GPT (through hook
points); `ctxtune.hf.backbone` registers its own for Hugging Face causal LMs (through its recording
attention function). `capture_method` captures a method on whichever model it is attached to; this
module never imports the Hugging Face bridge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ctxtune.model.gpt import GPT, LayerPrefix

Recompute = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LayerAttention:
    """Attention internals of one layer (shapes in the module docstring)."""

    layer: int
    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    pattern: torch.Tensor
    z: torch.Tensor
    position_ids: torch.Tensor
    recompute: Recompute

    @property
    def n_virtual(self) -> int:
        return self.prefix_k.shape[2]

    @property
    def n_heads(self) -> int:
        return self.q.shape[1]


_GPT_HOOKS = (
    "ln1.hook_normalized",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
)
_GPT_PREFIX_HOOKS = ("attn.hook_prefix_k", "attn.hook_prefix_v")  # fire only on layers with a prefix


def _gpt_attention(attn: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run one of our Attention modules without prefix; returns (pattern, z) through its hooks."""
    seen: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hp: nn.Module) -> None:
        seen[hp.name.rsplit(".", 1)[-1]] = t.detach()

    hps = (attn.hook_pattern, attn.hook_z)
    for hp in hps:
        hp.add(keep)
    try:
        attn(x, position_ids, None)
    finally:
        for hp in hps:
            hp.clear()
    return seen["hook_pattern"], seen["hook_z"]


def _with_prefix(c: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Every key ("k") or value ("v") one layer attended to, prefix first: [batch, n_keys, n_heads, d_head]."""
    own = c["hook_rot_k"] if kind == "k" else c["hook_v"]  # [batch, seq, n_heads, d_head]
    prefix = c.get(f"hook_prefix_{kind}")  # [batch, n_virtual, n_heads, d_head] or absent
    return own if prefix is None else torch.cat([prefix, own], dim=1)


@torch.no_grad()
def capture_gpt(
    model: GPT,
    tokens: torch.Tensor | None = None,
    *,
    embeds: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    prefix: list[LayerPrefix | None] | None = None,
    n_soft: int = 0,
) -> list[LayerAttention]:
    """Capture every layer of a prefixed (or soft-prompted) run of our GPT.

    Args:
        model: the GPT (eval mode; dropout would break the identity).
        tokens: [batch, pos] ids, or
        embeds: [batch, n_soft + pos, d_model] input embeddings whose first n_soft rows are a soft prompt.
        position_ids: [batch, n_soft + pos]; default 0..; virtual tokens may use -1 (no position).
        prefix: one LayerPrefix (or None) per layer, as for `GPT.forward`.
        n_soft: leading soft-prompt positions to treat as prefix keys.

    Returns:
        One LayerAttention per layer. A layer without any prefix has n_virtual = 0.
    """
    if model.training:
        raise ValueError("put the model in eval mode: dropout breaks the identity")
    hooks = _GPT_HOOKS + _GPT_PREFIX_HOOKS
    names = [f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers) for h in hooks]
    _, cache = model.run_with_cache(
        tokens, embeds=embeds, position_ids=position_ids, prefix=prefix, names_filter=names
    )
    batch = cache["blocks.0.ln1.hook_normalized"].shape[0]
    seq = cache["blocks.0.ln1.hook_normalized"].shape[1]
    if position_ids is None:
        position_ids = model.default_position_ids(batch, seq, 0, cache["blocks.0.ln1.hook_normalized"].device)
    s = n_soft
    content_pos = position_ids[:, s:]  # [batch, pos]
    out = []
    for layer, block in enumerate(model.blocks):
        c = {h.rsplit(".", 1)[-1]: cache[f"blocks.{layer}.{h}"] for h in hooks if f"blocks.{layer}.{h}" in cache}
        k_all = _with_prefix(c, "k").transpose(1, 2)  # [batch, n_heads, n_keys, d_head] (post-rotary)
        v_all = _with_prefix(c, "v").transpose(1, 2)
        n_pre = k_all.shape[2] - seq  # prefix keys from LayerPrefix; soft positions come after
        x = c["hook_normalized"][:, s:]  # [batch, pos, d_model]
        attn = block.attn

        def recompute(
            module: nn.Module | None = None, _x: torch.Tensor = x, _attn: nn.Module = attn
        ) -> tuple:
            return _gpt_attention(module if module is not None else _attn, _x, content_pos)

        out.append(
            LayerAttention(
                layer=layer,
                x=x,
                q=c["hook_rot_q"][:, s:].transpose(1, 2),  # [batch, n_heads, pos, d_head]
                k=k_all[:, :, n_pre + s :],
                v=v_all[:, :, n_pre + s :],
                prefix_k=k_all[:, :, : n_pre + s].expand(batch, -1, -1, -1),
                prefix_v=v_all[:, :, : n_pre + s].expand(batch, -1, -1, -1),
                pattern=c["hook_pattern"][:, :, s:],  # [batch, n_heads, pos, n_virtual + pos]
                z=c["hook_z"][:, s:],
                position_ids=content_pos,
                recompute=recompute,
            )
        )
    return out


def capture_method(method: nn.Module, tokens: torch.Tensor) -> list[LayerAttention]:
    """Capture a ctxtune `Method` (prefix, prefix_kv, soft_prompt) on its model; tokens [batch, pos].

    Uses the method's own `prepare` (its position policy included) with adapter 0.

    Raises:
        ValueError: the method puts virtual tokens anywhere but before the content.
    """
    batch, seq = tokens.shape
    prep = method.prepare(tokens, None, seq)
    n_soft = 0
    if prep.embeds is not None:
        n_soft = prep.embeds.shape[1] - seq
        if not torch.equal(prep.out_index.cpu(), torch.arange(n_soft, n_soft + seq)):
            raise ValueError(f"method {method.key!r} does not place its virtual tokens before the content")
    capture = capture_for(method.model)
    with method.active(None):
        return capture(
            method.model,
            prep.tokens,
            embeds=prep.embeds,
            position_ids=prep.position_ids,
            prefix=prep.prefix,
            n_soft=n_soft,
        )


_CAPTURES: dict[type, Callable[..., list[LayerAttention]]] = {GPT: capture_gpt}


def register_capture(model_type: type, fn: Callable[..., list[LayerAttention]]) -> None:
    """Register how to capture a model type (the signature of `capture_gpt`)."""
    _CAPTURES[model_type] = fn


def capture_for(model: nn.Module) -> Callable[..., list[LayerAttention]]:
    """The capture function of `model`'s type; a type nobody registered is a ValueError."""
    for cls in type(model).__mro__:
        if cls in _CAPTURES:
            return _CAPTURES[cls]
    raise ValueError(f"no attention capture for {type(model).__name__}: ctxtune's GPT or ctxtune.hf.backbone models")
