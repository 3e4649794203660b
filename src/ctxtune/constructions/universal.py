"""Universal approximation by prefixing one fixed attention head (Petrov, Torr, Bibi, ICML 2024; paper.md §9).

With P prefix positions, a content query x_i gets the bias sum_j a_ij v_j with mixing weights
a_ij / a_i = softmax_j(x_i^T H s_j) (paper.md §4, longer prefixes): an input-dependent convex mix of
the prefix values. Choosing the prefix keys as points on the input domain and sharp scores turns this
mix into a kernel smoother (Nadaraya-Watson with a von Mises kernel), which approximates any continuous
function on a compact domain as P grows. Here the head is a real ctxtune `GPT` layer (one layer, one
head, no norm, no MLP, no residual, no positions) whose weights are set by hand and never trained; only
the prefix (a `LayerPrefix` of hidden states, the paper's tied form) changes with the target.

The fixed head (d_model = d_head = 4; coordinates [u1, u2, flag, value]):
    input token  e(theta) = [cos theta, sin theta, 0, 0]   (the circle S^1: a compact domain)
    prefix s_j            = [rho cos theta_j, rho sin theta_j, 1, f(theta_j)]
    query  W_Q e + b_Q    = [beta u1, beta u2, 1, 0]
    key    W_K e + b_K    = [u1, u2, M (flag - 1), 0]      (content key gets -M: it takes no attention)
    value  W_V e          = [0, 0, 0, value]; W_O = identity.
The score of the input on prefix j is beta rho cos(theta - theta_j) / sqrt(d_head): a von Mises kernel
whose concentration kappa = beta rho / 2 the PREFIX sets through its norm rho (the model is fixed). The
content key scores beta - M (M = 1e4), so the input's own weight is ~0, and its value is 0 anyway: the
head output's last coordinate is sum_j w_j f(theta_j) with w = softmax_j(kappa cos(theta - theta_j)).

Construction ("kernel"): theta_j = -pi + 2 pi (j + 1/2) / P, kappa = (c P / (2 pi))^2 (kernel width ~ spacing / c,
c = 2.5 by default). Alternative ("fit"): start there and optimise all prefix coordinates by Adam on the
squared error (the prefix-tuning way).

Conditions (what the measurements show):
* f continuous on the compact domain: the sup error -> 0 as P -> infinity, provided the kernel sharpens
  with P (kappa ~ P^2, i.e. prefix norms grow ~ P^2). With the prefix norm held fixed (`kappa_fixed`),
  the error floors at the kernel's smoothing bias however long the prefix.
* Smooth f: the sup error falls about as P^-1.5 over P = 8..64 (c = 2.5); |theta| (kinks) as P^-1.
* Discontinuous f (a step): every prefix output is a continuous function of the input, so the sup error
  cannot go below half the jump; it stalls near 1 for sign(theta). The L2 error still -> 0 (~ P^-1/2).

Results JSON (`results/beyond/universal.json`; rendered by ctxtune.report.sections)::

    {"kind": "universal", "targets": [str], "P": [int], "mode": "kernel"|"fit", "c": float,
     "errors": {target: {"sup": [float per P], "l2": [float per P]}},
     "fixed_kappa": {"kappa": float, "target": str, "sup": [...], "l2": [...]},
     "slopes": {target: {"sup": float, "l2": float}}   # log-log slope over the last 4 values of P
    }
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ctxtune.errors import ConfigError
from ctxtune.limits import MAX_STEPS, check_memory
from ctxtune.model import GPT, LayerPrefix, ModelConfig

D = 4  # [u1, u2, flag, value]
BETA = 1.0
BIG_M = 1e4

TARGETS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sin3": lambda th: torch.sin(3 * th),
    "poly": lambda th: torch.cos(th) ** 3 - torch.cos(th) * torch.sin(th) + 0.5 * torch.sin(th) ** 2,
    "abs": lambda th: th.abs() / math.pi,
    "step": lambda th: torch.where(th >= 0, 1.0, -1.0).to(th.dtype),
}
"""Targets on the circle, as functions of the angle theta in [-pi, pi): two smooth (sin3, poly: a
polynomial in the embedding coordinates), one continuous with kinks (abs), one discontinuous (step,
jumps at 0 and pi)."""

SMOOTH = ("sin3", "poly")
P_VALUES = (1, 2, 4, 8, 16, 32, 64)


def fixed_head() -> GPT:
    """The hand-set single-head model (float64, eval mode, no trainable parameter)."""
    cfg = ModelConfig(
        n_layers=1,
        n_heads=1,
        d_model=D,
        n_ctx=4,
        d_vocab=2,
        norm="none",
        residual=False,
        mlp=False,
        pos="none",
        bias=True,
    )
    model = GPT(cfg).double().eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
            p.requires_grad_(False)
        attn.q_proj.weight[0, 0] = attn.q_proj.weight[1, 1] = BETA
        attn.q_proj.bias[2] = 1.0
        attn.k_proj.weight[0, 0] = attn.k_proj.weight[1, 1] = 1.0
        attn.k_proj.weight[2, 2] = BIG_M
        attn.k_proj.bias[2] = -BIG_M
        attn.v_proj.weight[3, 3] = 1.0
        attn.o_proj.weight.copy_(torch.eye(D, dtype=torch.float64))
    return model


def embed(theta: torch.Tensor) -> torch.Tensor:
    """Input tokens on the circle: [n] angles -> [n, 1, D] embeddings."""
    e = torch.zeros(theta.shape[0], 1, D, dtype=torch.float64)
    e[:, 0, 0], e[:, 0, 1] = torch.cos(theta), torch.sin(theta)
    return e


def kernel_prefix(
    f: Callable[[torch.Tensor], torch.Tensor], n_prefix: int, c: float = 2.5, kappa: float | None = None
) -> torch.Tensor:
    """The kernel-smoother prefix: [1, P, D] hidden states (see the module docstring).

    Args:
        f: target, angle -> value.
        n_prefix: P, the prefix length.
        c: sharpness relative to the spacing: kappa = (c P / (2 pi))^2.
        kappa: fixed concentration instead (the "bounded prefix norm" ablation).
    """
    if n_prefix < 1:
        raise ConfigError(f"prefix length must be positive, got {n_prefix}")
    theta = -math.pi + 2 * math.pi * (torch.arange(n_prefix, dtype=torch.float64) + 0.5) / n_prefix  # [P]
    kap = (c * n_prefix / (2 * math.pi)) ** 2 if kappa is None else kappa
    rho = 2 * kap / BETA  # the GPT divides scores by sqrt(d_head) = 2
    s = torch.zeros(1, n_prefix, D, dtype=torch.float64)
    s[0, :, 0], s[0, :, 1] = rho * torch.cos(theta), rho * torch.sin(theta)
    s[0, :, 2] = 1.0
    s[0, :, 3] = f(theta)
    return s


def head_output(model: GPT, prefix: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The head's scalar output (value coordinate) for inputs at angles `theta` [n]: [n]."""
    hidden = model(embeds=embed(theta), prefix=[LayerPrefix(hidden=prefix)], return_hidden=True)  # [n, 1, D]
    return hidden[:, 0, 3]


