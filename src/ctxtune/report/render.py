"""Render results.json as report.md (with plots in DIR/plots/) and a self-contained report.html.

The Markdown is the one source: the HTML is that Markdown rendered by markdown-it-py (CommonMark with
tables), styled, with every plot inlined as a base64 PNG. Only reads the results document (and, if present,
the `ctxtune approx` results); matplotlib (Agg) draws the plots.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

from ctxtune.claims import holds
from ctxtune.report.sections import (
    analysis_section,
    diagnose_agreement,
    is_real_model,
    real_model_figures,
    real_model_section,
    universal_section,
)

VERDICTS = {True: "holds", False: "does NOT hold", None: "not measured"}


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def ours(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "not run"
    per_seed = ", ".join(f"{100 * v:.1f}" for v in cell["values"])
    if cell["n"] < 2:
        return f"{pct(cell['mean'])} (n=1)"
    return f"{pct(cell['mean'])} ± {100 * cell['std']:.2f} (n={cell['n']}: {per_seed})"


def claim_lines(claim: dict[str, Any]) -> list[str]:
    out = []
    for ch in claim["checks"]:
        paper = f"; paper {pct(ch['paper'])}" if ch.get("paper") is not None else ""
        if ch["observed_mean"] is None:
            out.append(f"`{ch['cell']}`: not measured (threshold {ch['op']} {pct(ch['value'], 0)})")
            continue
        seeds = ", ".join(pct(v, 1) for v in ch["per_seed"])
        out.append(
            f"`{ch['cell']}`: {ch['seeds_holding']}/{ch['n']} seeds meet {ch['op']} {pct(ch['value'], 0)} "
            f"(per seed {seeds}; mean {pct(ch['observed_mean'])} ± {100 * (ch['observed_std'] or 0):.2f}{paper})"
            + time_to_threshold(ch.get("first_step_meeting") or [])
        )
    return out


def curve_trend(op: str, steps: list[int], accuracy: list[float]) -> str:
    """How the last quarter of training moved the accuracy, toward the threshold's side or not."""
    if len(steps) < 2:
        return "one evaluation only"
    last = steps[-1]
    start = max([i for i, st in enumerate(steps[:-1]) if st <= 0.75 * last] or [0])
    change = accuracy[-1] - accuracy[start]
    toward = change if op in (">=", ">") else -change
    word = "still moving toward the threshold" if toward > 0.02 else "flat or moving away"
    return f"{100 * change:+.1f} points over steps {steps[start]:,}-{last:,}: {word}"


def evidence_lines(claim: dict[str, Any], scale: str | None) -> list[str]:
    """For a claim that does not hold: each failing seed's learning curve, and what other scales measured."""
    out = []
    for ch in claim["checks"]:
        if ch["holds"] is not False:
            continue
        failing = {sd for sd, v in zip(ch.get("seeds") or [], ch["per_seed"], strict=False)
                   if not holds(v, ch["op"], ch["value"])}
        for cv in ch.get("curves") or []:
            if cv["seed"] not in failing:
                continue
            acc = ", ".join(f"{100 * a:.0f}" for a in cv["accuracy"])
            trend = curve_trend(ch["op"], cv["steps"], cv["accuracy"])
            out.append(f"evidence, `{ch['cell']}` seed {cv['seed']} during training (the trainer's check): {acc}% "
                       f"at steps {cv['steps'][0]:,}..{cv['steps'][-1]:,} ({trend})")
    for other, text in (claim.get("evidence") or {}).items():
        if other != scale:
            out.append(f"at {other} scale: {text}")
    return out


def time_to_threshold(entries: list[dict[str, Any]]) -> str:
    """"; first met during training: step 1,200 of 4,000 (seed 0), never (seed 1)" (from evaluation curves)."""
    if not entries:
        return ""
    parts = []
    for e in entries:
        when = "never" if e["step"] is None else f"step {e['step']:,}"
        total = "" if e["of"] is None else f" of {e['of']:,}"
        parts.append(f"{when}{total} (seed {e['seed']})")
    return "; first met during training: " + ", ".join(parts)


