"""Render results.json as report.md and a static, self-contained report.html (plots as base64 PNG).

Only reads the results document; matplotlib (Agg) draws the plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def ours(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "not run"
    if cell["n"] < 2:
        return f"{pct(cell['mean'])} (n=1)"
    return f"{pct(cell['mean'])} ± {100 * cell['std']:.2f} (n={cell['n']})"


def verdict(holds: bool | None) -> str:
    return {True: "holds", False: "does NOT hold", None: "not measured"}[holds]


def claim_lines(claim: dict[str, Any]) -> list[str]:
    out = []
    for ch in claim["checks"]:
        paper = f"; paper {pct(ch['paper'])}" if ch.get("paper") is not None else ""
        if ch["observed_mean"] is None:
            out.append(f"{ch['cell']}: not measured (threshold {ch['op']} {pct(ch['value'], 0)})")
            continue
        out.append(
            f"{ch['cell']}: {pct(ch['observed_mean'])} ± {100 * (ch['observed_std'] or 0):.2f} "
            f"{'meets' if ch['holds'] else 'misses'} {ch['op']} {pct(ch['value'], 0)} "
            f"({ch['seeds_holding']}/{ch['n']} seeds meet it{paper})"
        )
    return out


def header_lines(doc: dict[str, Any]) -> list[str]:
    env = doc["environment"]
    wall = doc.get("wall_seconds")
    factor = doc.get("step_factor", 1.0)
    lines = [
        f"- scale: **{doc['scale']}**"
        + (f", every step count x {factor} (shortened: not the paper's budget)" if factor != 1.0 else ""),
        f"- seeds: {', '.join(str(s) for s in doc['seeds'])}",
        *(
            [
                f"- SMOKE RUN: train settings overridden everywhere ({doc['train_override']}), "
                f"test examples {doc.get('eval_examples_override')}: the numbers mean nothing"
            ]
            if doc.get("train_override")
            else []
        ),
        f"- jobs: {doc['jobs']['ok']} ok, {doc['jobs']['failed']} failed, {doc['jobs']['skipped']} skipped, "
        f"{doc['jobs'].get('missing', 0)} missing (of {doc['jobs']['total']})",
        f"- wall time: {wall:.0f} s" if isinstance(wall, (int, float)) else "- wall time: unknown",
        f"- compute time (sum over jobs): {doc.get('compute_seconds', 0):.0f} s; executor {doc.get('executor')}",
        f"- commit: `{env.get('commit')}`",
        f"- machine: {env.get('platform')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
        f"device {env.get('device')}",
        f"- created: {doc.get('created')}",
    ]
    return lines


def to_markdown(doc: dict[str, Any]) -> str:
    out = [f"# ctxtune reproduce: {doc['scale']} scale", "", *header_lines(doc), ""]
    out += ["## Claims at a glance", "", "| study | claim | verdict |", "|---|---|---|"]
    for name, st in doc["studies"].items():
        for cl in st["claims"]:
            out.append(f"| {name} | {cl['text']} | **{verdict(cl['holds'])}** |")
    out.append("")
    for name, st in doc["studies"].items():
        out += [
            f"## {st['title']} (`{name}`)",
            "",
            st["summary"].replace("\n", " "),
            "",
            f"Source: {st['paper_ref']}",
            "",
        ]
        note = st["notes"].get(doc["scale"])
        if note:
            out += [f"Scale note: {note}", ""]
        out += ["### Claims", ""]
        for cl in st["claims"]:
            out.append(f"- **{verdict(cl['holds'])}**: {cl['text']}")
            out += [f"  - {line}" for line in claim_lines(cl)]
        out += [
            "",
            "### Ours vs the paper",
            "",
            "| row (adapter) | evaluated on | method | ours (mean ± std over seeds) | paper |",
            "|---|---|---|---|---|",
        ]
        for c in st["cells"]:
            method = c["method"] + (" (extension)" if c["extension"] else "")
            out.append(f"| {c['row']} | {c['task']} | {method} | {ours(c)} | {pct(c['paper'])} |")
        out += [
            "",
            "### Runs",
            "",
            "| run | status | method | trainable / adapter | steps | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in st["runs"]:
            status = r["status"] + (f": {r['error']}" if r.get("error") else "")
            out.append(
                f"| {r['id']} | {status} | {r['method']} | {r.get('trainable_per_adapter') or '-'} | "
                f"{r.get('steps') or '-'} | {r.get('seconds') or '-'} |"
            )
        out += ["", "### Configuration", "", "```json", json.dumps(st["config"], indent=1), "```", ""]
    return "\n".join(out) + "\n"


# ----- plots -------------------------------------------------------------------------------------
def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def accuracy_plot(st: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in st["cells"] if c["mean"] is not None or c["paper"] is not None]
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cells) + 2), 4))
    xs = range(len(cells))
    means = [100 * (c["mean"] or 0) for c in cells]
    errs = [100 * (c["std"] or 0) for c in cells]
    colors = ["#9ecae1" if c["extension"] else ("#bdbdbd" if c["method"] == "pretrained" else "#3182bd") for c in cells]
    ax.bar(xs, means, yerr=errs, color=colors, capsize=3, label="ours (mean ± std)")
    px = [i for i, c in enumerate(cells) if c["paper"] is not None]
    ax.scatter(px, [100 * cells[i]["paper"] for i in px], marker="D", color="#d62728", zorder=3, label="paper")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([c["cell"] for c in cells], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("accuracy per adapter and task (light blue: extensions, grey: pretrained)", fontsize=9)
    return _png(fig)


def curves_plot(st: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not st["curves"]:
        return None
    groups: dict[str, list[tuple[list[int], list[float]]]] = {}
    for curve in st["curves"]:
        for i, label in enumerate(curve["labels"]):
            key = label.split(" seed ")[0].split(" (pretraining")[0]
            groups.setdefault(key, []).append((curve["steps"], [step[i] for step in curve["loss"]]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, series in groups.items():
        n = min(len(ys) for _, ys in series)
        steps = series[0][0][:n]
        mean = [sum(ys[j] for _, ys in series) / len(series) for j in range(n)]
        ax.plot(steps, mean, label=f"{label} ({len(series)} seed{'s' if len(series) > 1 else ''})", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("training curves", fontsize=9)
    return _png(fig)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}.ok{color:#1a7f37;font-weight:bold}.no{color:#b42318;font-weight:bold}.na{color:#888}
pre{background:#f6f8fa;padding:.6em;overflow:auto;font-size:12px;max-height:360px}img{max-width:100%}
.ext{color:#2c7fb8}
"""


