"""Section 4 as executable checks: a prefix only biases a head's output.

Claim (paper.md §4). At one layer and head, for a content query i with prefix keys/values (k^s_j, v^s_j),
j = 1..n_virtual, write a_ij for the attention on prefix j and alpha_i = sum_j a_ij. Then

    A^pt_ir = (1 - alpha_i) A_ir                    for every content key r, and
    t^pt_i  = (1 - alpha_i) t_i + sum_j a_ij v^s_j,

where A and t are the attention and output of the same head WITHOUT the prefix on the same input and
position ids. Proof sketch: the softmax shares one normaliser Z^pt_i = Z_i + sum_j exp(score_ij), so
every content weight is exp(score_ir) / Z^pt_i = A_ir Z_i / Z^pt_i with Z_i / Z^pt_i = 1 - alpha_i;
the output is linear in the weights. Hence the renormalised content attention equals A exactly, and
the bias sum_j a_ij v^s_j lies in span{v^s_j} (in the convex hull times alpha_i). QED. No constant is
needed; only exact arithmetic, so the tolerance is a float tolerance (see `tolerance`).

Every `check_*` returns one `CheckResult` per head of the layer. Negative controls (`control=True`)
are expected to FAIL the same test; `CheckResult.ok` is True when the outcome is the expected one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ctxtune.theory.capture import LayerAttention

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check at one (layer, head).

    Attributes:
        kind: what was checked ("attention", "output", "span", "control_alpha", "control_weights_*").
        layer, head: where.
        max_abs_err: the largest absolute deviation from the claim.
        tol: the tolerance the error is compared with.
        passed: max_abs_err <= tol.
        control: a negative control, expected to fail.
    """

    kind: str
    layer: int
    head: int
    max_abs_err: float
    tol: float
    passed: bool
    control: bool = False

    @property
    def ok(self) -> bool:
        """The expected outcome: identity checks pass, negative controls fail."""
        return self.passed != self.control

    @property
    def margin(self) -> float:
        """max_abs_err / tol: below 1 passes; a control's margin says by how much it fails."""
        return self.max_abs_err / self.tol if self.tol > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AlphaStats:
    """Prefix attention mass alpha_i of one head over all content positions and inputs."""

    layer: int
    head: int
    min: float
    median: float
    max: float


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Float tolerance: 1e-12 (float64) or 1e-5 (float32) relative to max(1, scale).

    For quantities of magnitude at most 1 (attention weights) this is an absolute tolerance.
    """
    if dtype not in RTOL:
        raise ValueError(f"checks support float32 and float64, got {dtype}")
    return RTOL[dtype] * max(1.0, scale)


def _per_head(err: torch.Tensor, head_dim: int) -> list[float]:
    """Max over every axis but `head_dim`: one float per head."""
    moved = err.movedim(head_dim, 0)  # [n_heads, ...]
    return moved.reshape(moved.shape[0], -1).amax(dim=1).tolist()


def _results(
    kind: str, la: LayerAttention, errs: list[float], tols: list[float], control: bool = False
) -> list[CheckResult]:
    pairs = enumerate(zip(errs, tols, strict=True))
    return [CheckResult(kind, la.layer, h, e, t, e <= t, control) for h, (e, t) in pairs]


def prefix_mass(la: LayerAttention) -> torch.Tensor:
    """alpha [batch, n_heads, pos]: attention on all prefix keys."""
    return la.pattern[..., : la.n_virtual].sum(-1)


def decompose(la: LayerAttention, t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Split the prefixed head output into its content and per-prefix parts.

    Args:
        la: captured layer.
        t: [batch, pos, n_heads, d_head] the no-prefix output; recomputed if None.

    Returns:
        "content": (1 - alpha_i) t_i, [batch, pos, n_heads, d_head];
        "prefix": a_ij v^s_j, [batch, pos, n_heads, n_virtual, d_head];
        "bias": sum_j a_ij v^s_j, [batch, pos, n_heads, d_head];
        "whole": the real prefixed output z.
    """
    if t is None:
        t = la.recompute()[1]
    alpha = prefix_mass(la).transpose(1, 2)  # [batch, pos, n_heads]
    a = la.pattern[..., : la.n_virtual].permute(0, 2, 1, 3)  # [batch, pos, n_heads, n_virtual]
    parts = a[..., None] * la.prefix_v[:, None]  # [batch, pos, n_heads, n_virtual, d_head]
    return {"content": (1 - alpha)[..., None] * t, "prefix": parts, "bias": parts.sum(3), "whole": la.z}


def check_attention(la: LayerAttention, base_pattern: torch.Tensor | None = None) -> list[CheckResult]:
    """Renormalised content attention with the prefix vs attention without it, per head.

    Args:
        la: captured layer.
        base_pattern: [batch, n_heads, pos, pos] no-prefix attention; recomputed if None.
    """
    base = la.recompute()[0] if base_pattern is None else base_pattern
    content = la.pattern[..., la.n_virtual :]  # [batch, n_heads, pos, pos]
    renorm = content / content.sum(-1, keepdim=True)
    err = (renorm - base).abs()
    tol = tolerance(la.pattern.dtype)
    return _results("attention", la, _per_head(err, 1), [tol] * la.n_heads)


def _output_scale(z: torch.Tensor) -> list[float]:
    return _per_head(z.abs(), 2)


def check_output(la: LayerAttention, t: torch.Tensor | None = None) -> list[CheckResult]:
    """Head output rebuilt as (1 - alpha) t + sum_j a_ij v_j vs the real one, per head."""
    parts = decompose(la, t)
    err = (parts["content"] + parts["bias"] - la.z).abs()  # [batch, pos, n_heads, d_head]
    tols = [tolerance(la.z.dtype, s) for s in _output_scale(la.z)]
    return _results("output", la, _per_head(err, 2), tols)


