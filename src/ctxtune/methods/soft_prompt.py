"""Soft prompt (prompt tuning, Lester et al. 2021): n_virtual free input embeddings before the input.

Trainable: [n_adapters, n_virtual, d_model]; closed form K * n_virtual * d_model. Acts on the input
embeddings only; every deeper activation is computed by the frozen model. No identity
initialisation exists (any virtual token changes the logits). Position policy: "keep" (default:
virtual tokens take no position, content keeps 0..T-1) or "shift" (virtual tokens at 0..P-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctxtune.errors import ConfigError
from ctxtune.methods.base import Method, MethodConfig, Prepared
from ctxtune.methods.prefix import check_virtual_options
from ctxtune.methods.registry import register_method
from ctxtune.methods.splice import splice, splice_offset
from ctxtune.model.gpt import GPT, LayerPrefix


@dataclass(frozen=True)
class SoftPromptConfig(MethodConfig):
    n_virtual: int = 1
    position_policy: str = "keep"
    init: str = "vocab"  # "vocab": embeddings of random tokens; "randn": N(0, init_std^2)
    init_std: float = 1.0
    precompute: bool = False  # run the virtual tokens once per batch and feed the content their keys/values

    def __post_init__(self) -> None:
        check_virtual_options(self)
        if self.init not in ("vocab", "randn"):
            raise ConfigError(f"soft prompt init must be 'vocab' or 'randn', got {self.init!r}")
        if not isinstance(self.precompute, bool):
            raise ConfigError(f"soft prompt precompute must be true or false, got {self.precompute!r}")


@register_method
class SoftPrompt(Method):
    key = "soft_prompt"
    config_cls = SoftPromptConfig
    peft_type = "PROMPT_TUNING"
    config: SoftPromptConfig

    def __init__(self, model: GPT, config: SoftPromptConfig, n_adapters: int = 1) -> None:
        super().__init__(model, config, n_adapters)
        self.virtual = nn.Parameter(torch.zeros(n_adapters, config.n_virtual, model.cfg.d_model, **self.factory))
        gen = torch.Generator().manual_seed(0)
        for k in range(n_adapters):
            self.init_adapter(k, gen)

    def init_adapter(self, k: int, generator: torch.Generator) -> None:
        with torch.no_grad():
            if self.config.init == "vocab":
                ids = torch.randint(0, self.model.cfg.d_vocab, (self.config.n_virtual,), generator=generator)
                self.virtual[k] = self.model.embed.weight[ids].to(self.virtual.dtype)
            else:
                noise = torch.randn(self.virtual.shape[1:], generator=generator, dtype=torch.float64)
                self.virtual[k] = noise.to(self.virtual.dtype) * self.config.init_std

    def expected_num_trainable(self) -> int:
        return self.n_adapters * self.config.n_virtual * self.model.cfg.d_model

    def prepare(self, tokens: torch.Tensor, adapter_ids: torch.Tensor | None, n_prompt: int) -> Prepared:
        if self.config.precompute:
            return self.prepare_precomputed(tokens, adapter_ids)
        return splice(self.model, tokens, self.select(self.virtual, adapter_ids), 0, self.config.position_policy)

    def prepare_precomputed(self, tokens: torch.Tensor, adapter_ids: torch.Tensor | None) -> Prepared:
        """The same computation as the spliced sequence, in two passes: the virtual tokens come first and never
        see the content, so every layer's keys and values of theirs are the same for every example. Run them
        once per adapter (not once per example), then the content with those keys/values as a prefix. Exact up
        to float rounding (tested); faster when n_virtual is large against the content."""
        batch, seq = tokens.shape
        K, P = self.virtual.shape[:2]
        shift = self.config.position_policy == "shift"
        own = torch.arange(P, device=tokens.device) if shift else torch.full((P,), -1, device=tokens.device)
        layers = self.model.prefix_from_embeds(self.virtual, own.expand(K, P))  # [K, kv_heads, P, d_head] each
        prefix = [LayerPrefix(key=self.select(lp.key, adapter_ids), value=self.select(lp.value, adapter_ids))
                  for lp in layers]
        positions = self.model.default_position_ids(batch, seq, P if shift else 0, tokens.device)
        return Prepared(tokens, None, positions, prefix, torch.arange(seq, device=tokens.device))

    def content_offset(self, index: int, n_prompt: int) -> int:
        return splice_offset(self.config.position_policy, index, 0, self.config.n_virtual)

    @classmethod
    def positions_added(cls, config: SoftPromptConfig) -> int:  # type: ignore[override]
        return config.n_virtual if config.position_policy == "shift" else 0
