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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ctxtune.errors import ConfigError, CtxtuneError
from ctxtune.model.gpt import LayerPrefix, check_token_ids
from ctxtune.model.hooks import HookedModule, HookPoint
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
    keep_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the call's own keys and values
    hooks: dict[str, HookPoint] | None = None  # active named hooks of this layer's attention (HFBackbone.hooks)
    in_prefix: bool = False  # the layer's norm and projections are making prefix keys/values (hooks stay quiet)

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.prefix is None:
            return None
        if self.prefix.hidden is not None:
            self.in_prefix = True
            try:
                return self.kv_fn(self.prefix.hidden)
            finally:
                self.in_prefix = False
        return self.prefix.key, self.prefix.value  # type: ignore[return-value]

    def hook(self, name: str, x: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
        """Pass x [b, heads, n, d] through the named hook as [b, n, heads, d] (TransformerLens's layout), if active."""
        hp = self.hooks.get(name) if self.hooks else None
        if hp is None:
            return x
        return hp(x.transpose(heads_dim, 2)).transpose(heads_dim, 2)


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
    live = state if state is not None and state.hooks else None  # named hooks of this layer (HFBackbone.hooks)
    if live is not None:
        query = live.hook("rot_q", query)
        current = live.hook("rot_k", key[:, :, -tq:])  # this call's keys; cached keys come before them
        key = torch.cat([key[:, :, :-tq], current], dim=2)
    if state is not None and state.keep_kv is not None:
        state.keep_kv.append((key, value))  # [b, kvh, Tk, d]: rotated, not yet expanded to the query heads
    pre = state.prefix_kv() if state is not None else None
    n_pre = 0
    if pre is not None:
        pk, pv = (t.to(key.dtype).expand(batch, -1, -1, -1) for t in pre)  # [b, kvh, P, d]
        if live is not None:
            pk, pv = live.hook("prefix_k", pk), live.hook("prefix_v", pv)
        n_pre = pk.shape[2]
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)  # [b, kvh, P + Tk, d]
    scale = d_head**-0.5 if scaling is None else scaling
    tk = key.shape[2] - n_pre
    q_idx = torch.arange(tq, device=query.device)[:, None] + (tk - tq)
    visible = torch.arange(tk, device=query.device)[None, :] <= q_idx  # [Tq, Tk]
    visible = torch.cat([torch.ones(tq, n_pre, dtype=torch.bool, device=query.device), visible], dim=1)
    recording = state is not None and state.record is not None
    explicit = recording or (live is not None and bool({"attn_scores", "pattern"} & set(live.hooks or {})))
    if not explicit:
        z = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=visible, dropout_p=dropout if module.training else 0.0, scale=scale,
            enable_gqa=True,
        )
        z = z.transpose(1, 2).contiguous()  # [b, Tq, h, d]
        return (live.hooks["z"](z) if live is not None and "z" in live.hooks else z), None  # type: ignore[index]
    n_rep = n_heads // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)  # [b, h, n_keys, d]: head h reads kv head h // n_rep
    value = value.repeat_interleave(n_rep, dim=1)
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))  # [b, h, Tq, n_keys]
    hooks = live.hooks if live is not None else {}
    scores = hooks["attn_scores"](scores) if "attn_scores" in hooks else scores  # type: ignore[index]
    pattern = scores.softmax(dim=-1)
    pattern = hooks["pattern"](pattern) if "pattern" in hooks else pattern  # type: ignore[index]
    z = (nn.functional.dropout(pattern, p=dropout, training=module.training) @ value).transpose(1, 2).contiguous()
    z = hooks["z"](z) if "z" in hooks else z  # type: ignore[index]
    if recording:
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


# ----- named hooks ----------------------------------------------------------------------------------------------
ATTN_HOOKS = ("q", "k", "v", "rot_q", "rot_k", "prefix_k", "prefix_v", "attn_scores", "pattern", "z")
IN_FUNCTION = ("rot_q", "rot_k", "prefix_k", "prefix_v", "attn_scores", "pattern", "z")  # inside `_attention`
BLOCK_HOOKS = ("resid_pre", "attn_out", "mlp_out", "resid_post")