def check_span(la: LayerAttention, t: torch.Tensor | None = None) -> list[CheckResult]:
    """The prefix-induced bias t^pt - (1 - alpha) t lies in span{v^s_j}: projection residual per head.

    The span is taken from an SVD of the prefix values (rank cut at float tolerance). When
    n_virtual >= d_head the span may be the whole head space and the check is vacuous.
    """
    if t is None:
        t = la.recompute()[1]
    alpha = prefix_mass(la).transpose(1, 2)[..., None]  # [batch, pos, n_heads, 1]
    bias = la.z - (1 - alpha) * t  # [batch, pos, n_heads, d_head]
    vs = la.prefix_v.transpose(-1, -2)  # [batch, n_heads, d_head, n_virtual]
    u, sv, _ = torch.linalg.svd(vs, full_matrices=False)  # u: [batch, n_heads, d_head, r]
    keep = (sv > sv.amax(-1, keepdim=True) * RTOL.get(vs.dtype, 1e-5) * 10).to(u.dtype)
    u = u * keep[..., None, :]  # drop directions of numerically zero singular value
    b = bias.transpose(1, 2)  # [batch, n_heads, pos, d_head]
    proj = (b @ u) @ u.transpose(-1, -2)  # [batch, n_heads, pos, d_head]
    err = (b - proj).abs()
    tols = [tolerance(la.z.dtype, s) for s in _output_scale(la.z)]
    return _results("span", la, _per_head(err, 1), tols)


def check_alpha_control(
    la: LayerAttention, delta: float = 0.1, t: torch.Tensor | None = None
) -> list[CheckResult]:
    """Negative control: rebuild with alpha + delta (bias direction kept). Must fail.

    The rebuilt output is (1 - alpha - delta) t + (alpha + delta) b / alpha with b the true bias, so the
    error is delta * |b / alpha - t|: it does not shrink with alpha.
    """
    if t is None:
        t = la.recompute()[1]
    parts = decompose(la, t)
    alpha = prefix_mass(la).transpose(1, 2)[..., None]  # [batch, pos, n_heads, 1]
    direction = parts["bias"] / alpha.clamp_min(torch.finfo(alpha.dtype).tiny)
    rebuilt = (1 - alpha - delta) * t + (alpha + delta) * direction
    err = (rebuilt - la.z).abs()
    tols = [tolerance(la.z.dtype, s) for s in _output_scale(la.z)]
    return _results("control_alpha", la, _per_head(err, 2), tols, control=True)


def check_weights_control(la: LayerAttention, adapted_module: nn.Module) -> list[CheckResult]:
    """Negative control: a weight-modified layer (LoRA, full fine-tuning) vs the base on the same inputs.

    Runs `adapted_module` (the same layer's attention in the modified model) on the captured inputs
    without prefix and applies the prefix decomposition with alpha = 0: its attention must equal the
    base attention and its output the base output. A change of W_Q/W_K (pattern) or W_V (values) makes
    both fail, which no prefix can do.

    Returns:
        Results of kinds "control_weights_attention" and "control_weights_output".
    """
    base_pattern, base_z = la.recompute()
    ft_pattern, ft_z = la.recompute(adapted_module)
    att = _per_head((ft_pattern - base_pattern).abs(), 1)
    out = _per_head((ft_z - base_z).abs(), 2)
    tol = tolerance(base_pattern.dtype)
    tols = [tolerance(base_z.dtype, s) for s in _output_scale(base_z)]
    return _results("control_weights_attention", la, att, [tol] * la.n_heads, True) + _results(
        "control_weights_output", la, out, tols, True
    )


def alpha_stats(la: LayerAttention) -> list[AlphaStats]:
    """alpha_i per head: min, median and max over content positions and inputs."""
    alpha = prefix_mass(la).transpose(0, 1).reshape(la.n_heads, -1)  # [n_heads, batch * pos]
    med = alpha.median(dim=1).values
    return [
        AlphaStats(la.layer, h, float(alpha[h].min()), float(med[h]), float(alpha[h].max()))
        for h in range(la.n_heads)
    ]


def check_layer(la: LayerAttention, controls: bool = True) -> list[CheckResult]:
    """All identity checks (and the alpha control) of one layer; the no-prefix run is computed once."""
    if la.n_virtual == 0:
        return []
    base_pattern, t = la.recompute()
    results = check_attention(la, base_pattern) + check_output(la, t) + check_span(la, t)
    if controls:
        results += check_alpha_control(la, t=t)
    return results


def check_layers(layers: list[LayerAttention], controls: bool = True) -> list[CheckResult]:
    """`check_layer` over every captured layer."""
    return [r for la in layers for r in check_layer(la, controls)]


@torch.no_grad()
def perturbed_copy(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """A deep copy of an attention module with a rank-1 update on every 2-D weight (a stand-in fine-tune).

    Each weight W gets scale * |W|_F * u v^T with unit random u, v (seeded): it changes W_Q, W_K (the
    pattern) and W_V (the values) at once, as full fine-tuning may (paper's Eq. 7). Family-agnostic,
    so the weight-update control runs on our GPT and on any HF attention module alike.
    """
    import copy

    twin = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    for p in twin.parameters():
        if p.dim() == 2:
            u = torch.randn(p.shape[0], generator=gen, dtype=torch.float64)
            v = torch.randn(p.shape[1], generator=gen, dtype=torch.float64)
            update = (
                torch.outer(u / u.norm(), v / v.norm()) * float(p.double().norm()) * scale
            )  # [d_out, d_in]
            p.add_(update.to(p.dtype))
    return twin