def header_lines(doc: dict[str, Any]) -> list[str]:
    env = doc["environment"]
    wall = doc.get("wall_seconds")
    factor = doc.get("step_factor", 1.0)
    lines = []
    if doc.get("scale"):
        lines.append(f"- scale: **{doc['scale']}**"
                     + (f", every step count x {factor} (shortened: not the paper's budget)" if factor != 1.0 else ""))
    lines.append(f"- seeds: {', '.join(str(s) for s in doc['seeds'])}")
    if doc.get("precision", "fp32") != "fp32":
        lines.append(f"- precision: **{doc['precision']}** (bfloat16 autocast in training, float32 master weights)")
    if doc.get("train_override"):
        lines.append(f"- SMOKE RUN: train settings overridden everywhere ({doc['train_override']}), "
                     f"test examples {doc.get('eval_examples_override')}: the numbers mean nothing")
    jobs = doc["jobs"]
    lines += [
        f"- jobs: {jobs['ok']} ok, {jobs['failed']} failed, {jobs['skipped']} skipped, {jobs.get('missing', 0)} "
        f"missing (of {jobs['total']})",
        f"- wall time: {wall:.0f} s" if isinstance(wall, (int, float)) else "- wall time: unknown",
        f"- compute time (sum over jobs): {doc.get('compute_seconds', 0):.0f} s; executor {doc.get('executor')}",
        f"- commit: `{env.get('commit')}`",
        f"- machine: {env.get('platform')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
        f"device {env.get('device')}",
        f"- created: {doc.get('created')}",
    ]
    return lines


def title(doc: dict[str, Any]) -> str:
    if doc.get("kind") == "sweep":
        return f"ctxtune sweep: {', '.join(doc['studies'])}"
    return f"ctxtune reproduce: {doc.get('scale')} scale"


def study_markdown(name: str, st: dict[str, Any], scale: str | None, plots: dict[str, str]) -> list[str]:
    out = [f"## {st['title']} (`{name}`)", ""]
    if st.get("summary"):
        out += [st["summary"].replace("\n", " "), ""]
    if st.get("paper_ref"):
        out += [f"Source: {st['paper_ref']}", ""]
    note = st["notes"].get(scale) if scale else None
    if note:
        out += [f"Scale note: {note}", ""]
    if st["claims"]:
        out += ["### Claims", ""]
        for cl in st["claims"]:
            out.append(f"- **{VERDICTS[cl['holds']]}**: {cl['text']}")
            out += [f"  - {line}" for line in claim_lines(cl)]
            if cl["holds"] is False:
                out += [f"  - {line}" for line in evidence_lines(cl, scale)]
        out.append("")
    out += ["### Ours vs the paper" if st["claims"] or any(c["paper"] is not None for c in st["cells"])
            else "### Results", "",
            "| row (adapter) | evaluated on | method | ours (mean ± std over seeds; per seed) | paper |",
            "|---|---|---|---|---|"]
    for c in st["cells"]:
        method = c["method"] + (" (extension)" if c["extension"] else "")
        out.append(f"| `{c['row']}` | {c['task']} | {method} | {ours(c)} | {pct(c['paper'])} |")
    out.append("")
    for kind, label in (("accuracy", "Accuracy"), ("curves", "Learning curves")):
        if f"{name}-{kind}" in plots:
            out += [f"![{label} for {name}]({plots[f'{name}-{kind}']})", ""]
    if is_real_model(st):
        out += real_model_section(name, st, plots)
    agreement = diagnose_agreement(st.get("analyses", {}))
    if agreement:
        out += ["### The diagnostic against trained prefixes", "", *agreement]
    for an_name, analysis in st.get("analyses", {}).items():
        out += analysis_section(an_name, analysis, plots.get(f"{name}-attention-{an_name}"))
    out += ["### Runs", "", "| run | status | method | trainable / adapter | steps | seconds |",
            "|---|---|---|---|---|---|"]
    for r in st["runs"]:
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        out.append(f"| `{r['id']}` | {status} | {r['method'] or '-'} | {r.get('trainable_per_adapter') or '-'} | "
                   f"{r.get('steps') or '-'} | {r.get('seconds') or '-'} |")
    out += ["", "### Configuration", "", "```json", json.dumps(st["config"], indent=1), "```", ""]
    return out


def to_markdown(doc: dict[str, Any], plots: dict[str, str] | None = None,
                extra: list[str] | None = None) -> str:
    """The report as Markdown; `plots` maps plot names to image paths, `extra` are lines appended at the end."""
    plots = plots or {}
    out = [f"# {title(doc)}", "", *header_lines(doc), ""]
    claims = [(name, cl) for name, st in doc["studies"].items() for cl in st["claims"]]
    if claims:
        out += ["## Claims at a glance", "",
                "A claim holds when every seed meets its threshold, not only the mean.", "",
                "| study | claim | verdict |", "|---|---|---|"]
        out += [f"| {name} | {cl['text']} | **{VERDICTS[cl['holds']]}** |" for name, cl in claims]
        out.append("")
    for name, st in doc["studies"].items():
        out += study_markdown(name, st, doc.get("scale"), plots)
    out += extra or []
    return "\n".join(out) + "\n"


