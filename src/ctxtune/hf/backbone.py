"""Hugging Face causal LMs as ctxtune models: every method of `ctxtune.methods` attaches to them unchanged.

`HFBackbone` wraps a Llama-family (Llama, Qwen2, Mistral, SmolLM2: `model.model.layers[l].self_attn` with
k_proj/v_proj, rotary, grouped-query attention) or GPT-2 (`model.transformer.h[l].attn`, fused c_attn,
learned absolute positions) model behind the interface the methods use on our GPT: `cfg`, `embed`,
`embed_tokens`, `default_position_ids`, `forward(tokens | embeds, position_ids, prefix, cache)`,
`new_cache()`, `linear_sites(layer)`. So one prefix, one prefix_kv, one soft prompt, one LoRA: the same
definitions train, evaluate and get checked on both.

How prefixes enter (not through past_key_values, which transformers 5.x is renaming): ctxtune registers one
attention function, "ctxtune_eager", in transformers' AttentionInterface and switches the model to it. Every
attention module calls it with its queries and keys/values after rotary and before the GQA expansion; the
function prepends the module's prefix keys/values for the current call (a `LayerPrefix`: the paper's tied
hidden states, passed through that layer's frozen input norm and k/v projections, or free keys/values sized
to the key/value heads), applies a causal softmax (prefix keys always visible) and, on request, records q, k,
v, pattern and z for the theory checks. It is eager attention plus a prefix, nothing else; when nothing
records, the fused kernel computes the same output.

Positions. Position ids are explicit; -1 means "no position" (ctxtune's "keep" policy for virtual tokens).
Under rotary that is position 0 (a rotation by zero is the identity: exact); under GPT-2's learned
positions the embedding of position 0 is subtracted from those rows before the model adds it back.
Prefix keys never carry a position. Limits: unpadded batches only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ctxtune.errors import ConfigError, CtxtuneError
from ctxtune.model.gpt import LayerPrefix
from ctxtune.theory.capture import LayerAttention, register_capture

ATTN_NAME = "ctxtune_eager"
_STATE = "_ctxtune_state"


# ----- the attention function --------------------------------------------------------------------------------
@dataclass
class _State:
    """Per attention module: how to turn a tied prefix into keys/values, this call's prefix, a recording slot."""

    kv_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    prefix: LayerPrefix | None = None
    record: dict[str, torch.Tensor] | None = None

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.prefix is None:
            return None
        if self.prefix.hidden is not None:
            return self.kv_fn(self.prefix.hidden)
        return self.prefix.key, self.prefix.value  # type: ignore[return-value]


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

    query [b, h, Tq, d]; key/value [b, kvh, Tk, d] (Tk includes cached positions).
    """
    state: _State | None = getattr(module, _STATE, None)
    batch, n_heads, tq, d_head = query.shape
    pre = state.prefix_kv() if state is not None else None
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
    if not recording:
        z = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=visible, dropout_p=dropout if module.training else 0.0, scale=scale,
            enable_gqa=True,
        )
        return z.transpose(1, 2).contiguous(), None  # [b, Tq, h, d]
    n_rep = n_heads // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)  # [b, h, n_keys, d]: head h reads kv head h // n_rep
    value = value.repeat_interleave(n_rep, dim=1)
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))  # [b, h, Tq, n_keys]
    pattern = scores.softmax(dim=-1)
    z = (nn.functional.dropout(pattern, p=dropout, training=module.training) @ value).transpose(1, 2).contiguous()
    state.record.update(q=query, k=key, v=value, pattern=pattern, z=z, n_pre=torch.tensor(n_pre))  # type: ignore[union-attr]
    return z, pattern  # z [b, Tq, h, d]


# ----- families -----------------------------------------------------------------------------------------------
@dataclass
class HFLayout:
    """Where a family keeps its layers, norms, projections and linear maps."""

    family: str
    attn: list[nn.Module]
    norms: list[nn.Module]
    blocks: list[nn.Module]
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    embed: nn.Module
    kv_fns: list[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    sites: dict[str, tuple[str, str]] = field(default_factory=dict)  # role -> (child, attribute) of a block

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


LLAMA_SITES = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
               "o": ("self_attn", "o_proj"), "mlp_in": ("mlp", "up_proj"), "mlp_gate": ("mlp", "gate_proj"),
               "mlp_out": ("mlp", "down_proj")}
GPT2_SITES = {"o": ("attn", "c_proj"), "mlp_in": ("mlp", "c_fc"), "mlp_out": ("mlp", "c_proj")}


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
        lay = HFLayout("llama", [la.self_attn for la in layers], [la.input_layernorm for la in layers], layers,
                       cfg.num_attention_heads, kvh, d_head, cfg.hidden_size, inner.embed_tokens, sites=LLAMA_SITES)
        lay.kv_fns = [_llama_kv(a, n, kvh, d_head) for a, n in zip(lay.attn, lay.norms, strict=True)]
        return lay
    tr = getattr(model, "transformer", None)
    if tr is not None and hasattr(tr, "h") and hasattr(tr.h[0].attn, "c_attn"):
        blocks = list(tr.h)
        nh = cfg.n_head
        d_head = cfg.n_embd // nh
        lay = HFLayout("gpt2", [b.attn for b in blocks], [b.ln_1 for b in blocks], blocks, nh, nh, d_head, cfg.n_embd,
                       tr.wte, sites=GPT2_SITES)
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
    """Restore the model's own attention implementation."""
    for attn in hf_layout(model).attn:
        if hasattr(attn, _STATE):
            delattr(attn, _STATE)
    prev = getattr(model, "_ctxtune_prev_attn", None)
    if prev is not None:
        model.set_attn_implementation(prev)
        del model._ctxtune_prev_attn


