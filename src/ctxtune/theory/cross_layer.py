"""Cross-layer effects (paper.md §5): how much content attention moves against the BASE model's own inputs.

This is not the Section 4 identity and is never reported as a check. At layer l the prefixed run's
renormalised content attention is compared with the pattern the unadapted model computes on its own
layer-l inputs (no prefix anywhere). At the first layer both see the same inputs, so the change is at
float level; from the second layer on, earlier prefixes have moved the inputs (b_i = alpha_i (v - t_i)
through the residual stream), and the change can be large. That is how a prefix steers later layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ctxtune.theory.capture import LayerAttention


@dataclass(frozen=True)
class CrossLayerChange:
    """Relative content attention change at one (layer, head), prefixed run vs base run.

    Attributes:
        max_abs_change: max over inputs, queries and keys of |renormalised A^pt - A^base|.
        mean_abs_change: mean of the same over inputs, queries and causal keys.
    """

    layer: int
    head: int
    max_abs_change: float
    mean_abs_change: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def renormalised_content(la: LayerAttention) -> torch.Tensor:
    """[batch, n_heads, pos, pos]: the prefixed pattern over content keys, rescaled to sum to 1."""
    content = la.pattern[..., la.n_virtual :]
    return content / content.sum(-1, keepdim=True)


def cross_layer_changes(prefixed: list[LayerAttention], base: list[LayerAttention]) -> list[CrossLayerChange]:
    """Per layer and head, the attention change of a prefixed run against the base model's own run.

    Args:
        prefixed: capture of the adapted run.
        base: capture of the same content through the unadapted model (no prefix, same position ids).
    """
    if len(prefixed) != len(base):
        raise ValueError(f"{len(prefixed)} prefixed layers vs {len(base)} base layers")
    out = []
    for la, lb in zip(prefixed, base, strict=True):
        diff = (
            renormalised_content(la) - lb.pattern[..., lb.n_virtual :]
        ).abs()  # [batch, n_heads, pos, pos]
        pos = diff.shape[-1]
        causal = torch.ones(pos, pos, dtype=torch.bool, device=diff.device).tril()
        per_head = diff.transpose(0, 1)  # [n_heads, batch, pos, pos]
        mean = per_head[:, :, causal].mean(dim=(1, 2))  # [n_heads]
        mx = per_head.reshape(per_head.shape[0], -1).amax(1)
        out += [CrossLayerChange(la.layer, h, float(mx[h]), float(mean[h])) for h in range(mx.shape[0])]
    return out


@dataclass(frozen=True)
class ContentAttentionChange:
    """How far an adapted run moved one head's attention over the content, against the base model's own run.

    Attributes:
        max_tv, mean_tv: max and mean over inputs and analysed query rows of the total-variation distance
            0.5 * sum_r |renormalised A^adapted_ir - A^base_ir| (0: the same pattern; 1: disjoint).
    """

    layer: int
    head: int
    max_tv: float
    mean_tv: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def content_attention(base: Any, method: Any, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(adapted, base) content attention per layer, each [batch, n_heads, pos, pos], of `method` (any method whose
    virtual tokens, if any, come before the content: a prefix, a leading soft prompt, LoRA) on its model and of
    the unadapted `base` on the same tokens and content position ids. The adapted rows are renormalised over the
    content keys (the virtual tokens' mass removed); a weight method's run has no virtual tokens.

    `base` may be the method's own model for a method that leaves the weights alone (run without the method).
    """
    from ctxtune.theory.capture import capture_for, capture_method

    adapted = capture_method(method, tokens)
    own = capture_for(base)(base, tokens, position_ids=adapted[0].position_ids)
    return [renormalised_content(la) for la in adapted], [lb.pattern[..., lb.n_virtual :] for lb in own]


def total_variation(adapted: torch.Tensor, base: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """[batch, n_heads, rows]: 0.5 * sum over keys of |adapted - base| for the query rows from `first_row` on."""
    return 0.5 * (adapted - base)[:, :, first_row:].abs().sum(-1)


def content_attention_changes(adapted: list[torch.Tensor], base: list[torch.Tensor],
                              first_row: int = 0) -> list[ContentAttentionChange]:
    """Per layer and head, the max and mean total variation of the content attention rows from `first_row` on."""
    out = []
    for layer, (a, b) in enumerate(zip(adapted, base, strict=True)):
        tv = total_variation(a, b, first_row).transpose(0, 1).reshape(a.shape[1], -1)  # [n_heads, batch * rows]
        out += [ContentAttentionChange(layer, h, float(tv[h].max()), float(tv[h].mean())) for h in range(tv.shape[0])]
    return out
