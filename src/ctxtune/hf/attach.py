"""Attach context methods to Hugging Face causal LMs, and capture their attention internals.

Families: Llama-like (Llama, Qwen2, Mistral, SmolLM2: `model.model.layers[l].self_attn` with
k_proj/v_proj, rotary, grouped-query attention) and GPT-2 (`model.transformer.h[l].attn` with a fused
c_attn, learned absolute positions).

How: not through past_key_values (transformers 5.x is renaming it to `cache`, and PEFT's prefix path
breaks with it). Instead ctxtune registers one attention function, "ctxtune_eager", in transformers'
AttentionInterface and switches the model to it. Every attention module calls it with its queries and
its keys/values after rotary and before the GQA expansion; the function prepends the module's prefix
keys/values (if any), applies an explicit causal softmax (prefix keys always visible) and, on request,
records q, k, v, pattern and z. It is eager attention plus a prefix, nothing else.

Forms (per layer l, P = n_virtual):
    prefix      hidden [n_layers, P, d_model]: the paper's tied prefix, passed through layer l's frozen
                input norm and k/v projections (and k_norm where the family has one) at every call.
    prefix_kv   key, value [n_layers, n_kv_heads, P, d_head]: free K/V (PEFT's form), GQA-sized.
    soft_prompt embeds [P, d_model] prepended to the token embeddings.

Positions (explicit position ids). Prefix keys carry no position (no rotation; GPT-2 prefixes get no
position embedding). With positions="keep" content stays at 0..T-1 (a soft prompt's virtual tokens
take ids 0..P-1, since HF position ids cannot say "no position"); with positions="shift" content sits
at P..P+T-1 (PEFT's and the authors' convention). Limits: unpadded batches only (the function builds
its own causal mask), no sliding window, no KV cache (use_cache=False).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ctxtune.errors import CtxtuneError
from ctxtune.theory.capture import LayerAttention

ATTN_NAME = "ctxtune_eager"
_STATE = "_ctxtune_state"
METHODS = ("prefix", "prefix_kv", "soft_prompt")


@dataclass
class _State:
    """Per attention module: its prefix (if any) and an optional recording slot."""

    kv_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    hidden: torch.Tensor | None = None  # [1, P, d_model]
    key: torch.Tensor | None = None  # [1, n_kv_heads, P, d_head]
    value: torch.Tensor | None = None
    enabled: bool = True
    record: dict[str, torch.Tensor] | None = None

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.enabled:
            return None
        if self.hidden is not None:
            return self.kv_fn(self.hidden)
        if self.key is not None and self.value is not None:
            return self.key, self.value
        return None


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention with an optional prefix: explicit softmax when recording, else fused.

    query [b, h, Tq, d]; key/value [b, kvh, Tk, d].
    """
    state: _State | None = getattr(module, _STATE, None)
    batch, n_heads, tq, d_head = query.shape
    pre = state.prefix() if state is not None else None
    n_pre = 0
    if pre is not None:
        pk, pv = (t.to(key.dtype).expand(batch, -1, -1, -1) for t in pre)  # [b, kvh, P, d]
        n_pre = pk.shape[2]
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)  # [b, kvh, P + Tk, d]
    scale = d_head**-0.5 if scaling is None else scaling
    tk = key.shape[2] - n_pre
    q_idx = torch.arange(tq, device=query.device)[:, None] + (tk - tq)
    visible = torch.arange(tk, device=query.device)[None, :] <= q_idx  # [Tq, Tk]
    visible = torch.cat([torch.ones(tq, n_pre, dtype=torch.bool, device=query.device), visible], dim=1)
    recording = state is not None and state.record is not None
    if not recording and attention_mask is None:
        # Nothing observes the pattern: the fused kernel (GQA-aware) gives the same output, faster.
        z = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=visible, dropout_p=dropout if module.training else 0.0, scale=scale,
            enable_gqa=True,
        )
        return z.transpose(1, 2).contiguous(), None  # [b, Tq, h, d]
    n_rep = n_heads // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)  # [b, h, n_keys, d]: head h reads kv head h // n_rep
    value = value.repeat_interleave(n_rep, dim=1)
    scores = query @ key.transpose(-1, -2) * scale  # [b, h, Tq, n_keys]
    scores = scores.masked_fill(~visible, float("-inf"))
    if attention_mask is not None:  # only reached if a caller passes a prepared 4-D mask
        m = attention_mask[..., -tk:]
        scores[..., n_pre:] = (
            scores[..., n_pre:].masked_fill(~m, float("-inf"))
            if m.dtype == torch.bool
            else (scores[..., n_pre:] + m)
        )
    pattern = scores.softmax(dim=-1)
    pattern_d = nn.functional.dropout(pattern, p=dropout, training=module.training)
    z = (pattern_d @ value).transpose(1, 2).contiguous()  # [b, Tq, h, d]
    if state is not None and state.record is not None:
        state.record.update(q=query, k=key, v=value, pattern=pattern, z=z, n_pre=torch.tensor(n_pre))
    return z, pattern


