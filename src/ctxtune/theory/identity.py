"""The Section 4 identity on one adapted model, as one JSON-ready report: shared by `ctxtune check attention`
and the `identity` analysis of studies (ctxtune.experiments.analyses).

`context_report(method, seed)`: a context method (its `identity` fact "holds": virtual keys/values before the
content) on its model: the identity checks at every layer and head on a few random inputs (renormalised content
attention, output reconstruction, bias in the span of the prefix values, the alpha control), the weight-update
negative control (a perturbed copy of each layer must fail), alpha statistics and the cross-layer changes
against the base model's own run (information, not a check).

`weight_report(method, base, seed)`: a weight method (identity "none": LoRA, full fine-tuning): the identity
does not apply; the trained attention and the base's on the same layer inputs, where a change of relative
attention (q or k adapted) and of the head outputs (q, k or v adapted) is expected and its size is reported as a
margin over the tolerance a prefix passes at.

`summarise(report)` condenses either into one worst case per kind of check (for study results, where every
head of a 30-layer model would be too long).
"""

from __future__ import annotations

from typing import Any

import torch

from ctxtune.theory.attention import CheckResult, alpha_stats, check_layers, check_weights_control, perturbed_copy
from ctxtune.theory.cross_layer import cross_layer_changes

N_INPUTS, N_TOKENS = 2, 12
CHECK_KEYS = ("layer", "head", "kind", "max_abs_err", "tol", "passed", "control")


def random_tokens(model: Any, method: Any, seed: int, n_inputs: int = N_INPUTS,
                  n_tokens: int = N_TOKENS) -> torch.Tensor:
    """[n_inputs, up to n_tokens] random content tokens that fit the model with the method's added positions."""
    extra = method.positions_added(method.config) if method is not None else 0
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, model.cfg.d_vocab, (n_inputs, max(1, min(n_tokens, model.cfg.n_ctx - extra))),
                         generator=gen)


def context_report(method: Any, seed: int, n_inputs: int = N_INPUTS, n_tokens: int = N_TOKENS) -> dict[str, Any]:
    """The identity checks, alpha statistics and cross-layer changes of a context method on its model."""
    from ctxtune.theory.capture import capture_for, capture_method

    model = method.model
    tokens = random_tokens(model, method, seed, n_inputs, n_tokens)
    layers = capture_method(method, tokens)
    base = capture_for(model)(model, tokens, position_ids=layers[0].position_ids)
    results: list[CheckResult] = check_layers(layers)
    for la, module in zip(layers, model.attention_modules(), strict=True):
        results += check_weights_control(la, perturbed_copy(module, seed))
    return {
        "method": method.key, "identity": method.identity, "length": layers[0].n_virtual,
        "checks": [{k: r.to_dict()[k] for k in CHECK_KEYS} for r in results],
        "alpha": [vars(s) for la in layers for s in alpha_stats(la)],
        "cross_layer": [c.to_dict() for c in cross_layer_changes(layers, base)],
        "passed": all(r.ok for r in results),
    }


def expected_moves(method: Any) -> dict[str, bool]:
    """Which weight-control checks a trained weight method must fail (its change must show): relative attention
    when it adapts q or k; the head outputs when it adapts q, k or v (a method without `targets` adapts all)."""
    targets = set(getattr(method.config, "targets", ("q", "k", "v", "o")))
    return {"control_weights_attention": bool(targets & {"q", "k"}),
            "control_weights_output": bool(targets & {"q", "k", "v"})}


def weight_report(method: Any, base: Any, seed: int, n_inputs: int = N_INPUTS,
                  n_tokens: int = N_TOKENS) -> dict[str, Any]:
    """The weight control of a trained weight method (on its own model) against `base`, an unadapted copy of the
    model in the same dtype: base vs trained attention on the base's layer inputs."""
    from ctxtune.theory.capture import capture_for

    tokens = random_tokens(base, None, seed, n_inputs, n_tokens)
    layers = capture_for(base)(base, tokens)
    expected = expected_moves(method)
    checks = []
    with method.active(None):
        for la, trained in zip(layers, method.model.attention_modules(), strict=True):
            for r in check_weights_control(la, trained):
                must_fail = expected[r.kind]
                checks.append({**{k: r.to_dict()[k] for k in CHECK_KEYS}, "margin": r.margin,
                               "expected_to_fail": must_fail, "ok": (not r.passed) or not must_fail})
    margins = {kind: max(c["margin"] for c in checks if c["kind"] == kind) for kind in expected}
    return {"method": method.key, "identity": method.identity, "length": 0, "checks": checks, "alpha": [],
            "cross_layer": [], "weight_control": {"expected_to_move": expected, "max_margin": margins},
            "passed": all(c["ok"] for c in checks)}


def status(report: dict[str, Any]) -> str:
    """One phrase for the outcome; a weight method never reads as the identity passing."""
    if report["identity"] == "none":
        return "the identity does not apply" + ("" if report["passed"] else "; weight control unexpected")
    return "all checks as expected" if report["passed"] else "some checks failed"


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Per kind of check, the worst head: its error, tolerance, margin (error / tolerance) and place, how many
    heads had the expected outcome; plus alpha's range and the largest cross-layer change (JSON-ready)."""
    kinds: dict[str, dict[str, Any]] = {}
    for c in report["checks"]:
        margin = c["max_abs_err"] / c["tol"] if c["tol"] > 0 else float("inf")
        ok = c.get("ok", c["passed"] != c["control"])
        entry = kinds.setdefault(c["kind"], {"control": c["control"], "n": 0, "n_ok": 0, "margin": -1.0})
        entry["n"] += 1
        entry["n_ok"] += bool(ok)
        # an identity check's worst head has the largest margin; a control's the smallest (closest to passing)
        worse = margin > entry["margin"] if not c["control"] or c.get("expected_to_fail") is False \
            else entry["margin"] < 0 or margin < entry["margin"]
        if worse:
            entry.update(max_abs_err=c["max_abs_err"], tol=c["tol"], margin=margin, layer=c["layer"],
                         head=c["head"])
    out: dict[str, Any] = {"method": report["method"], "identity": report["identity"], "length": report["length"],
                           "passed": report["passed"], "status": status(report), "checks": kinds}
    if report["alpha"]:
        out["alpha"] = {"min": min(a["min"] for a in report["alpha"]), "max": max(a["max"] for a in report["alpha"])}
    if report["cross_layer"]:
        first = [c["max_abs_change"] for c in report["cross_layer"] if c["layer"] == 0]
        out["cross_layer"] = {"layer0_max": max(first, default=0.0),
                              "max": max(c["max_abs_change"] for c in report["cross_layer"])}
    if "weight_control" in report:
        out["weight_control"] = report["weight_control"]
    return out
