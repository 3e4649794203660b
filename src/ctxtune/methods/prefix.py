"""Prefix-tuning in the paper's form: per layer, n_virtual hidden states that replace the attention
input at virtual positions.

Each layer l gets P vectors s_j^(l) in R^d_model; the layer's frozen pre-attention norm and key/value
projections turn them into keys K = W_K Norm(s) + b_K and values V = W_V Norm(s) + b_V (tied through
one vector, as in the authors' minGPT code). Prefix keys carry no position. Content queries attend to
the prefix and to the content; prefix positions are never queries (their outputs would only reach
placeholder positions, which the next layer overwrites).

Trainable: [n_adapters, n_layers, n_virtual, d_model]; closed form K * n_layers * n_virtual * d_model.
Initialisation: N(0, init_std^2), std 1 by default (the authors' randn). No identity initialisation.
Position policy: "keep" (default; content at 0..T-1) or "shift" (content at P..P+T-1, the authors'
layout, where pretraining data carried P placeholder tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ctxtune.errors import ConfigError
from ctxtune.limits import check_int64, is_finite_number
from ctxtune.methods.base import Method, MethodConfig, Prepared, check_n_virtual, check_position_policy
from ctxtune.methods.registry import register_method
from ctxtune.model.gpt import GPT, LayerPrefix


@dataclass(frozen=True)
class PrefixConfig(MethodConfig):
    n_virtual: int = 1
    position_policy: str = "keep"
    init_std: float = 1.0

    def __post_init__(self) -> None:
        check_virtual_options(self)


def check_virtual_options(config: Any) -> None:
    """Options of the virtual-token configs: n_virtual (a positive 64-bit integer), position_policy,
    init_std (finite, >= 0)."""
    check_n_virtual(config.n_virtual)
    check_int64(config.n_virtual, "n_virtual")
    check_position_policy(config.position_policy)
    if not (is_finite_number(config.init_std) and config.init_std >= 0):
        raise ConfigError(f"init_std must be a finite number >= 0, got {config.init_std!r}")


class PrefixBase(Method):
    """Shared by both prefix forms: token sequence unchanged, per-layer prefixes, position offset."""

    config: PrefixConfig

    def prefix_offset(self) -> int:
        return self.positions_added(self.config)

    @classmethod
    def positions_added(cls, config: PrefixConfig) -> int:  # type: ignore[override]
        return config.n_virtual if config.position_policy == "shift" else 0

    def layer_prefixes(self, adapter_ids: torch.Tensor | None) -> list[LayerPrefix | None]:
        raise NotImplementedError

    def prepare(self, tokens: torch.Tensor, adapter_ids: torch.Tensor | None, n_prompt: int) -> Prepared:
        batch, seq = tokens.shape
        positions = self.model.default_position_ids(batch, seq, self.prefix_offset(), tokens.device)
        prefix = self.layer_prefixes(adapter_ids)
        return Prepared(tokens, None, positions, prefix, torch.arange(seq, device=tokens.device))

    def content_offset(self, index: int, n_prompt: int) -> int:
        return self.prefix_offset()


@register_method
class Prefix(PrefixBase):
    key = "prefix"
    config_cls = PrefixConfig
    peft_type = "PREFIX_TUNING"  # exported as the keys and values the frozen model makes of the hidden states

    def __init__(self, model: GPT, config: PrefixConfig, n_adapters: int = 1) -> None:
        super().__init__(model, config, n_adapters)
        cfg = model.cfg
        self.hidden = nn.Parameter(torch.zeros(n_adapters, cfg.n_layers, config.n_virtual, cfg.d_model, **self.factory))
        gen = torch.Generator().manual_seed(0)
        for k in range(n_adapters):
            self.init_adapter(k, gen)

    def init_adapter(self, k: int, generator: torch.Generator) -> None:
        with torch.no_grad():
            noise = torch.randn(self.hidden.shape[1:], generator=generator, dtype=torch.float64)
            self.hidden[k] = noise.to(self.hidden.dtype) * self.config.init_std

    def expected_num_trainable(self) -> int:
        cfg = self.model.cfg
        return self.n_adapters * cfg.n_layers * self.config.n_virtual * cfg.d_model

    def layer_prefixes(self, adapter_ids: torch.Tensor | None) -> list[LayerPrefix | None]:
        hidden = self.select(self.hidden, adapter_ids)  # [batch or 1, n_layers, P, d_model]
        return [LayerPrefix(hidden=hidden[:, layer]) for layer in range(hidden.shape[1])]