def fit_prefix(
    model: GPT,
    f: Callable[[torch.Tensor], torch.Tensor],
    n_prefix: int,
    steps: int = 300,
    lr: float = 0.02,
    c: float = 2.5,
) -> torch.Tensor:
    """Prefix-tuning: start at the kernel prefix and minimise the mean squared error on 512 angles by Adam.

    The key coordinates (u1, u2; scaled by the initial norm rho so that one learning rate fits both) and the
    value coordinate are optimised; the flag coordinate stays 1 (it only marks the token as a prefix).
    """
    init = kernel_prefix(f, n_prefix, c)  # [1, P, D]
    theta = -math.pi + 2 * math.pi * (torch.arange(512, dtype=torch.float64) + 0.5) / 512
    target = f(theta)
    rho = float(init[0, :, :2].norm(dim=-1).max())
    keys = (init[..., :2] / rho).clone().requires_grad_(True)  # [1, P, 2]
    values = init[..., 3:].clone().requires_grad_(True)  # [1, P, 1]
    flag = init[..., 2:3]

    def assemble() -> torch.Tensor:
        return torch.cat([keys * rho, flag, values], dim=-1)  # [1, P, D]

    opt = torch.optim.Adam([keys, values], lr=lr)
    best, best_loss = init, float("inf")
    for _ in range(steps + 1):
        opt.zero_grad()
        current = assemble()
        loss = ((head_output(model, current, theta) - target) ** 2).mean()
        if float(loss.detach()) < best_loss:  # keep the best prefix seen (Adam can overshoot at large rho)
            best, best_loss = current.detach().clone(), float(loss.detach())
        loss.backward()
        opt.step()
    return best


