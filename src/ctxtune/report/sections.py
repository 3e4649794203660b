"""Markdown for the parts of a report that are not accuracy cells: analyses and the universal approximation.

Pure formatting of JSON the jobs wrote (torch-free). One renderer per analysis kind
(ctxtune.experiments.analyses) and one for `ctxtune approx` results.
"""

from __future__ import annotations

from typing import Any


def decomposition_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| adaptation | method | layer | attention err | output err | fixed-bias unexplained | key dep. | "
        "value dep. | mean alpha |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["layers"]:
        lines.append(
            f"| {r['adaptation']} | {r['method']} | {r['layer'] + 1} | {r['attention_err']:.1e} | "
            f"{r['output_err']:.1e} | {r['fixed_bias_unexplained']:.3g} | {r['key_dependence']:.3g} | "
            f"{r['value_dependence']:.3g} | {r['mean_alpha']:.3f} |"
        )
    return lines


DECOMPOSITION_TEXT = (
    "Per layer (1-based), how far each trained context method fits the prefix decomposition of paper.md §4 "
    "on the same layer input: attention and output reconstruction errors (float64), the fraction of the "
    "bias no input-independent values explain (0 for any prefix or leading soft prompt; a suffix's keys and "
    "values depend on the input from layer 2 on), the relative spread of the virtual keys and values over "
    "inputs, and the mean attention mass on the virtual tokens."
)