# ----- plots -------------------------------------------------------------------------------------------------
def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_plot(st: dict[str, Any]) -> bytes | None:
    cells = [c for c in st["cells"] if c["mean"] is not None or c["paper"] is not None]
    if not cells:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cells) + 2), 4))
    xs = range(len(cells))
    means = [100 * (c["mean"] or 0) for c in cells]
    errs = [100 * (c["std"] or 0) for c in cells]
    colors = ["#9ecae1" if c["extension"] else ("#bdbdbd" if c["method"] == "pretrained" else "#3182bd") for c in cells]
    ax.bar(xs, means, yerr=errs, color=colors, capsize=3, label="ours (mean ± std)")
    for i, c in enumerate(cells):
        ax.scatter([i] * len(c["values"]), [100 * v for v in c["values"]], s=8, color="black", zorder=3)
    px = [i for i, c in enumerate(cells) if c["paper"] is not None]
    ax.scatter(px, [100 * cells[i]["paper"] for i in px], marker="D", color="#d62728", zorder=4, label="paper")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([c["cell"] for c in cells], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("accuracy per adapter and task (dots: seeds; light blue: extensions; grey: pretrained)", fontsize=9)
    return _png(fig)


def curves_plot(st: dict[str, Any]) -> bytes | None:
    """Training loss (left) and, where runs evaluated during training, accuracy against steps (right)."""
    if not st["curves"]:
        return None
    plt = _pyplot()
    has_eval = any(c["eval_steps"] for c in st["curves"])
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(12 if has_eval else 8, 4), squeeze=False)
    for curve in st["curves"]:
        for i, label in enumerate(curve["labels"]):
            if curve["steps"]:
                axes[0, 0].plot(curve["steps"], [step[i] for step in curve["loss"]], lw=0.8, label=label)
            if has_eval and curve["eval_steps"]:
                axes[0, 1].plot(curve["eval_steps"], [100 * a[i] for a in curve["eval_accuracy"]], lw=0.8,
                                marker=".", label=label)
    axes[0, 0].set_yscale("log")
    axes[0, 0].set(xlabel="step", ylabel="training loss", title="training loss")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=5, ncol=2)
    if has_eval:
        axes[0, 1].set(xlabel="step", ylabel="exact match (%) during training", title="accuracy during training",
                       ylim=(0, 105))
        axes[0, 1].legend(fontsize=5, ncol=2)
    return _png(fig)


def make_plots(doc: dict[str, Any]) -> dict[str, bytes]:
    plots = {}
    for name, st in doc["studies"].items():
        for kind, fn in (("accuracy", accuracy_plot), ("curves", curves_plot)):
            png = fn(st)
            if png:
                plots[f"{name}-{kind}"] = png
        plots.update({key: _png(fig) for key, fig in real_model_figures(name, st).items()})
    return plots


# ----- HTML --------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}.ok{color:#1a7f37}.no{color:#b42318}.na{color:#888}
pre{background:#f6f8fa;padding:.6em;overflow:auto;font-size:12px;max-height:360px}img{max-width:100%}
"""


def to_html(markdown: str, images: dict[str, bytes], page_title: str) -> str:
    """The Markdown rendered as one self-contained page; images referenced by path are inlined."""
    import html

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    for path, png in images.items():
        body = body.replace(f'src="{path}"', f'src="data:image/png;base64,{base64.b64encode(png).decode()}"')
    for text, cls in (("holds", "ok"), ("does NOT hold", "no"), ("not measured", "na")):
        body = body.replace(f"<strong>{text}</strong>", f'<strong class="{cls}">{text}</strong>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(page_title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}</body></html>\n")


def find_universal(results_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None, Path | None]:
    """`ctxtune approx` results beside the report: DIR/universal.json, else DIR/../beyond/universal.json."""
    for folder in (results_dir, results_dir.parent / "beyond"):
        kernel = _read(folder / "universal.json")
        if kernel is not None:
            png = folder / "universal.png"
            return kernel, _read(folder / "universal_fit.json"), png if png.is_file() else None
    return None, None, None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == "universal" else None


def write_report(doc: dict[str, Any], results_dir: str | Path) -> dict[str, str]:
    """DIR/report.md (+ DIR/plots/*.png) and DIR/report.html, written atomically."""
    from ctxtune.io import atomic_write_bytes

    root = Path(results_dir)
    pngs = make_plots(doc)
    paths = {name: f"plots/{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.png" for name in pngs}
    images = {paths[name]: png for name, png in pngs.items()}
    extra: list[str] = []
    kernel, fit, universal_png = find_universal(root)
    if kernel is not None and doc.get("kind") != "sweep":
        extra = universal_section(kernel, fit)
        if universal_png is not None:
            images["plots/universal.png"] = universal_png.read_bytes()
            extra += ["![universal approximation error against P](plots/universal.png)", ""]
    markdown = to_markdown(doc, paths, extra)
    for path, png in images.items():
        atomic_write_bytes(root / path, png)
    atomic_write_bytes(root / "report.md", markdown.encode())
    atomic_write_bytes(root / "report.html", to_html(markdown, images, title(doc)).encode())
    return {"results": str(root / "results.json"), "markdown": str(root / "report.md"),
            "html": str(root / "report.html")}