def to_html(doc: dict[str, Any]) -> str:
    e = html.escape

    def v_html(holds: bool | None) -> str:
        cls = {True: "ok", False: "no", None: "na"}[holds]
        return f'<span class="{cls}">{e(verdict(holds))}</span>'

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>ctxtune reproduce ({e(doc['scale'])})</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>ctxtune reproduce: {e(doc['scale'])} scale</h1><ul>",
    ]
    for line in header_lines(doc):
        parts.append(f"<li>{e(line[2:]).replace('**', '').replace('`', '')}</li>")
    parts.append("</ul><h2>Claims at a glance</h2><table><tr><th>study</th><th>claim</th><th>verdict</th></tr>")
    for name, st in doc["studies"].items():
        for cl in st["claims"]:
            parts.append(f"<tr><td>{e(name)}</td><td>{e(cl['text'])}</td><td>{v_html(cl['holds'])}</td></tr>")
    parts.append("</table>")
    for name, st in doc["studies"].items():
        parts.append(
            f"<h2 id='{e(name)}'>{e(st['title'])} (<code>{e(name)}</code>)</h2><p>{e(st['summary'])}</p>"
            f"<p><small>Source: {e(st['paper_ref'])}</small></p>"
        )
        note = st["notes"].get(doc["scale"])
        if note:
            parts.append(f"<p><b>Scale note.</b> {e(note)}</p>")
        parts.append("<h3>Claims</h3><ul>")
        for cl in st["claims"]:
            items = "".join(f"<li>{e(line)}</li>" for line in claim_lines(cl))
            parts.append(f"<li>{v_html(cl['holds'])}: {e(cl['text'])}<ul>{items}</ul></li>")
        parts.append(
            "</ul><h3>Ours vs the paper</h3><table><tr><th>row (adapter)</th><th>evaluated on</th>"
            "<th>method</th><th>ours (mean ± std over seeds)</th><th>paper</th></tr>"
        )
        for c in st["cells"]:
            method = e(c["method"]) + (" <span class='ext'>(extension)</span>" if c["extension"] else "")
            parts.append(
                f"<tr><td>{e(c['row'])}</td><td>{e(c['task'])}</td><td>{method}</td><td>{e(ours(c))}</td>"
                f"<td>{e(pct(c['paper']))}</td></tr>"
            )
        parts.append("</table>")
        for title, img in (("Accuracy", accuracy_plot(st)), ("Training curves", curves_plot(st))):
            if img:
                parts.append(f"<h3>{title}</h3><img alt='{e(title)} for {e(name)}' src='data:image/png;base64,{img}'>")
        parts.append(
            "<h3>Runs</h3><table><tr><th>run</th><th>status</th><th>method</th><th>trainable / adapter</th>"
            "<th>steps</th><th>seconds</th></tr>"
        )
        for r in st["runs"]:
            status = r["status"] + (f": {r['error']}" if r.get("error") else "")
            parts.append(
                f"<tr><td>{e(r['id'])}</td><td>{e(str(status))}</td><td>{e(str(r['method']))}</td>"
                f"<td>{r.get('trainable_per_adapter') or '-'}</td><td>{r.get('steps') or '-'}</td>"
                f"<td>{r.get('seconds') or '-'}</td></tr>"
            )
        parts.append(f"</table><h3>Configuration</h3><pre>{e(json.dumps(st['config'], indent=1))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def find_beyond_dir(results_dir: Path) -> Path | None:
    """The "beyond the paper" results (ctxtune.beyond): DIR/beyond, else a sibling folder named beyond."""
    for candidate in (results_dir / "beyond", results_dir.parent / "beyond"):
        if candidate.is_dir() and any(candidate.glob("*.json")):
            return candidate
    return None


def md_to_html(text: str) -> str:
    """The small Markdown subset the beyond section uses: headings, tables, bullets, paragraphs, code spans."""
    e = html.escape

    def inline(line: str) -> str:
        out = e(line)
        for mark, tag in (("**", "b"), ("`", "code"), ("_", "i")):
            pieces = out.split(mark)
            if len(pieces) % 2 == 1 and len(pieces) > 1:
                out = "".join(p if i % 2 == 0 else f"<{tag}>{p}</{tag}>" for i, p in enumerate(pieces))
        return out

    parts: list[str] = []
    table: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *rows = table
            parts.append(
                "<table><tr>"
                + "".join(f"<th>{inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
            table = []
        if line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")))
            parts.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            parts.append(f"<ul><li>{inline(line[2:])}</li></ul>")
        elif line.strip():
            parts.append(f"<p>{inline(line)}</p>")
    return "\n".join(parts)


def write_report(doc: dict[str, Any], results_dir: str | Path) -> dict[str, str]:
    from ctxtune.io import atomic_write_bytes

    root = Path(results_dir)
    md, page = root / "report.md", root / "report.html"
    markdown, page_html = to_markdown(doc), to_html(doc)
    beyond = find_beyond_dir(root)
    if beyond is not None:
        from ctxtune.beyond.report import beyond_section

        section = beyond_section(beyond)
        markdown += "\n" + section + "\n"
        extra = md_to_html(section)
        plot = beyond / "universal.png"
        if plot.is_file():
            img = base64.b64encode(plot.read_bytes()).decode()
            extra += f"<img alt='universal approximation error against P' src='data:image/png;base64,{img}'>"
        page_html = page_html.replace("</body></html>", extra + "</body></html>")
    atomic_write_bytes(md, markdown.encode())
    atomic_write_bytes(page, page_html.encode())
    return {"results": str(root / "results.json"), "markdown": str(md), "html": str(page)}
