"""Will a prefix be enough? Fit a cheap LoRA, then ask per head whether a prefix could express its change.

Procedure (`ctxtune diagnose`; the orchestration is `ctxtune.experiments.analyses`):
1. Fit LoRA (rank r on q, k, v, o of every block, those the model has; a few hundred steps) on the task: an
   ordinary run. Or take a LoRA the user trained (a ctxtune run or a PEFT adapter, `--adapter`).
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
   calibration cases of the reproduce studies, so the agreement on those is a calibration; the held-out
   cases of studies/diagnose_validation.toml (added later, thresholds unchanged) are the out-of-sample test;
   see docs/suffix-vs-prefix.md (a LoRA is also free to change more than needed, and a new pattern needed
   only in a deeper layer would be missed).
5. Inconclusive instead of a verdict (`conclude`) when the reference fit cannot support one: its exact-match
   accuracy on the task is below FIT_MIN_ACCURACY (50%; it did not learn the task, so its changes show where
   the gradient pushes, not a solution), or it adapts no query or key map (Hugging Face GPT-2 fuses q, k, v
   in one `c_attn` with no LoRA site: the fit there uses o, mlp_in, mlp_out and cannot move any pattern).

The validation (does the verdict agree with a trained prefix on labelled cases?) is the study spec
`studies/diagnose_validation.toml`: its cases are runs, its verdicts the "diagnose" analysis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctxtune.methods import Method

CHANGE_MIN = 0.05
TV_MIN = 0.25
UNEXPLAINED_MIN = 0.5
SUCCESS_ACCURACY = 0.5
"""A prefix run "succeeds" at or above this exact-match accuracy (the studies' claims use 50%)."""
FIT_MIN_ACCURACY = 0.5
"""Below this exact-match accuracy the reference LoRA fit has not learned the task: the verdict is
"inconclusive" (fixed before the held-out validation cases were run; the same bar as a prefix's success)."""


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
    """The diagnostic's outcome (`predicted`: "success", "failure" or "inconclusive"; `reason` says why a
    diagnosis is inconclusive)."""

    task: str
    steps: int | None
    rank: int | None
    lora_accuracy: float | None
    lora_loss: float | None
    heads: list[HeadDiagnosis]
    flagged: list[str]
    verdict: str
    prefix_ok: bool | None
    seconds_fit: float
    seconds_analysis: float
    thresholds: dict[str, float] = field(default_factory=dict)
    predicted: str = ""
    reason: str = ""
    targets: list[str] = field(default_factory=list)

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

    Works for a plain Linear, Hugging Face GPT-2's Conv1D and a LoRA-wrapped one (the bias is removed by
    subtracting o_proj(0)).
    """
    batch, pos, n_heads, d_head = z.shape
    bias = o_proj(torch.zeros(1, n_heads * d_head, dtype=z.dtype, device=z.device))  # [1, d_model]
    outs = []
    for h in range(n_heads):
        only = torch.zeros_like(z)
        only[:, :, h] = z[:, :, h]
        outs.append(o_proj(only.reshape(batch, pos, n_heads * d_head)) - bias)  # [batch, pos, d_model]
    return torch.stack(outs, dim=2)  # [batch, pos, n_heads, d_model]


def _output_map(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The module that maps layer `layer`'s head outputs to the residual stream (W_O), as it is now (a LoRA
    attached to the model has wrapped it)."""
    parent, attr = model.linear_sites(layer)["o"]
    return getattr(parent, attr)


@dataclass
class _Rows:
    """One head's rows gathered over batches: adapted and base contributions [rows, d_model], TV per row."""

    r_ft: list[torch.Tensor] = field(default_factory=list)
    r_base: list[torch.Tensor] = field(default_factory=list)
    tv: list[torch.Tensor] = field(default_factory=list)


def _gather_batch(base: Any, method: Method, tokens: torch.Tensor, first_row: int,
                  rows: dict[tuple[int, int], _Rows]) -> None:
    """Add one batch's rows (queries from `first_row` on) to `rows`, per (layer, head)."""
    from ctxtune.theory.capture import capture_for

    model = method.model
    with method.active(None):
        layers = capture_for(model)(model, tokens)  # the adapted run: its layer inputs, patterns, outputs
        base_attn = base.attention_modules()
        for la in layers:
            a_base, z_base = la.recompute(base_attn[la.layer])  # base attention on the adapted run's input
            r_ft = _head_contributions(_output_map(model, la.layer), la.z)[:, first_row:]
            r_base = _head_contributions(_output_map(base, la.layer), z_base)[:, first_row:]
            tv = 0.5 * (la.pattern - a_base).abs().sum(-1)[:, :, first_row:]  # [batch, n_heads, rows]
            for h in range(la.n_heads):
                slot = rows.setdefault((la.layer, h), _Rows())
                slot.r_ft.append(r_ft[:, :, h].reshape(-1, r_ft.shape[-1]))  # [batch * rows, d_model]
                slot.r_base.append(r_base[:, :, h].reshape(-1, r_base.shape[-1]))
                slot.tv.append(tv[:, h].reshape(-1))  # [batch * rows]


