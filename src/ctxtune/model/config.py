"""Model configuration: a frozen, validated dataclass.

Dimension glossary used across ctxtune (shape comments use these names):
`batch, pos, d_model, n_heads, d_head, d_mlp, d_vocab, n_ctx, n_layers`, plus `n_virtual` (P) for the
virtual tokens of a soft prompt, prefix or suffix, and `n_adapters` (K) for an adapter bank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ctxtune.configs import strict_from_dict
from ctxtune.errors import ConfigError
from ctxtune.limits import check_int64, check_memory, is_finite_number, model_parameters

PosScheme = Literal["learned", "rotary", "none"]
NormKind = Literal["layernorm", "rmsnorm", "none"]
ActKind = Literal["gelu", "relu"]


@dataclass(frozen=True)
class ModelConfig:
    """A small decoder-only GPT.

    Attributes:
        n_layers: transformer blocks.
        n_heads: attention heads per block.
        d_model: residual stream width.
        d_mlp: MLP hidden width (0 means 4 * d_model).
        n_ctx: largest number of positions (content and virtual tokens that take a position).
        d_vocab: vocabulary size.
        d_head: per-head width (0 means d_model // n_heads).
        norm: normalisation of every norm site; "none" removes all of them (constructions).
        attn_norm: keep the pre-attention norm; False removes it alone, as the paper's experiment 02 does
            (the prefix then enters attention unnormalised) while the pre-MLP and final norms stay.
        residual: residual connections; False makes each sublayer replace the stream (constructions).
        mlp: include the MLP sublayer.
        pos: positional scheme: learned absolute embeddings, rotary on queries and keys, or none.
        act: MLP non-linearity. "gelu" is the tanh approximation, as in GPT-2 and minGPT.
        bias: biases in the attention and MLP projections.
        dropout: dropout on attention probabilities and sublayer outputs (training mode only).
        rotary_base: RoPE base frequency.
        tie_embeddings: share W_E with the unembedding.
    """

    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_mlp: int = 0
    n_ctx: int = 64
    d_vocab: int = 10
    d_head: int = 0
    norm: NormKind = "layernorm"
    attn_norm: bool = True
    residual: bool = True
    mlp: bool = True
    pos: PosScheme = "learned"
    act: ActKind = "gelu"
    bias: bool = True
    dropout: float = 0.0
    rotary_base: float = 10000.0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.norm not in ("layernorm", "rmsnorm", "none"):
            raise ConfigError(f"model.norm must be layernorm, rmsnorm or none, got {self.norm!r}")
        if self.pos not in ("learned", "rotary", "none"):
            raise ConfigError(f"model.pos must be learned, rotary or none, got {self.pos!r}")
        if self.act not in ("gelu", "relu"):
            raise ConfigError(f"model.act must be gelu or relu, got {self.act!r}")
        if not (is_finite_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not (is_finite_number(self.rotary_base) and self.rotary_base > 0):
            raise ConfigError(f"model.rotary_base must be a finite number > 0, got {self.rotary_base}")
        if self.pos == "rotary" and self.head_dim % 2 != 0:
            raise ConfigError(f"rotary positions need an even d_head, got {self.head_dim}")
        self._check_memory()

    def _check_sizes(self) -> None:
        """Integer sizes: positive (d_mlp, d_head: >= 0, 0 picks the default) and within 64 bits."""
        for name in ("n_layers", "n_heads", "d_model", "n_ctx", "d_vocab", "d_mlp", "d_head"):
            value = getattr(self, name)
            low = 0 if name in ("d_mlp", "d_head") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "an integer >= 0 (0 picks the default)" if low == 0 else "a positive integer"
                raise ConfigError(f"model.{name} must be {kind}, got {value!r}")
            check_int64(value, f"model.{name}")
        if self.d_head == 0 and self.d_model % self.n_heads != 0:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    def _check_memory(self) -> None:
        """Refuse a model whose float32 weights alone exceed this machine's memory."""
        n = model_parameters(self)
        check_memory(
            4 * n,
            f"a model with d_model={self.d_model}, n_layers={self.n_layers}, d_vocab={self.d_vocab}",
            f"{n:.3g} float32 weights",
        )

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads (no grouped-query attention here: one per query head)."""
        return self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp or 4 * self.d_model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a mapping, rejecting unknown keys and wrongly typed values by name."""
        return strict_from_dict(cls, data, "model")
