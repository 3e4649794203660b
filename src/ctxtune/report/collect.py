"""Collect what the jobs wrote into results.json (schema: docs/results-schema.md).

Reads only files: DIR/plan.json (written by `run_plan` before any job runs: the studies, the jobs, the
environment) and each job's folder (summary.json, analysis.json, error.json, metrics.jsonl). Never
imports the trainer, the model or torch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctxtune.claims import holds
from ctxtune.errors import ConfigError

SCHEMA = "ctxtune.results/2"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
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
        "commit": commit, "platform": platform.platform(), "machine": platform.machine(),
        "processor": platform.processor() or "unknown", "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch": ver("torch"), "ctxtune": ver("ctxtune"), "device": device,
    }


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def job_folder(job: dict[str, Any], root: Path) -> Path:
    """A job's folder; found under DIR/runs/ also when the results folder was moved or copied."""
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


def job_result(job: dict[str, Any], root: Path) -> dict[str, Any]:
    """What a job left: its summary (runs) or analysis record, else its error, else "missing"."""
    folder = job_folder(job, root)
    name = "analysis.json" if job["kind"] == "analysis" else "summary.json"
    done = _read_json(folder / name)
    if isinstance(done, dict) and done.get("status") == "ok":
        return done
    error = _read_json(folder / "error.json")
    if isinstance(error, dict):
        return {"status": error.get("status", "failed"), "error": error.get("error", "failed"),
                "seconds": error.get("seconds")}
    return {"status": "missing", "error": f"no {name} or error.json in the job folder"}


def curve(job: dict[str, Any], root: Path) -> dict[str, Any] | None:
    """Training loss and evaluation accuracy against steps, one series per adapter, from metrics.jsonl."""
    path = job_folder(job, root) / "metrics.jsonl"
    if not path.is_file():
        return None
    steps, losses, eval_steps, accs = [], [], [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec.get("loss"), list) and "note" not in rec:
            steps.append(rec["step"])
            losses.append([round(float(v), 5) for v in rec["loss"]])
        if isinstance(rec.get("eval_accuracy"), list):
            eval_steps.append(rec["step"])
            accs.append([round(float(v), 5) for v in rec["eval_accuracy"]])
    if not steps and not eval_steps:
        return None
    streams = job["spec"]["streams"]
    labels = [f"{s['row'] or s['task']} seed {s['seed']}" for s in streams]
    return {"run": job["id"], "labels": labels, "steps": steps, "loss": losses, "eval_steps": eval_steps,
            "eval_accuracy": accs}


def run_entry(job: dict[str, Any], res: dict[str, Any], root: Path) -> dict[str, Any]:
    spec = job.get("spec") or {}
    return {
        "id": job["id"], "kind": job["kind"], "status": res.get("status"), "error": res.get("error"),
        "out_dir": os.path.relpath(job_folder(job, root), root), "seconds": res.get("seconds"),
        "steps": res.get("steps"), "trainable_per_adapter": res.get("trainable_per_adapter"),
        "final_loss": res.get("final_loss"),
        "method": spec.get("method") if spec.get("kind") != "pretrain" else "full (pretraining)",
        "seeds": sorted({s["seed"] for s in spec.get("streams", [])}) or [job.get("analysis", {}).get("seed")],
    }


def serves(job: dict[str, Any], study: str) -> bool:
    return job.get("study") == study or study in job.get("rows", {})


