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