# ----- the backbone -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFConfig:
    """What methods and checks read from a model config, for a Hugging Face causal LM."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    head_dim: int
    mlp_dim: int
    d_vocab: int
    n_ctx: int
    pos: str  # "rotary" or "learned"
    tie_embeddings: bool
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"hf": True, **asdict(self)}

    # What `ctxtune.limits` reads of a ModelConfig for its memory estimates (a Llama's gated MLP has a third
    # matrix the estimate does not count: a lower bound by d_model * mlp_dim per layer).
    @property
    def mlp(self) -> bool:
        return True

    @property
    def attn_norm(self) -> bool:
        return True

    @property
    def norm(self) -> str:
        return "layernorm" if self.family == "gpt2" else "rmsnorm"

    @property
    def bias(self) -> bool:
        return self.family == "gpt2"


def hf_config(model: nn.Module, source: str = "") -> HFConfig:
    """The HFConfig of a loaded model (the family is recognised from its modules)."""
    lay = hf_layout(model)
    cfg = model.config
    mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * lay.d_model
    n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return HFConfig(lay.family, lay.n_layers, lay.n_heads, lay.n_kv_heads, lay.d_model, lay.d_head, int(mlp),
                    int(cfg.vocab_size), int(n_ctx), "rotary" if lay.family == "llama" else "learned", tied, source)


class HFBackbone(nn.Module):
    """A Hugging Face causal LM behind ctxtune's model interface (module docstring)."""

    def __init__(self, hf_model: nn.Module, source: str = "") -> None:
        super().__init__()
        self.hf = hf_model
        self.layout = enable(hf_model)
        self.cfg = hf_config(hf_model, source)
        self.embed = self.layout.embed
        self.blocks = self.layout.blocks
        # transformers 5.x renames `past_key_values` to `cache` (the old name goes in 5.40): use what this one has
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ----- what methods use --------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.is_cpu and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            raise CtxtuneError(f"token id out of range: ids must be in [0, {self.cfg.d_vocab - 1}], "
                               f"got min {int(tokens.min())}, max {int(tokens.max())}")
        return self.embed(tokens)

    def default_position_ids(self, batch: int, pos: int, offset: int, device: torch.device) -> torch.Tensor:
        return torch.arange(offset, offset + pos, device=device).expand(batch, pos)  # [batch, pos]

    def attention_modules(self) -> list[nn.Module]:
        """Each layer's attention module (the theory's weight control perturbs a copy of one)."""
        return list(self.layout.attn)

    def linear_sites(self, layer: int) -> dict[str, tuple[nn.Module, str]]:
        """The block's linear maps by role (q, k, v, o, mlp_in, mlp_gate, mlp_out): (parent module, attribute)."""
        block = self.blocks[layer]
        return {role: (getattr(block, child), attr) for role, (child, attr) in self.layout.sites.items()}

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prefix: list[LayerPrefix | None] | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """Logits [batch, pos, d_vocab]; arguments as for ctxtune's GPT.forward."""
        if (tokens is None) == (embeds is None):
            raise ValueError("pass exactly one of tokens or embeds")
        if prefix is not None and len(prefix) != self.cfg.n_layers:
            raise ValueError(f"prefix has {len(prefix)} layers, model has {self.cfg.n_layers}")
        x = self.embed_tokens(tokens) if tokens is not None else embeds
        batch, pos = x.shape[:2]
        if position_ids is None:
            offset = cache.get_seq_length() if cache is not None else 0
            position_ids = self.default_position_ids(batch, pos, offset, x.device)
        x, position_ids = self._no_position(x, position_ids)
        states = [getattr(attn, _STATE) for attn in self.layout.attn]
        for layer, st in enumerate(states):
            st.prefix = prefix[layer] if prefix is not None else None
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        try:
            out = self.hf(inputs_embeds=x, position_ids=position_ids, use_cache=cache is not None, **kwargs)
        finally:
            for st in states:
                st.prefix = None
        return out.logits

    def _no_position(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map position id -1 ("no position") to what the family can express exactly (module docstring)."""
        none = position_ids < 0
        if not bool(none.any()):
            return x, position_ids
        clamped = position_ids.clamp(min=0)
        if self.cfg.pos == "learned":
            wpe = self.hf.transformer.wpe(clamped)  # [batch, pos, d_model]
            x = x - wpe * none[..., None].to(x.dtype)
        return x, clamped


def capture_backbone(
    model: HFBackbone,
    tokens: torch.Tensor | None = None,
    *,
    embeds: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    prefix: list[LayerPrefix | None] | None = None,
    n_soft: int = 0,
) -> list[LayerAttention]:
    """Every layer's attention internals of one run (the `ctxtune.theory.capture` interface for HF models)."""
    if model.training:
        raise ValueError("put the model in eval mode: dropout breaks the identity")
    lay = model.layout
    calls: list[tuple[tuple, dict]] = [((), {})] * lay.n_layers
    handles = []
    for layer, attn in enumerate(lay.attn):
        getattr(attn, _STATE).record = {}

        def pre(_m: nn.Module, args: tuple, kwargs: dict, _layer: int = layer) -> None:
            calls[_layer] = (args, dict(kwargs))

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(tokens, embeds=embeds, position_ids=position_ids, prefix=prefix)
    finally:
        for h in handles:
            h.remove()
    if position_ids is None:
        n = (tokens if tokens is not None else embeds).shape  # type: ignore[union-attr]
        position_ids = model.default_position_ids(n[0], n[1], 0, next(model.parameters()).device)
    out = []
    for layer, attn in enumerate(lay.attn):
        st: _State = getattr(attn, _STATE)
        rec, st.record = st.record or {}, None
        args, kwargs = calls[layer]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        total, s, n_pre = hidden.shape[1], n_soft, int(rec["n_pre"])
        x = hidden[:, s:].contiguous()  # [batch, pos, d_model]
        kw = {k: _slice_seq(v, s, total) for k, v in kwargs.items()}
        rest = tuple(_slice_seq(a, s, total) for a in args[1:])
        out.append(LayerAttention(
            layer=layer, x=x, q=rec["q"][:, :, s:], k=rec["k"][:, :, n_pre + s:], v=rec["v"][:, :, n_pre + s:],
            prefix_k=rec["k"][:, :, : n_pre + s], prefix_v=rec["v"][:, :, : n_pre + s],
            pattern=rec["pattern"][:, :, s:], z=rec["z"][:, s:], position_ids=position_ids[:, s:],
            recompute=_recompute_fn(attn, x, rest, kw),
        ))
    return out


def _slice_seq(value: Any, start: int, total: int) -> Any:
    """Drop the first `start` sequence rows of tensors whose dim 1 has length `total` (recursively)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == total:
        return value[:, start:]
    if isinstance(value, tuple):
        return tuple(_slice_seq(v, start, total) for v in value)
    return value


def _recompute_fn(attn: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> Callable:
    """Run the layer's (or another model's same-layer) attention without prefix on the same input."""

    def recompute(module: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = attn if module is None else module
        st: _State | None = getattr(m, _STATE, None)
        if st is None:
            raise ValueError("the module is not switched to ctxtune's attention: call ctxtune.hf.backbone.enable")
        saved, st.prefix, st.record = st.prefix, None, {}
        try:
            with torch.no_grad():
                m(x, *args, **kwargs)
            rec = st.record
        finally:
            st.prefix, st.record = saved, None
        return rec["pattern"], rec["z"]

    return recompute


register_capture(HFBackbone, capture_backbone)


# ----- loading ------------------------------------------------------------------------------------------------
def load_backbone(source: str, dtype: torch.dtype = torch.float32) -> HFBackbone:
    """A Hugging Face causal LM (folder, .gguf file or "smollm2"), offline, wrapped for ctxtune's methods."""
    from ctxtune.hf.loading import load_model

    model, _ = load_model(source, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return HFBackbone(model, source).eval()


def hf_base_config(source: str) -> HFConfig:
    """The HFConfig of a Hugging Face base without loading its weights (a meta-device model)."""
    from ctxtune.hf.loading import load_config

    config = load_config(source)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"cannot build a causal LM from the config of {source}: {exc}") from None
    return hf_config(model, source)