def study_cells(study: dict[str, Any], name: str, jobs: list[dict[str, Any]],
                results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    values: dict[str, list[tuple[int, float]]] = {}
    for job in jobs:
        res = results[job["id"]]
        if job["kind"] != "train" or res.get("status") != "ok" or not serves(job, name):
            continue
        base_row = job.get("rows", {}).get(name)
        for r in res.get("rows", []):
            row = base_row or r["row"]
            for task, acc in r["accuracy"].items():
                values.setdefault(f"{row}/{task}", []).append((r["seed"], acc))
    cells = []
    order = {row: i for i, row in enumerate(study["rows"])}
    for cell in sorted(set(values) | set(study["paper"]), key=lambda c: (order.get(c.rpartition("/")[0], 1e9), c)):
        row, _, task = cell.rpartition("/")
        pairs = sorted(values.get(cell, []))
        vals = [v for _, v in pairs]
        m, s = mean_std(vals)
        adapt = study["adaptations"].get(row.rpartition(".")[0]) if row not in study["bases"] else None
        cells.append({
            "cell": cell, "row": row, "task": task, "method": "pretrained" if adapt is None else adapt["method"],
            "extension": bool(adapt and adapt.get("extension")), "seeds": [sd for sd, _ in pairs], "values": vals,
            "mean": m, "std": s, "n": len(vals), "paper": study["paper"].get(cell),
        })
    return cells


def eval_curves(name: str, jobs: list[dict[str, Any]], curves: list[dict[str, Any]]) -> dict[tuple, dict]:
    """(row, seed) -> {"task", "steps", "accuracy", "total"}: the accuracy an adapter reached during training."""
    by_run = {c["run"]: c for c in curves}
    out: dict[tuple, dict] = {}
    for job in jobs:
        curve = by_run.get(job["id"])
        if job["kind"] != "train" or curve is None or not curve["eval_steps"]:
            continue
        for k, s in enumerate(job["spec"]["streams"]):
            row = job.get("rows", {}).get(name) or s["row"]
            out[(row, s["seed"])] = {"task": s["task"], "steps": curve["eval_steps"],
                                     "accuracy": [a[k] for a in curve["eval_accuracy"]],
                                     "total": job["spec"].get("train", {}).get("steps")}
    return out


def seed_curves(check: dict[str, Any], cell: dict[str, Any], evals: dict[tuple, dict]) -> list[dict]:
    """Per seed, the check cell's accuracy at each evaluation during training ([] without curves)."""
    row, _, task = check["cell"].rpartition("/")
    out = []
    for seed in cell.get("seeds", []):
        ev = evals.get((row, seed))
        if ev is not None and ev["task"] == task:
            out.append({"seed": seed, "steps": ev["steps"], "accuracy": ev["accuracy"], "of": ev["total"]})
    return out


def first_step_meeting(check: dict[str, Any], cell: dict[str, Any], evals: dict[tuple, dict]) -> list[dict]:
    """Per seed, the first evaluation step at which the adapter met the check's threshold on its own task
    (time to accuracy), or step None when it never did during training; [] without evaluation curves."""
    return [{"seed": cv["seed"], "of": cv["of"],
             "step": next((st for st, a in zip(cv["steps"], cv["accuracy"], strict=True)
                           if holds(a, check["op"], check["value"])), None)}
            for cv in seed_curves(check, cell, evals)]


def study_claims(study: dict[str, Any], cells: list[dict[str, Any]],
                 evals: dict[tuple, dict] | None = None) -> list[dict[str, Any]]:
    """A claim holds when every check holds on every seed (not only on the mean)."""
    by_cell = {c["cell"]: c for c in cells}
    evals = evals or {}
    claims = []
    for claim in study["claims"]:
        checks, verdicts = [], []
        for ch in claim["checks"]:
            c = by_cell.get(ch["cell"], {"mean": None, "std": None, "values": []})
            per_seed = [holds(v, ch["op"], ch["value"]) for v in c["values"]]
            ok = None if not per_seed else all(per_seed)
            verdicts.append(ok)
            checks.append({**ch, "observed_mean": c["mean"], "observed_std": c["std"], "per_seed": c["values"],
                           "seeds": c.get("seeds", []),
                           "seeds_holding": sum(per_seed), "n": len(per_seed), "holds": ok,
                           "holds_on_mean": None if c["mean"] is None else holds(c["mean"], ch["op"], ch["value"]),
                           "paper": study["paper"].get(ch["cell"]),
                           "first_step_meeting": first_step_meeting(ch, c, evals) if ch["op"] in (">=", ">") else [],
                           "curves": seed_curves(ch, c, evals)})
        verdict = None if any(v is None for v in verdicts) else all(verdicts)
        claims.append({"id": claim["id"], "text": claim["text"], "holds": verdict, "checks": checks,
                       "evidence": claim.get("evidence", {})})
    return claims


def study_analyses(study: dict[str, Any], name: str, jobs: list[dict[str, Any]],
                   results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for an_name, an in study.get("analyses", {}).items():
        per_seed = []
        for job in jobs:
            info = job.get("analysis", {})
            if job["kind"] == "analysis" and info.get("study") == name and info.get("name") == an_name:
                res = results[job["id"]]
                per_seed.append({"seed": info["seed"], "status": res.get("status"), "error": res.get("error"),
                                 "result": res.get("result")})
        out[an_name] = {**an, "per_seed": sorted(per_seed, key=lambda r: r["seed"])}
    return out


def collect(results_dir: str | Path, wall_seconds: float | None = None) -> dict[str, Any]:
    """Build the results document from DIR/plan.json and the job folders; also writes DIR/results.json."""
    root = Path(results_dir)
    plan = _read_json(root / "plan.json")
    valid = isinstance(plan, dict) and isinstance(plan.get("studies"), dict) and isinstance(plan.get("jobs"), list)
    if not valid:
        raise ConfigError(f"{root} is not a results folder of ctxtune reproduce or sweep (no valid plan.json)")
    jobs = plan["jobs"]
    results = {j["id"]: job_result(j, root) for j in jobs}
    runs = [run_entry(j, results[j["id"]], root) for j in jobs]
    studies: dict[str, Any] = {}
    for name, study in plan["studies"].items():
        mine = [j for j in jobs if serves(j, name) or j.get("analysis", {}).get("study") == name]
        cells = study_cells(study, name, mine, results)
        study_runs = [r for r, j in zip(runs, jobs, strict=True) if j in mine]
        curves = [c for j in mine if j["kind"] == "train" and (c := curve(j, root))]
        studies[name] = {
            "title": study["title"], "paper_ref": study["paper_ref"], "summary": study["summary"],
            "notes": study.get("notes", {}), "group": study.get("group", "paper"),
            "config": {"bases": study["bases"], "adaptations": study["adaptations"]},
            "cells": cells, "claims": study_claims(study, cells, eval_curves(name, mine, curves)), "runs": study_runs,
            "curves": curves,
            "analyses": study_analyses(study, name, mine, results),
            "seconds": round(sum(r["seconds"] or 0 for r in study_runs if r["status"] == "ok"), 1),
        }
    statuses = ("ok", "failed", "skipped", "missing")
    counts = {k: sum(1 for r in results.values() if r.get("status") == k) for k in statuses}
    doc = {
        "schema": SCHEMA, "kind": plan.get("kind", "reproduce"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "scale": plan.get("scale"), "seeds": plan.get("seeds", []), "step_factor": plan.get("step_factor", 1.0),
        "train_override": plan.get("train_override") or {}, "eval_examples_override": plan.get("eval_examples"),
        "executor": plan.get("executor", "local"), "workers": plan.get("workers"),
        "precision": plan.get("precision", "fp32"),
        "wall_seconds": wall_seconds if wall_seconds is not None else plan.get("wall_seconds"),
        "compute_seconds": round(sum(r.get("seconds") or 0 for r in results.values()), 1),
        "environment": plan.get("environment") or environment(),
        "jobs": {"total": len(jobs), **counts}, "runs": runs, "studies": studies,
    }
    write_json(root / "results.json", doc)
    return doc


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename), without importing torch."""
    from ctxtune.io import atomic_write_json

    atomic_write_json(path, obj, sort_keys=False)