def hook_names(n_layers: int) -> list[str]:
    """The hook points of an HFBackbone, named as on ctxtune's GPT (`ctxtune.model.gpt`)."""
    names = ["hook_embed"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.ln1.hook_normalized"]
        names += [f"blocks.{layer}.attn.hook_{h}" for h in ATTN_HOOKS]
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.ln2.hook_normalized",
                  f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_resid_post"]
    return [*names, "ln_final.hook_normalized"]


@dataclass
class _HookModules:
    """The Hugging Face modules whose inputs or outputs the named hooks read, per layer."""

    ln2: list[nn.Module]
    mlps: list[nn.Module]
    final_norm: nn.Module


def _hook_modules(model: nn.Module, lay: HFLayout) -> _HookModules:
    if lay.family == "gpt2":
        return _HookModules([b.ln_2 for b in lay.blocks], [b.mlp for b in lay.blocks], model.transformer.ln_f)
    return _HookModules([b.post_attention_layernorm for b in lay.blocks], [b.mlp for b in lay.blocks], model.model.norm)


def _replace_output(hp: HookPoint, state: _State | None = None) -> Callable:
    """A torch forward hook that passes a module's output (or the first item of a tuple) through `hp`."""

    def fn(_m: nn.Module, _args: Any, out: Any) -> Any:
        if state is not None and state.in_prefix:
            return None
        if isinstance(out, tuple):
            return (hp(out[0]), *out[1:])
        return hp(out)

    return fn


def _replace_heads(hps: list[HookPoint], widths: list[int], d_head: int, state: _State) -> Callable:
    """A torch forward hook on a projection whose output [b, pos, sum(widths)] holds one or more per-head tensors
    (q; k; v; or GPT-2's fused q, k, v): each goes through its hook point as [b, pos, heads, d_head]."""

    def fn(_m: nn.Module, _args: Any, out: torch.Tensor) -> Any:
        if state.in_prefix:
            return None
        if out.dim() == 4:  # a per-head norm's output (q_norm, k_norm): already [b, pos, heads, d_head]
            return hps[0](out)
        parts = []
        for hp, part in zip(hps, out.split(widths, dim=-1), strict=True):
            heads = part.view(*part.shape[:-1], -1, d_head)  # [b, pos, heads, d_head]
            parts.append(hp(heads).reshape(part.shape))  # [b, pos, heads * d_head]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    return fn


def _replace_first_input(hp: HookPoint) -> Callable:
    """A torch forward pre-hook (with kwargs) that passes a layer's hidden-state input through `hp`."""

    def fn(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (hp(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hp(kwargs["hidden_states"])}

    return fn


def _projection_hooks(backbone: HFBackbone, layer: int, active: Callable[[str], HookPoint | None],
                      state: _State) -> list[Any]:
    """hook_q, hook_k, hook_v of one layer: on the projections as they are now (a LoRA's wrappers included), or on
    q_norm/k_norm where the family normalises queries and keys per head before rotary."""
    lay, handles = backbone.layout, []
    attn = lay.attn[layer]
    if lay.family == "gpt2":
        hps = [active(f"attn.hook_{h}") for h in ("q", "k", "v")]
        if any(hps):
            quiet = [hp or HookPoint() for hp in hps]
            width = lay.n_heads * lay.d_head
            handles.append(attn.c_attn.register_forward_hook(_replace_heads(quiet, [width] * 3, lay.d_head, state)))
        return handles
    sites = backbone.linear_sites(layer)
    for short, role, norm in (("q", "q", "q_norm"), ("k", "k", "k_norm"), ("v", "v", None)):
        hp = active(f"attn.hook_{short}")
        if hp is None:
            continue
        parent, attr = sites[role]
        module = getattr(attn, norm) if norm and hasattr(attn, norm) else getattr(parent, attr)
        heads = lay.n_heads if short == "q" else lay.n_kv_heads
        handles.append(module.register_forward_hook(_replace_heads([hp], [heads * lay.d_head], lay.d_head, state)))
    return handles


def wire_hooks(backbone: HFBackbone) -> list[Any]:
    """Install torch hooks for the hook points that have functions now; returns the handles to remove."""
    lay, mods = backbone.layout, backbone._hook_mods
    handles: list[Any] = []

    def on(name: str) -> HookPoint | None:
        hp = backbone.hook_dict[name]
        return hp if hp.active else None

    for layer in range(lay.n_layers):
        state: _State = getattr(lay.attn[layer], _STATE)

        def active(short: str, _layer: int = layer) -> HookPoint | None:
            return on(f"blocks.{_layer}.{short}")

        inside = {h: hp for h in IN_FUNCTION if (hp := active(f"attn.hook_{h}")) is not None}
        state.hooks = inside or None
        if hp := active("hook_resid_pre"):
            handles.append(lay.blocks[layer].register_forward_pre_hook(_replace_first_input(hp), with_kwargs=True))
        if hp := active("ln1.hook_normalized"):
            handles.append(lay.norms[layer].register_forward_hook(_replace_output(hp, state)))
        handles += _projection_hooks(backbone, layer, active, state)
        for hp, module in ((active("hook_attn_out"), lay.attn[layer]), (active("ln2.hook_normalized"), mods.ln2[layer]),
                           (active("hook_mlp_out"), mods.mlps[layer]), (active("hook_resid_post"), lay.blocks[layer])):
            if hp is not None:
                handles.append(module.register_forward_hook(_replace_output(hp)))
    if hp := on("ln_final.hook_normalized"):
        handles.append(mods.final_norm.register_forward_hook(_replace_output(hp)))
    return handles


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

    # What the memory estimates (ctxtune.limits) read of a model config: a Hugging Face decoder has an MLP,
    # normalisation before attention, and (for the estimate) biases.
    mlp: bool = True
    attn_norm: bool = True
    bias: bool = True
    norm: str = "rmsnorm"

    def to_dict(self) -> dict[str, Any]:
        return {"hf": True, **asdict(self)}


def hf_config(model: nn.Module, source: str = "") -> HFConfig:
    """The HFConfig of a loaded model (the family is recognised from its modules)."""
    lay = hf_layout(model)
    cfg = model.config
    mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * lay.d_model
    n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    llama = lay.family == "llama"
    return HFConfig(lay.family, lay.n_layers, lay.n_heads, lay.n_kv_heads, lay.d_model, lay.d_head, int(mlp),
                    int(cfg.vocab_size), int(n_ctx), "rotary" if llama else "learned", tied, source,
                    norm="rmsnorm" if llama else "layernorm")


class HFBackbone(HookedModule):
    """A Hugging Face causal LM behind ctxtune's model interface (module docstring), with ctxtune's named hooks:
    `run_with_cache`, `run_with_hooks` and `hooks()` under the hook names of ctxtune's GPT (docs/hooks.md)."""

    def __init__(self, hf_model: nn.Module, source: str = "") -> None:
        super().__init__()
        self.hf = hf_model
        self.layout = enable(hf_model)
        self.cfg = hf_config(hf_model, source)
        self.embed = self.layout.embed
        self.blocks = self.layout.blocks
        self.hook_dict = {name: HookPoint() for name in hook_names(self.layout.n_layers)}  # not submodules
        for name, hp in self.hook_dict.items():
            hp.name = name
        self._hook_mods = _hook_modules(hf_model, self.layout)
        # transformers 5.x renames `past_key_values` to `cache` (the old name goes in 5.40): use what this one has
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ----- what methods use --------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        check_token_ids(tokens, self.cfg.d_vocab)
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

    def prefix_from_embeds(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> list[LayerPrefix]:
        """Each layer's keys and values of a run over `embeds` alone [K, P, d_model] (differentiable), as
        prefixes [K, n_kv_heads, P, d_head] (see GPT.prefix_from_embeds)."""
        x, position_ids = self._no_position(embeds, position_ids)
        states = [getattr(attn, _STATE) for attn in self.layout.attn]
        for st in states:
            st.keep_kv = []
        try:
            self.hf.base_model(inputs_embeds=x, position_ids=position_ids, use_cache=False)
            return [LayerPrefix(key=st.keep_kv[0][0], value=st.keep_kv[0][1]) for st in states]  # type: ignore[index]
        finally:
            for st in states:
                st.keep_kv = None

    @contextmanager
    def hooks(self, fwd_hooks: Any = ()) -> Iterator[HFBackbone]:
        """Named hooks for the duration of the block (as `HookedModule.hooks`): the Hugging Face modules get torch
        hooks only for the hook points in use, and lose them on exit."""
        with HookedModule.hooks(self, fwd_hooks):
            handles = wire_hooks(self)
            try:
                yield self
            finally:
                for handle in handles:
                    handle.remove()
                for attn in self.layout.attn:
                    getattr(attn, _STATE).hooks = None

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
        if self.hook_dict["hook_embed"].active:
            x = self.hook_dict["hook_embed"](x)
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