def diagnose_table(per_seed: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| seed | expected (paper) | diagnosis (flagged heads) | fit accuracy | our prefix | agrees (paper / ours) "
        "| held out |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in per_seed:
        res = entry.get("result")
        if not res:
            lines.append(f"| {entry['seed']} | - | {entry.get('status')}: {entry.get('error')} | - | - | - | - |")
            continue
        d = res["diagnosis"]
        flagged = ", ".join(d["flagged"]) or "none"
        fit = "-" if d.get("lora_accuracy") is None else f"{100 * d['lora_accuracy']:.1f}%"
        prefix = "-" if res.get("prefix_accuracy") is None else f"{100 * res['prefix_accuracy']:.1f}%"
        agree = " / ".join(
            "-" if res.get(k) is None else ("yes" if res[k] else "no")
            for k in ("agrees_with_paper", "agrees_with_our_prefix")
        )
        lines.append(
            f"| {entry['seed']} | {res.get('expected') or '-'} | {res['predicted']} ({flagged}) | {fit} | {prefix} | "
            f"{agree} | {'yes' if res.get('held_out') else 'no'} |"
        )
    return lines


DIAGNOSE_TEXT = (
    "`ctxtune diagnose` fits a LoRA, then compares each head with the base on the same layer inputs; a "
    "first-layer head whose relative content attention moved (and whose output changed) needs a new "
    "attention pattern, which no context method can produce. The verdict is computed before and "
    "independently of the prefix run it is compared with."
)


def analysis_section(name: str, analysis: dict[str, Any]) -> list[str]:
    """Markdown lines for one analysis of a study (all seeds)."""
    kind = analysis["kind"]
    lines = [f"#### Analysis `{name}` ({kind}; adaptations {', '.join(analysis['adaptations'])})", ""]
    if kind == "decomposition":
        lines += [DECOMPOSITION_TEXT, ""]
        for entry in analysis["per_seed"]:
            lines.append(f"Seed {entry['seed']}:")
            lines.append("")
            if entry.get("result"):
                lines += decomposition_table(entry["result"])
            else:
                lines.append(f"{entry.get('status')}: {entry.get('error')}")
            lines.append("")
    elif kind == "diagnose":
        lines += [DIAGNOSE_TEXT, "", *diagnose_table(analysis["per_seed"]), ""]
    return lines


def diagnose_agreement(analyses: dict[str, Any]) -> list[str]:
    """One summary over every diagnose analysis of a study: agreement with our prefixes and with the paper,
    separately for the calibration cases (the thresholds were set on them) and the held-out ones."""
    tally: dict[bool, dict[str, list[int]]] = {}
    for analysis in analyses.values():
        if analysis.get("kind") != "diagnose":
            continue
        for entry in analysis["per_seed"]:
            res = entry.get("result") or {}
            counts = tally.setdefault(bool(res.get("held_out")), {"ours": [0, 0], "paper": [0, 0], "inconclusive": [0]})
            if res.get("predicted") == "inconclusive":
                counts["inconclusive"][0] += 1
            for key, field in (("ours", "agrees_with_our_prefix"), ("paper", "agrees_with_paper")):
                if res.get(field) is not None:
                    counts[key][0] += bool(res[field])
                    counts[key][1] += 1
    if not tally:
        return []
    lines = ["| cases | agree with our prefix | agree with the paper | inconclusive |", "|---|---|---|---|"]
    for held_out in sorted(tally):
        c = tally[held_out]
        lines.append(f"| {'held out (not used to set the thresholds)' if held_out else 'calibration'} | "
                     f"{c['ours'][0]}/{c['ours'][1]} | {c['paper'][0]}/{c['paper'][1]} | {c['inconclusive'][0]} |")
    return [*lines, ""]


def universal_table(result: dict[str, Any]) -> str:
    """Markdown table of sup / L2 errors against P (results of `ctxtune approx`)."""
    ps = result["P"]
    head = "| target | error | " + " | ".join(f"P={p}" for p in ps) + " | slope |"
    lines = [head, "|" + "---|" * (len(ps) + 3)]
    for name in result["targets"]:
        for kind in ("sup", "l2"):
            vals = " | ".join(f"{v:.2e}" for v in result["errors"][name][kind])
            sl = result["slopes"].get(name, {}).get(kind, float("nan"))
            lines.append(f"| {name} | {kind} | {vals} | {sl:.2f} |")
    fk = result["fixed_kappa"]
    vals = " | ".join(f"{v:.2e}" for v in fk["sup"])
    lines.append(f"| {fk['target']} (kappa fixed {fk['kappa']:g}) | sup | {vals} | |")
    return "\n".join(lines)


UNIVERSAL_TEXT = (
    "A hand-set single-head attention layer (never trained) on the circle; the prefix puts P keys on the "
    "circle with values f(key) and a sharpness that grows as P^2 (kernel smoother). Sup and L2 errors on "
    "4,096 points; slope = log-log slope over the last four P. Continuous targets converge; the step "
    "stalls at half its jump in sup norm (a continuous output cannot follow a jump) while its L2 error "
    "still falls; with the prefix norm (temperature) held fixed the error floors."
)


def universal_section(kernel: dict[str, Any] | None, fit: dict[str, Any] | None) -> list[str]:
    """The universal approximation section from `ctxtune approx` results (kernel, and optionally fit mode)."""
    lines = ["## Universal approximation by prefixing one fixed head (`ctxtune approx`)", ""]
    if kernel is None:
        return [*lines, "_No results: run `ctxtune approx --out DIR/universal.json`._", ""]
    lines += [UNIVERSAL_TEXT, "", universal_table(kernel), ""]
    if fit is not None:
        lines += ["Prefixes optimised by Adam from the kernel prefix:", "", universal_table(fit), ""]
    return lines


def universal_plot(result: dict[str, Any], path: Any) -> None:
    """Log-log plot of sup (solid) and L2 (dashed) error against P, plus the fixed-kappa ablation."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ps = result["P"]
    for i, name in enumerate(result["targets"]):
        color = f"C{i}"
        ax.loglog(ps, result["errors"][name]["sup"], "-o", color=color, label=f"{name} sup")
        ax.loglog(ps, result["errors"][name]["l2"], "--", color=color, label=f"{name} L2")
    fk = result["fixed_kappa"]
    ax.loglog(ps, fk["sup"], ":k", label=f"{fk['target']} sup, kappa fixed at {fk['kappa']:g}")
    ax.set_xlabel("prefix length P")
    ax.set_ylabel("error")
    ax.set_title(f"Prefixing one fixed attention head ({result['mode']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
