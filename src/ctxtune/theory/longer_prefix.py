"""Longer prefixes (paper's Appendix B), per head.

With n_virtual > 1 the bias of a head is sum_j a_ij v^s_j = alpha_i sum_j w_ij v^s_j, where the mixing
weights w_ij = a_ij / alpha_i (attention renormalised over the prefix keys) depend on the query. If w
hardly varies over inputs, the prefix acts like a single fixed bias direction. The authors measured
the 1st-99th percentile spread of w over inputs for each prefix position, but indexed the head axis
with the layer index (one head per layer); here every (layer, head) gets its own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxtune.theory.attention import decompose
from ctxtune.theory.capture import LayerAttention


@dataclass(frozen=True)
class PrefixShareStats:
    """One head's prefix mixing weights over inputs.

    Attributes:
        shares: [n_inputs, n_virtual] weights w_ij at the chosen query, each row sums to 1.
        spread: [n_virtual] 99th minus 1st percentile over inputs, per prefix position.
        mean_spread: spread averaged over prefix positions (the authors' per-layer number).
        effective_rank: exp(entropy) of the normalised singular values of the biases [n_inputs, d_head].
    """

    layer: int
    head: int
    shares: torch.Tensor
    spread: torch.Tensor
    mean_spread: float
    effective_rank: float


def effective_rank(m: torch.Tensor) -> float:
    """Roy-Vetterli effective rank exp(H(p)), p = singular values / their sum; 0 for a zero matrix."""
    sv = torch.linalg.svdvals(m.double())
    total = sv.sum()
    if total <= 0:
        return 0.0
    p = sv / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def prefix_share_stats(la: LayerAttention, query: str = "last") -> list[PrefixShareStats]:
    """Per head of one captured layer: distribution over inputs of the prefix mixing weights.

    Args:
        la: captured layer (batch = the set of inputs).
        query: "last" uses the last content position of each input (the authors' choice); "all" pools
            every content position of every input as one sample.
    """
    if la.n_virtual == 0:
        raise ValueError("layer has no prefix")
    a = la.pattern[..., : la.n_virtual]  # [batch, n_heads, pos, n_virtual]
    w = a / a.sum(-1, keepdim=True)
    bias = decompose(la, la.z)["bias"].transpose(1, 2)  # [batch, n_heads, pos, d_head] (t unused here)
    if query == "last":
        w, bias = w[:, :, -1], bias[:, :, -1]  # [batch, n_heads, n_virtual], [batch, n_heads, d_head]
    elif query == "all":
        w = w.transpose(1, 2).reshape(-1, w.shape[1], w.shape[-1])  # [batch * pos, n_heads, n_virtual]
        bias = bias.transpose(1, 2).reshape(
            -1, bias.shape[1], bias.shape[-1]
        )  # [batch * pos, n_heads, d_head]
    else:
        raise ValueError(f"query must be 'last' or 'all', got {query!r}")
    q = torch.tensor([0.01, 0.99], dtype=torch.float64)
    out = []
    for h in range(w.shape[1]):
        shares = w[:, h].double()  # [n_inputs, n_virtual]
        lo, hi = torch.quantile(shares, q, dim=0)
        spread = hi - lo
        out.append(
            PrefixShareStats(la.layer, h, shares, spread, float(spread.mean()), effective_rank(bias[:, h]))
        )
    return out


def plot_prefix_shares(stats: list[PrefixShareStats], title: str = "") -> object:
    """Box plot per head of the mixing weight on each prefix position. Returns a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(stats)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, s in zip(list(axes.flat)[: len(stats)], stats, strict=True):
        ax.boxplot(s.shares.numpy(), whis=(1, 99), showfliers=False)
        ax.set_title(
            f"L{s.layer} H{s.head}: spread {s.mean_spread:.3f}, erank {s.effective_rank:.2f}", fontsize=8
        )
        ax.set_xlabel("prefix position")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0, 0].set_ylabel("share of prefix attention")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
