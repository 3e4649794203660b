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


def analysis_section(name: str, analysis: dict[str, Any], plot: str | None = None) -> list[str]:
    """Markdown lines for one analysis of a study (all seeds); `plot`: the path of its figure, if it has one."""
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
    elif kind == "identity":
        lines += [IDENTITY_TEXT, "", *identity_table(analysis["per_seed"]), ""]
    elif kind == "attention_change":
        lines += [ATTENTION_TEXT, "", *attention_change_table(analysis["per_seed"]), ""]
        if plot:
            lines += [f"![Attention of the most-changed head, base and adapted]({plot})", ""]
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


# ----- identity and attention_change (issue 17) ----------------------------------------------------------------
IDENTITY_TEXT = (
    "The Section 4 identity checks of `ctxtune check attention --adapter` on each trained adapter, on random "
    "content tokens: for a context method, the worst head's error against its float tolerance (renormalised "
    "content attention, output reconstruction, bias in the span of the prefix values; every head must pass) and "
    "how far the negative controls fail (x tolerance; they must fail). A weight method (LoRA) changes the "
    "attention itself: the identity does not apply, and the weight control says how far its trained attention "
    "and head outputs moved on the base's own layer inputs, in multiples of the tolerance a prefix passes at."
)


def _fmt(x: float | None, spec: str = ".1e") -> str:
    return "-" if x is None else format(x, spec)