def _head_diagnosis(layer: int, head: int, slot: _Rows) -> HeadDiagnosis:
    """Step 3 and the first-layer rule of step 4 (module docstring) on one head's gathered rows."""
    rf, rb = torch.cat(slot.r_ft), torch.cat(slot.r_base)  # [N, d_model] each
    diff = rf - rb
    delta = (diff - diff.mean(0)).pow(2).sum()  # variance of the change (a constant shift is free)
    alpha, u = fit_prefix_form(rf, rb)
    fit = (1 - alpha)[:, None] * rb + alpha[:, None] * u[None]
    unexplained = float((rf - fit).pow(2).sum() / delta) if float(delta) > 0 else 0.0
    change = float(diff.pow(2).sum() / rb.pow(2).sum().clamp_min(1e-30))
    head_tv = float(torch.cat(slot.tv).mean())
    flagged = layer == 0 and change >= CHANGE_MIN and head_tv >= TV_MIN
    inexpressible = change >= CHANGE_MIN and unexplained >= UNEXPLAINED_MIN
    return HeadDiagnosis(layer, head, change, unexplained, head_tv, float(alpha.mean()), flagged, inexpressible)


@torch.no_grad()
def analyse_batches(base: Any, method: Method, batches: list[tuple[torch.Tensor, int]],
                    chunk: int = 64) -> list[HeadDiagnosis]:
    """Per-layer, per-head comparison of the adapted model (`method` attached to its model) with `base`.

    Works on any model with a registered attention capture (our GPT, `ctxtune.hf.HFBackbone`).

    Args:
        base: an unadapted copy of the model.
        method: the fitted weight-based method (LoRA) on another copy.
        batches: (tokens [batch, seq], first_row) pairs: model inputs of one layout each, and the first query
            row analysed (n_prompt - 1: the rows that predict outputs). Rows of all batches are pooled.
        chunk: examples captured at a time (memory: every layer's attention of a chunk is held at once).
    """
    rows: dict[tuple[int, int], _Rows] = {}
    for tokens, first_row in batches:
        for start in range(0, tokens.shape[0], chunk):
            _gather_batch(base, method, tokens[start : start + chunk], first_row, rows)
    return [_head_diagnosis(layer, head, rows[(layer, head)]) for layer, head in sorted(rows)]


def analyse(base: Any, method: Method, tokens: torch.Tensor, first_row: int = 0) -> list[HeadDiagnosis]:
    """`analyse_batches` on one batch: tokens [batch, seq], queries from `first_row` on."""
    return analyse_batches(base, method, [(tokens, first_row)])


def verdict(heads: list[HeadDiagnosis]) -> tuple[list[str], str]:
    """(flagged head labels, verdict sentence) from the per-head diagnosis (step 4 of the module docstring)."""
    flagged = [h.label for h in heads if h.needs_new_attention]
    if not flagged:
        return flagged, "a prefix can express this change"
    return flagged, "these heads need new attention patterns: " + ", ".join(flagged)


@dataclass(frozen=True)
class Conclusion:
    """The diagnostic's answer: `predicted` is "success" (a prefix could do it), "failure" (new attention
    patterns needed) or "inconclusive" (the reference fit cannot support a verdict; `reason` says why)."""

    predicted: str
    flagged: list[str]
    verdict: str
    reason: str = ""


def conclude(heads: list[HeadDiagnosis], fit_accuracy: float | None, fit_moves_attention: bool) -> Conclusion:
    """Step 5 of the module docstring: the verdict, or "inconclusive" when the reference fit did not learn the
    task (exact match below FIT_MIN_ACCURACY, or unknown) or could not change attention patterns at all."""
    flagged, sentence = verdict(heads)
    if not fit_moves_attention:
        reason = ("the reference fit has no query or key map to adapt on this model (no q/k LoRA site), so it "
                  "cannot show whether a new attention pattern is needed")
        return Conclusion("inconclusive", flagged, f"inconclusive: {reason}", reason)
    if fit_accuracy is None or fit_accuracy < FIT_MIN_ACCURACY:
        shown = "unknown" if fit_accuracy is None else f"{100 * fit_accuracy:.1f}%"
        reason = (f"the reference LoRA fit did not learn the task (exact match {shown} < "
                  f"{100 * FIT_MIN_ACCURACY:.0f}%): its changes show where the gradient pushes, not a working "
                  "solution; fit longer (--steps), with a higher rank or learning rate")
        return Conclusion("inconclusive", flagged, f"inconclusive: {reason}", reason)
    return Conclusion("failure" if flagged else "success", flagged, sentence)


def table(diag: Diagnosis) -> str:
    """Plain-text per-head table plus the verdict."""
    acc = "unknown" if diag.lora_accuracy is None else f"{100 * diag.lora_accuracy:.1f}%"
    targets = f" on {', '.join(diag.targets)}" if diag.targets else ""
    steps = "given (not fitted here)" if diag.steps is None else f"{diag.steps} steps"
    lines = [
        f"task {diag.task}: LoRA rank {diag.rank}{targets}, {steps}, accuracy {acc}",
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
