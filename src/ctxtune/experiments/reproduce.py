"""The whole pipeline of `ctxtune reproduce`: expand the studies, run the jobs, collect, report.

DIR/plan.json records the studies (paper numbers, claims, exact configurations at this scale), the jobs
and the environment before anything runs; the report is built from it and the run folders alone, so
`ctxtune report DIR` rebuilds it later (also after an interrupted run: missing runs are marked).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ctxtune.errors import ConfigError
from ctxtune.experiments.runner import ProgressPrinter, base_key, expand, run_jobs
from ctxtune.experiments.spec import SCALES, StudySpec, get_study, list_studies


def study_plan(study: StudySpec, scale: str) -> dict[str, Any]:
    """What the report needs to know about a study at one scale (JSON)."""
    bases = {
        b.name: {"task": b.task, "job_key": base_key(study.name, b, scale), "per_seed": b.per_seed,
                 "eval_tasks": list(b.eval_tasks), "model": b.scales[scale].model, "train": b.scales[scale].train}
        for b in study.bases.values()
    }
    adaptations = {
        a.name: {"base": a.base, "method": a.method, "tasks": list(a.tasks), "eval_tasks": list(a.eval_tasks),
                 "extension": a.extension, "stack_seeds": a.stack_seeds, "note": a.note,
                 "options": a.scales[scale].options, "train": a.scales[scale].train}
        for a in study.adaptations.values()
    }
    return {
        "title": study.title, "paper_ref": study.paper_ref, "summary": study.summary, "notes": study.notes,
        "paper": study.paper, "rows": study.rows(), "bases": bases, "adaptations": adaptations,
        "claims": [{"id": c.id, "text": c.text, "checks": [{"cell": k.cell, "op": k.op, "value": k.value}
                                                           for k in c.checks]} for c in study.claims],
    }


def select_studies(only: list[str] | None) -> list[StudySpec]:
    names = list_studies()
    if only:
        bad = [n for n in only if n not in names]
        if bad:
            raise ConfigError(f"unknown study {bad[0]!r} in --only; known studies: {', '.join(names)}")
        names = [n for n in names if n in only]
    return [get_study(n) for n in names]


def reproduce(
    scale: str = "quick",
    seeds: int = 3,
    only: list[str] | None = None,
    out: str | Path | None = None,
    executor: str = "local",
    workers: int = 1,
    device: str = "cpu",
    step_factor: float = 1.0,
    train_override: dict[str, Any] | None = None,
    eval_examples: int | None = None,
    threads: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the studies and write DIR/results.json, DIR/report.md, DIR/report.html. Returns a summary dict."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    studies = select_studies(only)
    check_device(device)
    out_dir = Path(out if out is not None else f"results/{scale}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    runner_executor = None
    if executor != "local":
        try:
            from ctxtune.experiments import executors as ex_mod
        except ImportError:
            raise ConfigError(f"executor {executor} not available yet") from None
        runner_executor = ex_mod.get_executor(executor, workers)
    jobs = expand(studies, scale, seeds, out_dir, device=device, step_factor=step_factor,
                  train_override=train_override, eval_examples=eval_examples, threads=threads)
    from ctxtune.report import build_report, environment

    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "scale": scale, "seeds": list(range(seeds)), "step_factor": step_factor, "executor": executor,
        "device": device, "train_override": train_override or {}, "eval_examples": eval_examples,
        "studies": {s.name: study_plan(s, scale) for s in studies}, "jobs": jobs, "environment": environment(device),
    }
    plan = merge_plan(out_dir / "plan.json", plan)
    (out_dir / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    start = time.perf_counter()
    with ProgressPrinter(jobs, quiet=quiet) as progress:
        results = run_jobs(jobs, executor=runner_executor, on_result=progress)
    wall = round(time.perf_counter() - start, 1)
    plan["wall_seconds"] = wall
    (out_dir / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    report = build_report(out_dir, wall_seconds=wall)
    doc = report["doc"]
    return {
        "out": str(out_dir), "scale": scale, "seeds": seeds, "wall_seconds": wall,
        "jobs": doc["jobs"], "paths": report["paths"],
        "failed": {k: r.get("error") for k, r in results.items() if r.get("status") != "ok"},
        "claims": {f"{name}/{c['id']}": c["holds"] for name, st in doc["studies"].items() for c in st["claims"]},
    }


def check_device(device: str) -> None:
    """Reject a device torch cannot use before any job starts."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown --device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {device!r}")


def merge_plan(path: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Keep the studies of an earlier run into the same folder (same scale, seeds and factor)."""
    if not path.is_file():
        return plan
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return plan
    same = all(old.get(k) == plan.get(k) for k in ("scale", "seeds", "step_factor", "train_override", "eval_examples"))
    if not same:
        return plan
    ids = {j["id"] for j in plan["jobs"]}
    for name, study in old.get("studies", {}).items():
        plan["studies"].setdefault(name, study)
    plan["jobs"] = [j for j in old.get("jobs", []) if j["id"] not in ids] + plan["jobs"]
    order = list_studies()
    plan["studies"] = {n: plan["studies"][n] for n in sorted(plan["studies"], key=lambda n: order.index(n)
                                                            if n in order else len(order))}
    return plan