def identity_table(per_seed: list[dict[str, Any]]) -> list[str]:
    lines = ["| seed | adaptation | method | outcome | attention err / tol | output err / tol | span err / tol | "
             "controls fail by (x tol) | weight control: attention / outputs moved (x tol) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in per_seed:
        res = entry.get("result")
        if not res:
            failed = f"{entry.get('status')}: {entry.get('error')}"
            lines.append(f"| {entry['seed']} | - | - | {failed} | - | - | - | - | - |")
            continue
        for row in res["adapters"]:
            checks = row["checks"]
            cells = [f"{_fmt(checks[k]['max_abs_err'])} / {_fmt(checks[k]['tol'])}" if k in checks else "-"
                     for k in ("attention", "output", "span")]
            controls = [c for c in checks.values() if c["control"] and c.get("n")]
            if "weight_control" in row:
                control = "-"
                margin = row["weight_control"]["max_margin"]
                weights = " / ".join(_fmt(margin.get(k)) for k in ("control_weights_attention",
                                                                     "control_weights_output"))
            else:
                control = f"{_fmt(min(c['margin'] for c in controls))} or more" if controls else "-"
                weights = "-"
            outcome = ("**" + row["status"] + "**") if not row["passed"] else row["status"]
            lines.append(f"| {entry['seed']} | {row['adaptation']} | {row['method']} | {outcome} | "
                         f"{' | '.join(cells)} | {control} | {weights} |")
    return lines


ATTENTION_TEXT = (
    "How far each trained adapter moved the attention over the content, against the base model's own run on "
    "the same test examples: per layer and head, the total-variation distance between the adapted run's "
    "content attention (renormalised over the content keys) and the base's, on the rows that predict output "
    "tokens (0: the same pattern; 1: disjoint). In layer 1 both runs see the same layer input, so a context "
    "method cannot move it (paper.md §4: TV at float level); from layer 2 on its inputs have changed and "
    "patterns can move (cross-layer effects, §5). A LoRA on the query maps moves layer 1 directly."
)


def attention_change_table(per_seed: list[dict[str, Any]]) -> list[str]:
    lines = ["| seed | adaptation | method | layer 1: max TV (head) | largest max TV (layer) | "
             "most-changed head (mean TV) |", "|---|---|---|---|---|---|"]
    for entry in per_seed:
        res = entry.get("result")
        if not res:
            lines.append(f"| {entry['seed']} | - | - | {entry.get('status')}: {entry.get('error')} | - | - |")
            continue
        for row in res["adapters"]:
            per_layer = row["per_layer_max"]
            deepest = max(range(len(per_layer)), key=lambda i: per_layer[i])
            top = row["top"]
            lines.append(f"| {entry['seed']} | {row['adaptation']} | {row['method']} | "
                         f"{_fmt(row['layer0']['max_tv'], '.2g')} ({row['layer0']['head'] + 1}) | "
                         f"{per_layer[deepest]:.3f} ({deepest + 1}) | {top['layer'] + 1}.{top['head'] + 1} "
                         f"({top['mean_tv']:.3f}) |")
    return lines


def attention_plot_rows(analysis: dict[str, Any]) -> tuple[int, list[dict[str, Any]]] | None:
    """(seed, adapter rows) drawn in the attention plot: the first seed with a result, the adaptations of the
    analysis' `plot` option (all when absent)."""
    wanted = analysis.get("options", {}).get("plot")
    for entry in analysis["per_seed"]:
        res = entry.get("result")
        if res:
            rows = [r for r in res["adapters"] if not wanted or r["adaptation"] in wanted]
            return (entry["seed"], rows) if rows else None
    return None


def attention_figure(analysis: dict[str, Any]) -> Any:
    """Base (left) and adapted (right) attention of each drawn adapter's most-changed head on one example: rows
    are the queries that predict the output, columns the content keys (a line after the prompt)."""
    picked = attention_plot_rows(analysis)
    if picked is None:
        return None
    seed, rows = picked
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 2.3 * len(rows) + 0.6), squeeze=False)
    for i, row in enumerate(rows):
        top = row["top"]
        for j, (label, matrix) in enumerate((("base", top["base"]), ("adapted", top["adapted"]))):
            ax = axes[i, j]
            image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.axvline(top["n_prompt"] - 0.5, color="white", lw=1, ls="--")
            ax.set_xticks(range(len(top["key_labels"])))
            ax.set_xticklabels(top["key_labels"], rotation=60, fontsize=6)
            ax.set_yticks(range(len(top["query_labels"])))
            ax.set_yticklabels(top["query_labels"], fontsize=6)
            ax.set_title(f"{row['adaptation']} ({row['method']}), layer {top['layer'] + 1} head {top['head'] + 1}: "
                         f"{label}" + (f" (mean TV {top['mean_tv']:.2f})" if j else ""), fontsize=7)
        fig.colorbar(image, ax=axes[i, 1], fraction=0.04)
    fig.suptitle(f"Most-changed head per adapter, seed {seed}: query (rows) attention over the content keys "
                 "(columns; dashed: end of prompt)", fontsize=8)
    fig.tight_layout()
    return fig


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----- the "Real model" section: a study on a pretrained model as it is (a `source` base) ------------------
BASE_METHODS = ("none", "pretrained")
"""Rows that train nothing: the model as it is (method none) or a pretraining run."""


def is_real_model(st: dict[str, Any]) -> bool:
    """A study on an existing pretrained model: one of its bases has a `source` (nothing pretrained here)."""
    return any(isinstance(b, dict) and "source" in b for b in st.get("config", {}).get("bases", {}).values())


def _trained_task(row: str) -> str:
    return row.split(".", 1)[1] if "." in row else row


def trained_tasks(st: dict[str, Any]) -> list[str]:
    """The tasks adapters trained on, in the order of the study's cells."""
    tasks = [c["task"] for c in st["cells"] if c["method"] not in BASE_METHODS and c["task"] == _trained_task(c["row"])]
    return list(dict.fromkeys(tasks))


def real_model_accuracy(st: dict[str, Any]) -> list[str]:
    """Per trained task: the base as it is in each context of the task, then every method, per seed."""
    seeds = sorted({s for c in st["cells"] for s in c["seeds"]})
    lines = ["| task | row | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|---|" + "---|" * (len(seeds) + 1)]
    for task in trained_tasks(st):
        rows = [c for c in st["cells"] if c["method"] in BASE_METHODS
                and (c["task"] == task or c["task"].startswith(task + "_"))]
        rows += [c for c in st["cells"] if c["method"] not in BASE_METHODS and c["task"] == task]
        for c in rows:
            by_seed = dict(zip(c["seeds"], c["values"], strict=False))
            values = " | ".join("-" if s not in by_seed else f"{100 * by_seed[s]:.1f}%" for s in seeds)
            what = f"as it is (`{c['row']}`) on `{c['task']}`" if c["method"] in BASE_METHODS else f"`{c['row']}`"
            mean = "-" if c["mean"] is None else f"**{100 * c['mean']:.1f}%**"
            lines.append(f"| {task} | {what} | {c['method']} | {values} | {mean} |")
    return lines


