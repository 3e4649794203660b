"""Will a prefix be enough? Fit a cheap LoRA, then ask per head whether a prefix could express its change.

Procedure (`ctxtune diagnose`; the orchestration is `ctxtune.experiments.analyses`):
1. Fit LoRA (rank r on q, k, v, o of every block; a few hundred steps) on the task: an ordinary run.
2. On test examples, take each layer's input x^ft from the ADAPTED run and feed the same x^ft to the
   base attention and to the adapted attention (the per-layer comparison the paper's identity needs:
   same layer input, same position ids). For every head h and query i get the head's contribution to
   the residual stream r_i = W_O,h z_i (so LoRA on W_O counts) and the attention pattern A_i.
3. (i) Prefix-expressibility: fit r^ft_i ~ (1 - alpha_i) r^base_i + alpha_i u with alpha_i in [0, 1]
   per query and one vector u per head (the single-prefix form of paper.md §4) by alternating least
   squares (alpha has a closed form given u, clipped to [0, 1]; u has one given alpha); report
   `unexplained` = |r^ft - fit|^2 / |D - mean(D)|^2 with D = r^ft - r^base, the fraction of the change's
   VARIANCE (over inputs and queries) that no prefix of this form explains (0: a prefix could do it
   exactly; about 1 or more: nothing of it). A constant shift is free for a prefix, hence the centring.
   Queries are the rows that predict output tokens (n_prompt - 1 onwards), where the task is decided.
   (ii) Relative content attention change: `attention_tv` = mean over queries of the total-variation
   distance 0.5 * sum_j |A^ft_ij - A^base_ij| (a prefix leaves it 0 at this layer input).
   Also `change` = |r^ft - r^base|^2 / |r^base|^2, the size of the head's change.
4. Verdict. A head "needs a new attention pattern" when it is in the FIRST layer and
       change >= CHANGE_MIN (0.05)  and  attention_tv >= TV_MIN (0.25).
   Why only the first layer: there the adapted and the base run see identical layer inputs, and no
   context method (prompt, soft prompt, prefix, suffix for the content queries) can move relative content
   attention at all (paper.md §4). From layer 2 on, a prefix CAN change attention through changed inputs
   (cross-layer effects, paper.md §5), so a deeper head's TV is not evidence against a prefix; it is
   reported, not used. `inexpressible` (change >= CHANGE_MIN and unexplained >= UNEXPLAINED_MIN = 0.5)
   marks heads whose change a single per-layer prefix cannot reproduce on fixed inputs; also reported only.
   If no head qualifies: "a prefix can express this change"; else "these heads need new attention
   patterns: L.H, ..." (1-based layer and head). The thresholds were set AFTER looking at the four
   validation cases of the reproduce studies (the only labelled cases available), so the agreement is a
   calibration, not an out-of-sample test; see docs/suffix-vs-prefix.md (a LoRA is also free to change more
   than needed, and a new pattern needed only in a deeper layer would be missed).

The validation (does the verdict agree with a trained prefix on labelled cases?) is the study spec
`studies/diagnose_validation.toml`: its cases are runs, its verdicts the "diagnose" analysis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctxtune.methods import Method
from ctxtune.model import GPT
from ctxtune.theory.capture import _gpt_attention

CHANGE_MIN = 0.05
TV_MIN = 0.25
UNEXPLAINED_MIN = 0.5
SUCCESS_ACCURACY = 0.5
"""A prefix run "succeeds" at or above this exact-match accuracy (the studies' claims use 50%)."""


@dataclass(frozen=True)
class HeadDiagnosis:
    """One head's change under the fitted LoRA (see the module docstring for the definitions)."""

    layer: int
    head: int
    change: float
    unexplained: float
    attention_tv: float
    mean_alpha: float
    needs_new_attention: bool
    inexpressible: bool

    @property
    def label(self) -> str:
        return f"{self.layer + 1}.{self.head + 1}"


@dataclass
class Diagnosis:
    """The diagnostic's outcome."""

    task: str
    steps: int
    rank: int
    lora_accuracy: float
    lora_loss: float
    heads: list[HeadDiagnosis]
    flagged: list[str]
    verdict: str
    prefix_ok: bool
    seconds_fit: float
    seconds_analysis: float
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for h, head in zip(out["heads"], self.heads, strict=True):
            h["label"] = head.label
        return out


def fit_prefix_form(r_ft: torch.Tensor, r_base: torch.Tensor, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Best r_ft ~ (1 - alpha) r_base + alpha u with alpha in [0, 1] per row and one u.

    Args:
        r_ft, r_base: [N, d] adapted and base outputs of one head on the same inputs.
        iters: alternating least-squares rounds.

    Returns:
        (alpha [N], u [d]).
    """
    delta = r_ft - r_base  # [N, d]
    # start from the single direction that explains most of the change, scaled to the largest reach
    alpha = torch.full((r_ft.shape[0],), 0.5, dtype=r_ft.dtype)
    u = r_base.mean(0) + 2 * delta.mean(0)
    for _ in range(iters):
        # alpha given u: minimise |delta - alpha (u - r_base)|^2 per row, clipped to [0, 1]
        g = u[None] - r_base  # [N, d]
        alpha = ((delta * g).sum(1) / g.pow(2).sum(1).clamp_min(1e-30)).clamp(0.0, 1.0)
        # u given alpha: minimise sum |r_ft - (1 - alpha) r_base - alpha u|^2
        denom = alpha.pow(2).sum()
        if float(denom) <= 0:
            break
        u = (alpha[:, None] * (r_ft - (1 - alpha)[:, None] * r_base)).sum(0) / denom
    return alpha, u


def _head_contributions(o_proj: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Per-head residual contributions W_O,h z_h: z [batch, pos, n_heads, d_head] -> [batch, pos, n_heads, d_model].

    Works for a plain Linear and a LoRA-wrapped one (the bias is removed by subtracting o_proj(0)).
    """
    batch, pos, n_heads, d_head = z.shape
    bias = o_proj(torch.zeros(1, n_heads * d_head, dtype=z.dtype))  # [1, d_model]
    outs = []
    for h in range(n_heads):
        only = torch.zeros_like(z)
        only[:, :, h] = z[:, :, h]
        outs.append(o_proj(only.reshape(batch, pos, n_heads * d_head)) - bias)  # [batch, pos, d_model]
    return torch.stack(outs, dim=2)  # [batch, pos, n_heads, d_model]


@torch.no_grad()
def analyse(base: GPT, method: Method, tokens: torch.Tensor, first_row: int = 0) -> list[HeadDiagnosis]:
    """Per-layer, per-head comparison of the adapted model (`method` attached to its model) with `base`.

    Args:
        base: an unadapted copy of the model.
        method: the fitted weight-based method (LoRA) on another copy.
        tokens: [batch, seq] model inputs.
        first_row: analyse the queries from this position on (n_prompt - 1: the rows that predict outputs).
    """
    model: GPT = method.model
    names = [f"blocks.{layer}.ln1.hook_normalized" for layer in range(model.cfg.n_layers)]
    with method.active(None):
        _, cache = model.run_with_cache(tokens, names_filter=names)
    pos_ids = model.default_position_ids(tokens.shape[0], tokens.shape[1], 0, tokens.device)
    out = []
    for layer in range(model.cfg.n_layers):
        x = cache[names[layer]]  # [batch, pos, d_model] adapted run's layer input
        a_base, z_base = _gpt_attention(base.blocks[layer].attn, x, pos_ids)
        with method.active(None):
            a_ft, z_ft = _gpt_attention(model.blocks[layer].attn, x, pos_ids)
            r_ft = _head_contributions(model.blocks[layer].attn.o_proj, z_ft)
        r_base = _head_contributions(base.blocks[layer].attn.o_proj, z_base)
        tv = 0.5 * (a_ft - a_base).abs().sum(-1)[:, :, first_row:]  # [batch, n_heads, rows]
        r_ft, r_base = r_ft[:, first_row:], r_base[:, first_row:]  # [batch, rows, n_heads, d_model]
        for h in range(model.cfg.n_heads):
            rf = r_ft[:, :, h].reshape(-1, r_ft.shape[-1])  # [batch * rows, d_model]
            rb = r_base[:, :, h].reshape(-1, r_base.shape[-1])
            diff = rf - rb
            delta = (diff - diff.mean(0)).pow(2).sum()  # variance of the change (a constant shift is free)
            alpha, u = fit_prefix_form(rf, rb)
            fit = (1 - alpha)[:, None] * rb + alpha[:, None] * u[None]
            unexplained = float((rf - fit).pow(2).sum() / delta) if float(delta) > 0 else 0.0
            change = float(diff.pow(2).sum() / rb.pow(2).sum().clamp_min(1e-30))
            head_tv = float(tv[:, h].mean())
            flagged = layer == 0 and change >= CHANGE_MIN and head_tv >= TV_MIN
            inexpressible = change >= CHANGE_MIN and unexplained >= UNEXPLAINED_MIN
            out.append(
                HeadDiagnosis(layer, h, change, unexplained, head_tv, float(alpha.mean()), flagged, inexpressible)
            )
    return out


def verdict(heads: list[HeadDiagnosis]) -> tuple[list[str], str]:
    """(flagged head labels, verdict sentence) from the per-head diagnosis (step 4 of the module docstring)."""
    flagged = [h.label for h in heads if h.needs_new_attention]
    if not flagged:
        return flagged, "a prefix can express this change"
    return flagged, "these heads need new attention patterns: " + ", ".join(flagged)


def table(diag: Diagnosis) -> str:
    """Plain-text per-head table plus the verdict."""
    lines = [
        f"task {diag.task}: LoRA rank {diag.rank}, {diag.steps} steps, accuracy {100 * diag.lora_accuracy:.1f}%",
        f"{'head':>5} {'change':>8} {'unexpl.':>8} {'attn TV':>8} {'alpha':>6}  flag",
    ]
    for h in diag.heads:
        lines.append(
            f"{h.label:>5} {h.change:8.3f} {h.unexplained:8.3f} {h.attention_tv:8.3f} {h.mean_alpha:6.2f}  "
            f"{'NEW ATTENTION' if h.needs_new_attention else ''}{' (inexpressible)' if h.inexpressible else ''}"
        )
    lines.append(f"verdict: {diag.verdict}")
    lines.append(f"cost: {diag.seconds_fit + diag.seconds_analysis:.1f} s (fit {diag.seconds_fit:.1f} s)")
    return "\n".join(lines)


def heatmap(diag: Diagnosis, path: Path) -> None:
    """PNG with two layer x head panels: unexplained fraction and attention TV (flagged heads boxed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_layers = max(h.layer for h in diag.heads) + 1
    n_heads = max(h.head for h in diag.heads) + 1
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.4 * n_heads * 2, 1.4 + 0.8 * n_layers), squeeze=False)
    for ax, key, title in (
        (axes[0, 0], "unexplained", "unexplained by a prefix"),
        (axes[0, 1], "attention_tv", "attention change (TV)"),
    ):
        grid = torch.zeros(n_layers, n_heads)
        for h in diag.heads:
            grid[h.layer, h.head] = getattr(h, key)
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for h in diag.heads:
            ax.text(
                h.head,
                h.layer,
                f"{getattr(h, key):.2f}",
                ha="center",
                va="center",
                color="red" if h.needs_new_attention else "white",
                fontsize=8,
            )
        ax.set_xticks(range(n_heads), [f"H{i + 1}" for i in range(n_heads)])
        ax.set_yticks(range(n_layers), [f"L{i + 1}" for i in range(n_layers)])
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"{diag.task}: {diag.verdict}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
