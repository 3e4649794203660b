"""A small decoder-only GPT with hook points at every activation.

Hook names follow TransformerLens (shapes in brackets):

    hook_embed                      [batch, pos, d_model]   token embeddings (or the given embeds)
    hook_pos_embed                  [batch, pos, d_model]   learned positional embeddings
    blocks.{l}.hook_resid_pre       [batch, pos, d_model]
    blocks.{l}.ln1.hook_normalized  [batch, pos, d_model]   the attention input (identity if no norm)
    blocks.{l}.attn.hook_q          [batch, pos, n_heads, d_head]        queries BEFORE rotary
    blocks.{l}.attn.hook_k          [batch, pos, n_heads, d_head]        keys BEFORE rotary
    blocks.{l}.attn.hook_v          [batch, pos, n_heads, d_head]
    blocks.{l}.attn.hook_rot_q      [batch, pos, n_heads, d_head]        queries that enter the scores
    blocks.{l}.attn.hook_rot_k      [batch, pos, n_heads, d_head]        keys that enter the scores
    blocks.{l}.attn.hook_prefix_k   [batch, n_virtual, n_heads, d_head]  prefix keys (only with a prefix)
    blocks.{l}.attn.hook_prefix_v   [batch, n_virtual, n_heads, d_head]  prefix values (only with a prefix)
    blocks.{l}.attn.hook_attn_scores[batch, n_heads, pos, n_keys]        scaled, masked logits
    blocks.{l}.attn.hook_pattern    [batch, n_heads, pos, n_keys]        softmax over all keys
    blocks.{l}.attn.hook_z          [batch, pos, n_heads, d_head]        per-head output before W_O
    blocks.{l}.attn.hook_result     [batch, pos, n_heads, d_model]       per-head output after W_O (no b_O)
    blocks.{l}.hook_attn_out        [batch, pos, d_model]
    blocks.{l}.hook_resid_mid       [batch, pos, d_model]
    blocks.{l}.ln2.hook_normalized  [batch, pos, d_model]
    blocks.{l}.mlp.hook_pre         [batch, pos, d_mlp]
    blocks.{l}.mlp.hook_post        [batch, pos, d_mlp]
    blocks.{l}.hook_mlp_out         [batch, pos, d_model]
    blocks.{l}.hook_resid_post      [batch, pos, d_model]
    ln_final.hook_normalized        [batch, pos, d_model]

As in TransformerLens, `hook_q`/`hook_k`/`hook_v` hold the current positions only (not cached keys) and
`hook_rot_q`/`hook_rot_k` the rotated queries and keys. TransformerLens has the rot hooks on rotary
models only; here every model has them, so analysis code reads one name whatever the positional scheme:
without rotary they hold the same values as `hook_q`/`hook_k` (nothing rotates them). A hook on
`hook_q`/`hook_k` that returns a tensor changes what gets rotated. The keys and values attended to are,
in order, `hook_prefix_k` (which carry no position, so they never rotate), the cached keys, then
`hook_rot_k`; `n_keys` counts them all. `cache["pattern", 0]` and the other TransformerLens short
names work on the cache that `run_with_cache` returns (see `ctxtune.model.hooks`).

When a hook observes the scores or the pattern, attention takes an explicit-softmax path; otherwise it
calls the fused `scaled_dot_product_attention`. Both give the same outputs (tested).

Prefixes enter through `LayerPrefix`: either hidden states (the paper's form: passed through the
frozen pre-attention norm and the key/value projections) or free keys and values (PEFT's form).
Prefix keys carry no position (no positional embedding, no rotation). Position ids are explicit;
an id of -1 means "no position" (no positional embedding, no rotation), used for virtual tokens
under the "keep" position policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctxtune.errors import CtxtuneError
from ctxtune.model.config import ModelConfig
from ctxtune.model.hooks import HookedModule, HookPoint


@dataclass
class LayerPrefix:
    """Virtual keys/values visible to every query of one layer.

    Exactly one form is set:
        hidden: [batch or 1, n_virtual, d_model], replaces the attention input (tied K/V, paper's form).
        key, value: [batch or 1, n_heads, n_virtual, d_head], free (PEFT's form).
    """

    hidden: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.hidden is None) == (self.key is None):
            raise ValueError("LayerPrefix needs exactly one of hidden or key/value")
        if (self.key is None) != (self.value is None):
            raise ValueError("LayerPrefix key and value go together")


@dataclass
class LayerCache:
    """Keys and values of positions already processed: [batch, n_heads, n_cached, d_head] each."""

    key: torch.Tensor
    value: torch.Tensor
    n_prefix: int  # leading cached keys that are prefix keys (always visible)


class KVCache:
    """Per-layer key/value cache for incremental greedy decoding."""

    def __init__(self, n_layers: int) -> None:
        self.layers: list[LayerCache | None] = [None] * n_layers

    @property
    def n_content(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first.key.shape[2] - first.n_prefix


class Norm(nn.Module):
    """LayerNorm, RMSNorm or identity, followed by `hook_normalized`."""

    def __init__(self, kind: str, d_model: int) -> None:
        super().__init__()
        self.kind = kind
        self.hook_normalized = HookPoint()
        if kind == "layernorm":
            self.norm: nn.Module = nn.LayerNorm(d_model)
        elif kind == "rmsnorm":
            self.norm = nn.RMSNorm(d_model, eps=1e-6)
        else:
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(self.norm(x))


def rotary_tables(position_ids: torch.Tensor, d_head: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [batch, pos, 1, d_head]; position id -1 gives the identity rotation."""
    inv_freq = base ** (-torch.arange(0, d_head, 2, device=position_ids.device, dtype=torch.float64) / d_head)
    pos = position_ids.clamp(min=0).to(torch.float64)
    angles = pos[..., None] * inv_freq  # [batch, pos, d_head/2]
    angles = torch.where(position_ids[..., None] < 0, torch.zeros_like(angles), angles)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [batch, pos, 1, d_head]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [batch, pos, n_heads, d_head] by the half-split RoPE convention (as Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with optional prefix keys/values and a KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.d_head = cfg.n_heads, cfg.head_dim
        inner = self.n_heads * self.d_head
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        for name in ("q", "k", "v", "rot_q", "rot_k", "prefix_k", "prefix_v", "z", "attn_scores", "pattern", "result"):
            setattr(self, f"hook_{name}", HookPoint())

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.n_heads, self.d_head)  # [batch, pos, n_heads, d_head]

    def prefix_kv(self, prefix: LayerPrefix, normed_hidden: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Prefix keys and values, [batch or 1, n_heads, n_virtual, d_head] each."""
        if prefix.key is not None:
            return prefix.key, prefix.value  # type: ignore[return-value]
        assert normed_hidden is not None
        k = self.split_heads(self.k_proj(normed_hidden)).transpose(1, 2)  # [b, n_heads, P, d_head]
        v = self.split_heads(self.v_proj(normed_hidden)).transpose(1, 2)  # [b, n_heads, P, d_head]
        return k, v

    def hooked_prefix_kv(
        self, prefix: LayerPrefix, normed_hidden: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values through `hook_prefix_k`/`hook_prefix_v`: [batch, n_heads, n_virtual, d_head]."""
        pk, pv = self.prefix_kv(prefix, normed_hidden)
        pk = self.hook_prefix_k(pk.expand(batch, -1, -1, -1).transpose(1, 2))  # [batch, P, n_heads, d_head]
        pv = self.hook_prefix_v(pv.expand(batch, -1, -1, -1).transpose(1, 2))
        return pk.transpose(1, 2), pv.transpose(1, 2)  # [batch, n_heads, P, d_head]

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        prefix: LayerPrefix | None = None,
        prefix_normed: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        batch, pos, _ = x.shape
        q = self.hook_q(self.split_heads(self.q_proj(x)))  # [batch, pos, n_heads, d_head]
        k = self.hook_k(self.split_heads(self.k_proj(x)))
        v = self.hook_v(self.split_heads(self.v_proj(x)))
        if self.cfg.pos == "rotary":
            cos, sin = rotary_tables(position_ids, self.d_head, self.cfg.rotary_base)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [batch, n_heads, pos, d_head]

        n_prefix, n_past = 0, 0
        past = cache.layers[layer] if cache is not None else None
        if past is not None:
            n_prefix, n_past = past.n_prefix, past.key.shape[2] - past.n_prefix
            k, v = torch.cat([past.key, k], dim=2), torch.cat([past.value, v], dim=2)
        elif prefix is not None:
            pk, pv = self.hooked_prefix_kv(prefix, prefix_normed, batch)
            n_prefix = pk.shape[2]
            k = torch.cat([pk, k], dim=2)  # [batch, n_heads, n_keys, d_head]
            v = torch.cat([pv, v], dim=2)
        if cache is not None:
            cache.layers[layer] = LayerCache(k, v, n_prefix)

        mask = self.causal_mask(pos, n_prefix, n_past, x.device)  # [pos, n_keys] True = attend
        qh = q.transpose(1, 2)  # [batch, n_heads, pos, d_head]
        if self.hook_attn_scores.active or self.hook_pattern.active:
            scores = qh @ k.transpose(-1, -2) / math.sqrt(self.d_head)  # [batch, n_heads, pos, n_keys]
            scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            if self.training and self.cfg.dropout > 0:
                pattern = F.dropout(pattern, self.cfg.dropout)
            z = pattern @ v  # [batch, n_heads, pos, d_head]
        else:
            drop = self.cfg.dropout if self.training else 0.0
            z = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, dropout_p=drop)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, n_heads, d_head]
        if self.hook_result.active:
            w_o = self.o_proj.weight.T.reshape(self.n_heads, self.d_head, -1)  # [n_heads, d_head, d_model]
            self.hook_result(torch.einsum("bphd,hdm->bphm", z, w_o))
        return self.o_proj(z.reshape(batch, pos, -1))  # [batch, pos, d_model]

    @staticmethod
    def causal_mask(pos: int, n_prefix: int, n_past: int, device: torch.device) -> torch.Tensor:
        """[pos, n_prefix + n_past + pos] bool: prefix keys always visible, content causally."""
        q_idx = torch.arange(pos, device=device)[:, None] + n_past
        k_idx = torch.arange(n_past + pos, device=device)[None, :]
        content = k_idx <= q_idx
        return torch.cat([torch.ones(pos, n_prefix, dtype=torch.bool, device=device), content], dim=1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.mlp_dim, cfg.d_model, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh") if cfg.act == "gelu" else nn.ReLU()
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.hook_post(self.act(self.hook_pre(self.fc_in(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.ln1 = Norm(cfg.norm if cfg.attn_norm else "none", cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = Norm(cfg.norm, cfg.d_model) if cfg.mlp else None
        self.mlp = MLP(cfg) if cfg.mlp else None
        self.drop = nn.Dropout(cfg.dropout)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        prefix: LayerPrefix | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        # The paper's tied prefix is a hidden state that replaces the attention input, so it passes
        # through this layer's (frozen) pre-attention norm before the key/value projections.
        prefix_normed = self.ln1.norm(prefix.hidden) if prefix is not None and prefix.hidden is not None else None
        attn = self.hook_attn_out(
            self.drop(self.attn(self.ln1(x), position_ids, prefix, prefix_normed, cache, self.layer))
        )
        x = self.hook_resid_mid(x + attn if self.cfg.residual else attn)
        if self.mlp is not None and self.ln2 is not None:
            out = self.hook_mlp_out(self.drop(self.mlp(self.ln2(x))))
            x = x + out if self.cfg.residual else out
        return self.hook_resid_post(x)


def check_token_ids(tokens: torch.Tensor, d_vocab: int) -> None:
    """Token ids must be in [0, d_vocab): one clear error instead of an index error deep in the embedding.

    Checked on CPU only: on an accelerator the read-back would sync every step (CUDA asserts anyway).
    """
    if tokens.is_cpu and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab):
        raise CtxtuneError(
            f"token id out of range: ids must be in [0, {d_vocab - 1}], "
            f"got min {int(tokens.min())}, max {int(tokens.max())}"
        )


class GPT(HookedModule):
    """Decoder-only transformer. `forward` returns logits [batch, pos, d_vocab]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model) if cfg.pos == "learned" else None
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = Norm(cfg.norm, cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.reset_parameters()
        self.setup_hooks()

    def reset_parameters(self) -> None:
        """N(0, 0.02) weights, zero biases; residual output projections scaled by 1/sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = (
                    0.02 / math.sqrt(2 * self.cfg.n_layers)
                    if name.endswith(("o_proj.weight", "fc_out.weight"))
                    else 0.02
                )
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def default_position_ids(self, batch: int, pos: int, offset: int, device: torch.device) -> torch.Tensor:
        return torch.arange(offset, offset + pos, device=device).expand(batch, pos)  # [batch, pos]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [batch, pos, d_model]; validates ids."""
        check_token_ids(tokens, self.cfg.d_vocab)
        return self.embed(tokens)

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prefix: list[LayerPrefix | None] | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [batch, pos, d_vocab] (or the final normalised hidden state if return_hidden).

        Args:
            tokens: [batch, pos] int64 ids; or
            embeds: [batch, pos, d_model] input embeddings (virtual tokens, soft prompts).
            position_ids: [batch, pos]; defaults to continuing after the cached positions. -1: no position.
            prefix: one LayerPrefix (or None) per layer.
            cache: a KVCache to read and extend (incremental decoding).
        """
        if (tokens is None) == (embeds is None):
            raise ValueError("pass exactly one of tokens or embeds")
        x = self.embed_tokens(tokens) if tokens is not None else embeds
        assert x is not None
        batch, pos, _ = x.shape
        if position_ids is None:
            offset = cache.n_content if cache is not None else 0
            position_ids = self.default_position_ids(batch, pos, offset, x.device)
        if self.cfg.pos == "learned" and position_ids.is_cpu and int(position_ids.max()) >= self.cfg.n_ctx:
            raise CtxtuneError(
                f"sequence too long: position {int(position_ids.max())} but the model has n_ctx={self.cfg.n_ctx}"
            )
        x = self.hook_embed(x)
        if self.pos_embed is not None:
            pe = self.pos_embed(position_ids.clamp(min=0)) * (position_ids >= 0)[..., None].to(x.dtype)
            x = x + self.hook_pos_embed(pe)
        x = self.drop(x)
        if prefix is not None and len(prefix) != self.cfg.n_layers:
            raise ValueError(f"prefix has {len(prefix)} layers, model has {self.cfg.n_layers}")
        for layer, block in enumerate(self.blocks):
            x = block(x, position_ids, prefix[layer] if prefix is not None else None, cache)
        x = self.ln_final(x)
        return x if return_hidden else self.unembed(x)

    def prefix_from_embeds(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> list[LayerPrefix]:
        """Each layer's keys and values of a run over `embeds` alone [K, P, d_model] (differentiable), as
        prefixes [K, n_heads, P, d_head]: what leading virtual tokens contribute, since they never see later
        tokens (a soft prompt computed once per batch instead of once per example)."""
        cache = self.new_cache()
        self(embeds=embeds, position_ids=position_ids, cache=cache, return_hidden=True)
        return [LayerPrefix(key=layer.key, value=layer.value) for layer in cache.layers]

    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding."""
        return KVCache(self.cfg.n_layers)

    def attention_modules(self) -> list[nn.Module]:
        """Each layer's attention module (the theory's weight control perturbs a copy of one)."""
        return [block.attn for block in self.blocks]

    def linear_sites(self, layer: int) -> dict[str, tuple[nn.Module, str]]:
        """The block's linear maps by role (q, k, v, o, mlp_in, mlp_out): (parent module, attribute)."""
        block = self.blocks[layer]
        sites = {"q": (block.attn, "q_proj"), "k": (block.attn, "k_proj"), "v": (block.attn, "v_proj"),
                 "o": (block.attn, "o_proj")}
        if block.mlp is not None:
            sites.update(mlp_in=(block.mlp, "fc_in"), mlp_out=(block.mlp, "fc_out"))
        return sites

    def num_parameters(self) -> int:
        """Unique parameters (tied tensors once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