def curve_series(st: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per trained task, one series per adapter with evaluations during training: method, seed, steps, accuracy."""
    methods = {c["row"]: c["method"] for c in st["cells"]}
    out: dict[str, list[dict[str, Any]]] = {}
    for curve in st["curves"]:
        for i, label in enumerate(curve["labels"]):
            row, _, seed = label.rpartition(" seed ")
            if not curve["eval_steps"] or methods.get(row) in BASE_METHODS:
                continue
            out.setdefault(_trained_task(row), []).append({
                "row": row, "method": methods.get(row, row), "seed": seed, "steps": curve["eval_steps"],
                "accuracy": [a[i] for a in curve["eval_accuracy"]],
                "loss_steps": curve["steps"], "loss": [v[i] for v in curve["loss"]]})
    return out


def curves_figure(st: dict[str, Any], task: str, series: list[dict[str, Any]]) -> Any:
    """Exact match during training (left) and training loss (right) on `task`: a colour per method, a line style
    per seed; the base as it is on the bare task, dashed grey."""
    plt = _pyplot()
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 3.6))
    methods = list(dict.fromkeys(s["method"] for s in series))
    seeds = sorted({s["seed"] for s in series})
    styles = ["-", "--", ":", "-."]
    for s in series:
        colour = f"C{methods.index(s['method'])}"
        style = styles[seeds.index(s["seed"]) % len(styles)]
        acc.plot(s["steps"], [100 * a for a in s["accuracy"]], style, color=colour, marker=".",
                 label=f"{s['method']} seed {s['seed']}")
        if s["loss_steps"]:
            loss.plot(s["loss_steps"], s["loss"], style, color=colour, lw=0.8, label=f"{s['method']} seed {s['seed']}")
    base = [c for c in st["cells"] if c["method"] in BASE_METHODS and c["task"] == task and c["mean"] is not None]
    if base:
        acc.axhline(100 * base[0]["mean"], color="grey", ls="--", lw=1, label="as it is (bare)")
    acc.set(xlabel="step", ylabel="exact match (%)", ylim=(-3, 103), title=f"{task}: accuracy during training")
    loss.set(xlabel="step", ylabel="training loss", yscale="log", title=f"{task}: training loss")
    acc.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def real_model_figures(name: str, st: dict[str, Any]) -> dict[str, Any]:
    """Plot name -> matplotlib figure: the curves per trained task, and each attention_change analysis' patterns."""
    figures: dict[str, Any] = {}
    if is_real_model(st):
        for task, series in curve_series(st).items():
            figures[f"{name}-real-curves-{task}"] = curves_figure(st, task, series)
    for an_name, analysis in st.get("analyses", {}).items():
        if analysis.get("kind") == "attention_change":
            fig = attention_figure(analysis)
            if fig is not None:
                figures[f"{name}-attention-{an_name}"] = fig
    return figures


REAL_MODEL_TEXT = (
    "A pretrained model as it is (no pretraining here): its accuracy in every context of each task beside what "
    "each method learned on the bare task, per seed (exact match on held-out lists), and the accuracy during "
    "training. The identity checks, the attention change and the diagnostic's verdict follow as analyses."
)


def real_model_section(name: str, st: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Markdown of the "Real model" section: accuracies per method, task and seed beside the base, the curves."""
    lines = ["### Real model", "", REAL_MODEL_TEXT, "", *real_model_accuracy(st), ""]
    for task in trained_tasks(st):
        key = f"{name}-real-curves-{task}"
        if key in plots:
            lines += [f"![Learning curves on {task}]({plots[key]})", ""]
    return lines