@dataclass
class HFLayout:
    """Where a family keeps its layers, norms and projections."""

    family: str
    attn: list[nn.Module]
    norms: list[nn.Module]
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    embed: nn.Module
    kv_fns: list[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.attn)


def _llama_kv(attn: nn.Module, norm: nn.Module, kvh: int, d_head: int) -> Callable:
    def kv(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = norm(hidden)
        k = attn.k_proj(h).view(*h.shape[:2], kvh, d_head)  # [b, P, kvh, d_head]
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        v = attn.v_proj(h).view(*h.shape[:2], kvh, d_head)
        return k.transpose(1, 2), v.transpose(1, 2)  # [b, kvh, P, d_head]

    return kv


def _gpt2_kv(attn: nn.Module, norm: nn.Module, n_heads: int, d_head: int) -> Callable:
    def kv(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = attn.c_attn(norm(hidden)).split(n_heads * d_head, dim=2)  # [b, P, d_model] each
        k = k.view(*k.shape[:2], n_heads, d_head).transpose(1, 2)  # [b, n_heads, P, d_head]
        v = v.view(*v.shape[:2], n_heads, d_head).transpose(1, 2)
        return k, v

    return kv


def hf_layout(model: nn.Module) -> HFLayout:
    """Recognise the family of a causal LM; raises CtxtuneError for an unsupported one."""
    cfg = model.config
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(inner.layers[0], "self_attn"):
        layers = list(inner.layers)
        attn0 = layers[0].self_attn
        if not hasattr(attn0, "k_proj"):
            raise CtxtuneError(f"unsupported attention module {type(attn0).__name__}")
        kvh = cfg.num_key_value_heads or cfg.num_attention_heads
        d_head = attn0.head_dim
        lay = HFLayout(
            "llama",
            [la.self_attn for la in layers],
            [la.input_layernorm for la in layers],
            cfg.num_attention_heads,
            kvh,
            d_head,
            cfg.hidden_size,
            inner.embed_tokens,
        )
        lay.kv_fns = [_llama_kv(a, n, kvh, d_head) for a, n in zip(lay.attn, lay.norms, strict=True)]
        return lay
    tr = getattr(model, "transformer", None)
    if tr is not None and hasattr(tr, "h") and hasattr(tr.h[0].attn, "c_attn"):
        blocks = list(tr.h)
        nh = cfg.n_head
        d_head = cfg.n_embd // nh
        lay = HFLayout(
            "gpt2", [b.attn for b in blocks], [b.ln_1 for b in blocks], nh, nh, d_head, cfg.n_embd, tr.wte
        )
        lay.kv_fns = [_gpt2_kv(a, n, nh, d_head) for a, n in zip(lay.attn, lay.norms, strict=True)]
        return lay
    raise CtxtuneError(f"unsupported model class {type(model).__name__}: Llama-like and GPT-2 families only")


def enable(model: nn.Module) -> HFLayout:
    """Switch `model` to the ctxtune attention function (idempotent); modules start without prefix."""
    from transformers import AttentionInterface

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, _attention)
    lay = hf_layout(model)
    if model.config._attn_implementation != ATTN_NAME:
        model._ctxtune_prev_attn = model.config._attn_implementation  # type: ignore[assignment]
        model.set_attn_implementation(ATTN_NAME)
    for attn, kv in zip(lay.attn, lay.kv_fns, strict=True):
        if getattr(attn, _STATE, None) is None:
            setattr(attn, _STATE, _State(kv_fn=kv))
    return lay


def disable(model: nn.Module) -> None:
    """Remove every prefix and restore the previous attention implementation."""
    for attn in hf_layout(model).attn:
        if hasattr(attn, _STATE):
            delattr(attn, _STATE)
    prev = getattr(model, "_ctxtune_prev_attn", None)
    if prev is not None:
        model.set_attn_implementation(prev)
        del model._ctxtune_prev_attn


class Attachment:
    """A context method attached to a HF causal LM. `forward` gives content logits [batch, pos, d_vocab]."""

    def __init__(
        self,
        model: nn.Module,
        method: str,
        n_virtual: int,
        soft: torch.Tensor | None = None,
        positions: str = "keep",
    ) -> None:
        if positions not in ("keep", "shift"):
            raise CtxtuneError(f"positions must be 'keep' or 'shift', got {positions!r}")
        self.model, self.method, self.n_virtual, self.soft, self.positions = (
            model,
            method,
            n_virtual,
            soft,
            positions,
        )
        self.layout = enable(model)

    def inputs(self, input_ids: torch.Tensor) -> dict[str, Any]:
        """Model keyword arguments for content ids [batch, pos] (explicit position ids, no cache)."""
        batch, pos = input_ids.shape
        p = self.n_virtual
        offset = p if self.positions == "shift" else 0
        content = torch.arange(offset, offset + pos, device=input_ids.device).expand(
            batch, pos
        )  # [batch, pos]
        if self.soft is None:
            return {"input_ids": input_ids, "position_ids": content, "use_cache": False}
        embeds = self.layout.embed(input_ids)  # [batch, pos, d_model]
        soft = self.soft.to(embeds.dtype).expand(batch, -1, -1)  # [batch, P, d_model]
        virtual = torch.arange(p, device=input_ids.device).expand(batch, p)
        return {
            "inputs_embeds": torch.cat([soft, embeds], 1),
            "position_ids": torch.cat([virtual, content], 1),
            "use_cache": False,
        }

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(**self.inputs(input_ids)).logits
        return logits[:, self.n_virtual :] if self.soft is not None else logits

    def capture(self, input_ids: torch.Tensor) -> list[LayerAttention]:
        kw = self.inputs(input_ids)
        n_soft = self.n_virtual if self.soft is not None else 0
        return capture_layers(
            self.model,
            kw.get("input_ids"),
            inputs_embeds=kw.get("inputs_embeds"),
            position_ids=kw["position_ids"],
            n_soft=n_soft,
        )

    def capture_base(self, input_ids: torch.Tensor) -> list[LayerAttention]:
        """The unadapted model on the content alone, same content position ids (cross-layer baseline)."""
        kw = self.inputs(input_ids)
        n_soft = self.n_virtual if self.soft is not None else 0
        states = [getattr(a, _STATE) for a in self.layout.attn]
        saved = [st.enabled for st in states]
        for st in states:
            st.enabled = False
        try:
            return capture_layers(self.model, input_ids, position_ids=kw["position_ids"][:, n_soft:])
        finally:
            for st, on in zip(states, saved, strict=True):
                st.enabled = on

    def detach(self) -> None:
        disable(self.model)


def _check(t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise CtxtuneError(f"{what} has shape {list(t.shape)}, the model needs {list(shape)}")


def attach_prefix(model: nn.Module, hidden: torch.Tensor, positions: str = "keep") -> Attachment:
    """Tied prefix: hidden [n_layers, P, d_model] through each layer's frozen norm and k/v projections."""
    lay = enable(model)
    _check(hidden, (lay.n_layers, hidden.shape[1], lay.d_model), "prefix hidden")
    for layer, attn in enumerate(lay.attn):
        st = getattr(attn, _STATE)
        st.hidden, st.key, st.value = hidden[layer : layer + 1], None, None  # [1, P, d_model]
    return Attachment(model, "prefix", hidden.shape[1], positions=positions)


def attach_prefix_kv(
    model: nn.Module, key: torch.Tensor, value: torch.Tensor, positions: str = "keep"
) -> Attachment:
    """Free K/V prefix: key, value [n_layers, n_kv_heads, P, d_head] (no rotation)."""
    lay = enable(model)
    shape = (lay.n_layers, lay.n_kv_heads, key.shape[2], lay.d_head)
    _check(key, shape, "prefix key")
    _check(value, shape, "prefix value")
    for layer, attn in enumerate(lay.attn):
        st = getattr(attn, _STATE)
        st.hidden, st.key, st.value = None, key[layer][None], value[layer][None]  # [1, kvh, P, d_head]
    return Attachment(model, "prefix_kv", key.shape[2], positions=positions)


def attach_soft_prompt(model: nn.Module, embeds: torch.Tensor, positions: str = "keep") -> Attachment:
    """Soft prompt: embeds [P, d_model] prepended to the token embeddings."""
    lay = enable(model)
    _check(embeds, (embeds.shape[0], lay.d_model), "soft prompt")
    return Attachment(model, "soft_prompt", embeds.shape[0], soft=embeds[None], positions=positions)


@torch.no_grad()
def random_attachment(
    model: nn.Module, method: str, length: int, seed: int = 0, positions: str = "keep"
) -> Attachment:
    """A seeded random prefix or soft prompt of `length` virtual tokens at the model's own scale.

    prefix: hidden states ~ N(0, 1) (the layer norm fixes the scale). prefix_kv: keys and values made
    from two independent random hidden states, so they are free (untied) but content-sized. soft_prompt:
    rows ~ N(0, std of the embedding matrix).
    """
    if method not in METHODS:
        raise CtxtuneError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if length < 1:
        raise CtxtuneError(f"--length must be at least 1, got {length}")
    lay = enable(model)
    gen = torch.Generator().manual_seed(seed)
    dtype = lay.embed.weight.dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if method == "prefix":
        return attach_prefix(model, randn(lay.n_layers, length, lay.d_model), positions)
    if method == "prefix_kv":
        keys, values = [], []
        for kv in lay.kv_fns:
            keys.append(kv(randn(1, length, lay.d_model))[0][0])  # [kvh, P, d_head]
            values.append(kv(randn(1, length, lay.d_model))[1][0])
        return attach_prefix_kv(model, torch.stack(keys), torch.stack(values), positions)
    std = float(lay.embed.weight.std())
    return attach_soft_prompt(model, randn(length, lay.d_model) * std, positions)


def _slice_seq(value: Any, start: int, total: int) -> Any:
    """Drop the first `start` sequence rows of tensors whose dim 1 has length `total` (recursively)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == total:
        return value[:, start:]
    if isinstance(value, tuple):
        return tuple(_slice_seq(v, start, total) for v in value)
    return value


@torch.no_grad()
def capture_layers(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    n_soft: int = 0,
) -> list[LayerAttention]:
    """Run the model once and return every layer's LayerAttention (see ctxtune.theory.capture)."""
    if model.training:
        raise ValueError("put the model in eval mode: dropout breaks the identity")
    lay = enable(model)
    calls: list[tuple[tuple, dict]] = [((), {})] * lay.n_layers
    handles = []
    for layer, attn in enumerate(lay.attn):
        getattr(attn, _STATE).record = {}

        def pre(_m: nn.Module, args: tuple, kwargs: dict, _layer: int = layer) -> None:
            calls[_layer] = (args, dict(kwargs))

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer, attn in enumerate(lay.attn):
        st: _State = getattr(attn, _STATE)
        rec, st.record = st.record or {}, None
        args, kwargs = calls[layer]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        args = args[1:]
        total, s, n_pre = hidden.shape[1], n_soft, int(rec["n_pre"])
        x = hidden[:, s:].contiguous()  # [batch, pos, d_model]
        kw = {k: _slice_seq(v, s, total) for k, v in kwargs.items()}
        rest = tuple(_slice_seq(a, s, total) for a in args)
        out.append(
            LayerAttention(
                layer=layer,
                x=x,
                q=rec["q"][:, :, s:],
                k=rec["k"][:, :, n_pre + s :],
                v=rec["v"][:, :, n_pre + s :],
                prefix_k=rec["k"][:, :, : n_pre + s],
                prefix_v=rec["v"][:, :, : n_pre + s],
                pattern=rec["pattern"][:, :, s:],
                z=rec["z"][:, s:],
                position_ids=position_ids[:, s:] if position_ids is not None else torch.empty(0),
                recompute=_recompute_fn(attn, x, rest, kw),
            )
        )
    return out


def _recompute_fn(attn: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> Callable:
    def recompute(module: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = attn if module is None else module
        st: _State | None = getattr(m, _STATE, None)
        if st is None:
            raise ValueError("call ctxtune.hf.attach.enable(model) on the model owning this module first")
        enabled, st.enabled, st.record = st.enabled, False, {}
        try:
            with torch.no_grad():
                m(x, *args, **kwargs)
            rec = st.record
        finally:
            st.enabled, st.record = enabled, None
        return rec["pattern"], rec["z"]

    return recompute
