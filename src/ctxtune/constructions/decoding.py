"""Pieces shared by the hand-built constructions: the `Construction` record, weight zeroing, the
triangular read-out decoder and batched greedy decoding with a KV cache.

Reference: Petrov, Torr, Bibi (ICLR 2024), Section 3; the triangular decoder is the one of the derived
construction U (shared/reference/paper.md §3.2).

Token convention for every construction: tokens are 0-indexed, token y in [V] is stored in a virtual
token as the real number y / V (the paper's (Y - 1) / V with 1-indexed Y).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ctxtune.model.gpt import GPT, KVCache


def zero_parameters(model: GPT) -> GPT:
    """Zero every parameter in place (tracr's assembly starts from an all-zero model)."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


@torch.no_grad()
def write_triangular_decoder(
    fc_in: torch.nn.Linear,
    fc_out: torch.nn.Linear,
    w_slot: int,
    logit_start: int,
    vocab: int,
    unit_start: int = 0,
) -> None:
    """Write a one-hidden-layer ReLU decoder from a scalar slot w to V logit slots.

    Claim: for w within 1/(2V) of y/V (y in [V]), logit slot y holds a value > 1/2 and every other slot a
    value < 1/2; for w exactly y/V the logits are the one-hot e_y.

    Proof sketch: hidden units g_v = V*w - v (three copies with biases +1, 0, -1) and
    l_v = ReLU(g_v + 1) - 2 ReLU(g_v) + ReLU(g_v - 1) = max(0, 1 - |g_v|), the hat function centred on v.
    |V*w - y| < 1/2 gives l_y > 1/2 and |g_v| > 1/2 (so l_v < 1/2) for v != y. QED.

    Args:
        fc_in, fc_out: the MLP's two Linear layers (with biases).
        w_slot: residual index of w.
        logit_start: first of V consecutive residual indices receiving the logits.
        vocab: V.
        unit_start: first of the 3V hidden units used.
    """
    for v in range(vocab):
        for j, (offset, coeff) in enumerate(((1.0, 1.0), (0.0, -2.0), (-1.0, 1.0))):
            unit = unit_start + 3 * v + j
            fc_in.weight[unit, w_slot] = vocab  # g_v = V w - v + offset
            fc_in.bias[unit] = offset - v
            fc_out.weight[logit_start + v, unit] = coeff


@torch.no_grad()
def greedy_generate(model: GPT, embeds: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy decoding from input embeddings, KV-cached; generated tokens enter as hard tokens.

    Args:
        model: the GPT.
        embeds: [batch, pos, d_model] first inputs (virtual and/or embedded hard tokens).
        n_new: tokens to generate.

    Returns:
        [batch, n_new] int64 generated tokens.
    """
    cache = KVCache(model.cfg.n_layers)
    logits = model(embeds=embeds, cache=cache)  # [batch, pos, d_vocab]
    out = []
    for step in range(n_new):
        nxt = logits[:, -1].argmax(dim=-1)  # [batch]
        out.append(nxt)
        if step + 1 < n_new:
            logits = model(nxt[:, None], cache=cache)  # [batch, 1, d_vocab]
    return torch.stack(out, dim=1)  # [batch, n_new]


@dataclass
class Construction(ABC):
    """A hand-built GPT plus the map from targets to the virtual token that realises them.

    Attributes:
        name: "unconditional" or "conditional".
        form: "authors" or "residual".
        vocab: V.
        length: N, the generated length.
        model: the GPT with hand-written weights.
        constants: the named constants the proof needs (beta, margin M, B, ...).
    """

    name: str
    form: str
    vocab: int
    length: int
    model: GPT
    constants: dict[str, float] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    @abstractmethod
    def virtual_tokens(self, targets: torch.Tensor) -> torch.Tensor:
        """Virtual tokens [batch, d_model] for a batch of targets."""

    def virtual_token(self, target: torch.Tensor | list[int]) -> torch.Tensor:
        """The virtual token [d_model] that realises one target."""
        return self.virtual_tokens(torch.as_tensor(target)[None])[0]

    @abstractmethod
    def run(self, targets: torch.Tensor) -> torch.Tensor:
        """The model's greedy outputs for a batch of targets (same shape as `reference`)."""

    @abstractmethod
    def reference(self, targets: torch.Tensor) -> torch.Tensor:
        """What the construction must output for a batch of targets."""

    @abstractmethod
    def run_hard(self) -> torch.Tensor:
        """Outputs [V, ...] with each hard token v in place of the virtual token."""

    @abstractmethod
    def random_targets(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n targets drawn uniformly."""

    @abstractmethod
    def all_targets(self) -> torch.Tensor:
        """Every target, in lexicographic order."""

    @property
    @abstractmethod
    def n_targets(self) -> int:
        """How many targets exist (V^N or V^(V N))."""
