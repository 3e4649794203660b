"""Collect what the runs wrote into results.json (schema: docs/results-schema.md).

Reads only files: DIR/plan.json (written by `ctxtune reproduce` before any job runs: the studies, the
jobs, the environment) and each job's run folder (summary.json with its `result`, error.json,
metrics.jsonl). Never imports the trainer, the model or torch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ctxtune.errors import ConfigError

SCHEMA = "ctxtune.results/1"
OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Commit hash, machine and library versions (no torch import: versions come from package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    commit = "unknown"
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += " (with uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "commit": commit,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": ver("torch"),
        "ctxtune": ver("ctxtune"),
        "device": device,
    }


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _rel(path: str, root: Path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def run_folder(job: dict[str, Any], root: Path) -> Path:
    """A job's run folder; found under DIR/runs/ also when the results folder was moved or copied."""
    out = Path(job["out_dir"])
    if not out.is_absolute():
        return root / out
    if out.is_dir():
        return out
    parts = out.parts
    if "runs" in parts:
        i = len(parts) - 1 - parts[::-1].index("runs")
        return root.joinpath(*parts[i:])
    return out


def _job_result(job: dict[str, Any], root: Path) -> dict[str, Any]:
    out = run_folder(job, root)
    summary = _read_json(out / "summary.json")
    if isinstance(summary, dict) and isinstance(summary.get("result"), dict):
        return summary["result"]
    error = _read_json(out / "error.json")
    if isinstance(error, dict):
        return {"id": job["id"], "status": error.get("status", "failed"), "error": error.get("error", "failed")}
    return {"id": job["id"], "status": "missing", "error": "no summary.json or error.json in the run folder"}


def _curve(job: dict[str, Any], root: Path, labels: list[str]) -> dict[str, Any] | None:
    path = run_folder(job, root) / "metrics.jsonl"
    if not path.is_file():
        return None
    steps, losses = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec.get("loss"), list):
            steps.append(rec["step"])
            losses.append([round(float(v), 5) for v in rec["loss"]])
    if not steps:
        return None
    return {"run": job["id"], "labels": labels, "steps": steps, "loss": losses}


def collect(results_dir: str | Path, wall_seconds: float | None = None) -> dict[str, Any]:
    """Build the results document from DIR/plan.json and the run folders; also writes DIR/results.json."""
    root = Path(results_dir)
    plan = _read_json(root / "plan.json")
    if not isinstance(plan, dict) or "studies" not in plan or "jobs" not in plan:
        raise ConfigError(f"{root} is not a reproduce results folder (no valid plan.json)")
    jobs = plan["jobs"]
    results = {j["id"]: _job_result(j, root) for j in jobs}
    studies: dict[str, Any] = {}
    for name, study in plan["studies"].items():
        base_rows = {b: spec for b, spec in study["bases"].items()}
        values: dict[str, dict[str, list[tuple[int, float]]]] = {}
        runs, curves = [], []
        for job in jobs:
            res = results[job["id"]]
            if job["kind"] == "pretrain" and name in job.get("studies", []):
                row_names = [b for b, spec in base_rows.items() if spec["job_key"] == job["id"].split("/")[1]]
            elif job["kind"] == "adapt" and job.get("study") == name:
                row_names = []
            else:
                continue
            runs.append({
                "id": job["id"], "kind": job["kind"], "status": res.get("status"), "error": res.get("error"),
                "out_dir": _rel(str(run_folder(job, root)), root), "seconds": res.get("seconds"),
                "steps": res.get("steps"),
                "trainable_per_adapter": res.get("trainable_per_adapter"), "final_loss": res.get("final_loss"),
                "method": job.get("method", "full (pretraining)"), "seeds": job.get("seeds", [job.get("seed")]),
            })
            if job["kind"] == "pretrain":
                labels = [f"{row_names[0] if row_names else 'base'} (pretraining, seed {job['seed']})"]
            else:
                labels = [f"{s['row']} seed {s['seed']}" for s in job["streams"]]
            curve = _curve(job, root, labels)
            if curve:
                curves.append(curve)
            if res.get("status") != "ok":
                continue
            for r in res.get("rows", []):
                targets = row_names if r["row"] is None else [r["row"]]
                for row in targets:
                    for task, acc in r["acc"].items():
                        values.setdefault(f"{row}/{task}", {}).setdefault("v", []).append((r["seed"], acc))
        cells = []
        for cell in _cell_order(study, values):
            row, _, task = cell.rpartition("/")
            pairs = sorted(values.get(cell, {}).get("v", []))
            vals = [v for _, v in pairs]
            m, s = mean_std(vals)
            adapt = study["adaptations"].get(row.split(".")[0]) if row not in base_rows else None
            cells.append({
                "cell": cell, "row": row, "task": task,
                "method": "pretrained" if adapt is None else adapt["method"],
                "extension": bool(adapt and adapt.get("extension")),
                "seeds": [sd for sd, _ in pairs], "values": vals, "mean": m, "std": s, "n": len(vals),
                "paper": study["paper"].get(cell),
            })
        by_cell = {c["cell"]: c for c in cells}
        claims = []
        for claim in study["claims"]:
            checks, verdicts = [], []
            for ch in claim["checks"]:
                c = by_cell.get(ch["cell"], {"mean": None, "std": None, "values": []})
                ok = None if c["mean"] is None else bool(OPS[ch["op"]](c["mean"], ch["value"]))
                per_seed = [bool(OPS[ch["op"]](v, ch["value"])) for v in c["values"]]
                verdicts.append(ok)
                checks.append({**ch, "observed_mean": c["mean"], "observed_std": c["std"], "per_seed": c["values"],
                               "seeds_holding": sum(per_seed), "n": len(per_seed), "holds": ok,
                               "paper": study["paper"].get(ch["cell"])})
            holds = None if any(v is None for v in verdicts) else all(verdicts)
            claims.append({"id": claim["id"], "text": claim["text"], "holds": holds, "checks": checks})
        studies[name] = {
            "title": study["title"], "paper_ref": study["paper_ref"], "summary": study["summary"],
            "notes": study.get("notes", {}), "config": {"bases": study["bases"], "adaptations": study["adaptations"]},
            "cells": cells, "claims": claims, "runs": runs, "curves": curves,
            "seconds": round(sum(r["seconds"] or 0 for r in runs if r["status"] == "ok"), 1),
        }
    statuses = ("ok", "failed", "skipped", "missing")
    counts = {k: sum(1 for r in results.values() if r.get("status") == k) for k in statuses}
    doc = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scale": plan["scale"], "seeds": plan["seeds"], "step_factor": plan.get("step_factor", 1.0),
        "train_override": plan.get("train_override") or {}, "eval_examples_override": plan.get("eval_examples"),
        "executor": plan.get("executor", "local"), "wall_seconds": wall_seconds if wall_seconds is not None
        else plan.get("wall_seconds"),
        "compute_seconds": round(sum(r.get("seconds") or 0 for r in results.values()), 1),
        "environment": plan.get("environment") or environment(),
        "jobs": {"total": len(jobs), **counts},
        "studies": studies,
    }
    write_json(root / "results.json", doc)
    return doc


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _cell_order(study: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """Cells in a stable order: the study's rows, then evaluation tasks; paper cells without a run too."""
    rows = study["rows"]
    cells = set(values) | set(study["paper"])
    order = {row: i for i, row in enumerate(rows)}
    return sorted(cells, key=lambda c: (order.get(c.rpartition("/")[0], 1e9), c))
