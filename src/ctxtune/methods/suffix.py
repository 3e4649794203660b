"""Suffix: n_virtual free embeddings after the user input, before the output.

Trainable: [n_adapters, n_virtual, d_model]; closed form K * n_virtual * d_model. Under causal
masking the suffix cannot affect the input positions; it affects the outputs. Unlike a prefix, from
layer 2 on its keys and values have attended to the content, so they depend on the input: the fixed
bias argument of the paper's Section 4 does not apply. Position policy "keep" (default: suffix
tokens take no position, every real token keeps its position) or "shift" (suffix tokens at
n_prompt.., outputs moved by n_virtual).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxtune.errors import ConfigError
from ctxtune.methods.base import Prepared
from ctxtune.methods.registry import register_method
from ctxtune.methods.soft_prompt import SoftPrompt, SoftPromptConfig
from ctxtune.methods.splice import splice, splice_offset


@dataclass(frozen=True)
class SuffixConfig(SoftPromptConfig):
    """Same options as a soft prompt: n_virtual, position_policy, init, init_std (not precompute: a suffix sees
    the input, so its keys and values differ from example to example)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precompute:
            raise ConfigError("suffix: precompute does not apply (a suffix's keys and values depend on the input)")


@register_method
class Suffix(SoftPrompt):
    """Shares the soft prompt's parameters and initialisation; differs only in where they go."""

    key = "suffix"
    config_cls = SuffixConfig
    identity = "partial"
    peft_type = None  # PEFT's prompt tuning puts virtual tokens before the input only

    def prepare(self, tokens: torch.Tensor, adapter_ids: torch.Tensor | None, n_prompt: int) -> Prepared:
        virtual = self.select(self.virtual, adapter_ids)
        return splice(self.model, tokens, virtual, n_prompt, self.config.position_policy)

    def content_offset(self, index: int, n_prompt: int) -> int:
        return splice_offset(self.config.position_policy, index, n_prompt, self.config.n_virtual)