ERROR_GRID = 4096  # angles on which `errors` measures a prefix


def errors(
    model: GPT, prefix: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], n_grid: int = ERROR_GRID
) -> tuple[float, float]:
    """(sup, L2) error on a uniform grid of the circle (offset by half a step, so no grid point sits on a
    jump of the step target); L2 is the root mean square, i.e. the normalised L2 norm."""
    theta = -math.pi + 2 * math.pi * (torch.arange(n_grid, dtype=torch.float64) + 0.5) / n_grid
    with torch.no_grad():
        err = head_output(model, prefix, theta) - f(theta)
    return float(err.abs().max()), float(err.pow(2).mean().sqrt())


def slope(ps: list[int], errs: list[float], last: int = 4) -> float:
    """Least-squares log-log slope of error against P over the last `last` points."""
    x = torch.tensor([math.log(p) for p in ps[-last:]], dtype=torch.float64)
    y = torch.tensor([math.log(max(e, 1e-300)) for e in errs[-last:]], dtype=torch.float64)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc**2).sum())


def approximation_study(
    targets: list[str] | None = None,
    ps: tuple[int, ...] = P_VALUES,
    mode: str = "kernel",
    c: float = 2.5,
    fixed_kappa: float = 16.0,
    fit_steps: int = 300,
) -> dict[str, Any]:
    """Errors against P for every target (schema in the module docstring)."""
    targets = list(TARGETS) if targets is None else targets
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    if mode not in ("kernel", "fit"):
        raise ConfigError(f"mode must be 'kernel' or 'fit', got {mode!r}")
    if not ps or any(p < 1 for p in ps):
        raise ConfigError(f"prefix lengths must be positive integers, got {list(ps)}")
    if not targets:
        raise ConfigError(f"no target given; choose from {', '.join(TARGETS)}")
    if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or not 0 <= fit_steps <= MAX_STEPS:
        raise ConfigError(f"fit steps must be an integer in [0, {MAX_STEPS:,}], got {fit_steps!r}")
    # the error grid's attention scores, weights and products: [n_grid, P + 1] float64 a few times over
    check_memory(4 * 8 * ERROR_GRID * (max(ps) + 1), f"a prefix of P={max(ps)}", f"{ERROR_GRID} angles x P keys")
    model = fixed_head()
    out: dict[str, Any] = {
        "kind": "universal",
        "targets": targets,
        "P": list(ps),
        "mode": mode,
        "c": c,
        "errors": {},
        "slopes": {},
    }
    for name in targets:
        f = TARGETS[name]
        sups, l2s = [], []
        for p in ps:
            prefix = kernel_prefix(f, p, c) if mode == "kernel" else fit_prefix(model, f, p, fit_steps, c=c)
            sup, l2 = errors(model, prefix, f)
            sups.append(sup)
            l2s.append(l2)
        out["errors"][name] = {"sup": sups, "l2": l2s}
        if len(ps) >= 2:
            out["slopes"][name] = {"sup": slope(list(ps), sups), "l2": slope(list(ps), l2s)}
    ref = targets[0]
    fixed = [errors(model, kernel_prefix(TARGETS[ref], p, kappa=fixed_kappa), TARGETS[ref]) for p in ps]
    out["fixed_kappa"] = {
        "kappa": fixed_kappa,
        "target": ref,
        "sup": [e[0] for e in fixed],
        "l2": [e[1] for e in fixed],
    }
    return out
