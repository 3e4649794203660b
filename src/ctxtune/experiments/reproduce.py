"""`ctxtune reproduce`: the studies at one scale, as a plan for `ctxtune.experiments.pipeline.run_plan`.

DIR/plan.json records the studies (paper numbers, claims, exact configurations at this scale, analyses),
the jobs and the environment before anything runs; the report is built from it and the run folders alone,
so `ctxtune report DIR` rebuilds it later (also after an interrupted run: missing runs are marked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctxtune.errors import ConfigError
from ctxtune.experiments.plan import base_key, expand, usable_cores
from ctxtune.experiments.spec import GROUPS, SCALES, StudySpec, get_study, list_studies


def study_plan(study: StudySpec, scale: str) -> dict[str, Any]:
    """What the report needs to know about a study at one scale (JSON)."""
    bases = {
        b.name: {"source": b.source} if b.source is not None else
        {"task": b.task, "job_key": base_key(study.name, b, scale), "per_seed": b.per_seed,
         "eval_tasks": list(b.eval_tasks), "model": b.scales[scale].model, "train": b.scales[scale].train}
        for b in study.bases.values()
    }
    adaptations = {
        a.name: {"base": a.base, "method": a.method, "tasks": list(a.tasks), "eval_tasks": list(a.eval_tasks),
                 "extension": a.extension, "stack_seeds": a.stack_seeds, "note": a.note,
                 "options": a.scales[scale].options, "train": a.scales[scale].train}
        for a in study.adaptations.values()
    }
    analyses = {an.name: {"kind": an.kind, "adaptations": list(an.adaptations), "options": an.options}
                for an in study.analyses.values()}
    return {
        "title": study.title, "paper_ref": study.paper_ref, "summary": study.summary, "notes": study.notes,
        "group": study.group, "analyses": analyses,
        "paper": study.paper, "rows": study.rows(), "bases": bases, "adaptations": adaptations,
        "claims": [{"id": c.id, "text": c.text, "evidence": c.evidence,
                    "checks": [{"cell": k.cell, "op": k.op, "value": k.value} for k in c.checks]}
                   for c in study.claims],
    }


def select_studies(only: list[str] | None, group: str = "paper") -> list[StudySpec]:
    """The studies named by --only, else every study of `group` ("paper", "beyond" or "all")."""
    names = list_studies()
    if only:
        bad = [n for n in only if n not in names]
        if bad:
            raise ConfigError(f"unknown study {bad[0]!r} in --only; known studies: {', '.join(names)}")
        return [get_study(n) for n in names if n in only]
    if group not in (*GROUPS, "all"):
        raise ConfigError(f"--group must be one of {', '.join(GROUPS)} or all, got {group!r}")
    studies = [get_study(n) for n in names]
    return [s for s in studies if group == "all" or s.group == group]


def reproduce(
    scale: str = "quick",
    seeds: int = 3,
    only: list[str] | None = None,
    out: str | Path | None = None,
    executor: str = "process",
    workers: int | None = None,
    device: str = "cpu",
    step_factor: float = 1.0,
    train_override: dict[str, Any] | None = None,
    eval_examples: int | None = None,
    threads: int | None = None,
    quiet: bool = False,
    group: str = "paper",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Run the studies and write DIR/results.json, DIR/report.md, DIR/report.html. Returns a summary dict.

    Without `only`, the studies of `group` that have no `scale` are skipped (summary["skipped_studies"] says why).

    By default the jobs run in parallel worker processes, one per usable core (`workers`), each run with the
    torch threads its size calls for (`threads_for`; --threads overrides); the numbers are those of a serial
    run (`executor="local"`), since a run's threads never depend on the scheduling.
    """
    from ctxtune.experiments.executors import get_executor
    from ctxtune.experiments.pipeline import run_plan
    from ctxtune.report import environment
    from ctxtune.train.run import check_device

    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be a positive integer, got {threads!r}")
    chosen = select_studies(only, group)
    # A study without this scale (real_lm has only `standard`) is left out of a group's run and said so; named by
    # --only, it is an error (expand names the scales it has).
    studies = [s for s in chosen if only or scale in s.scales]
    kept = {s.name for s in studies}
    skipped = {s.name: f"no {scale} scale (it has {', '.join(s.scales)})" for s in chosen if s.name not in kept}
    if not studies:
        raise ConfigError(f"no study of group {group!r} has a {scale!r} scale: "
                          + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    check_device(device)
    out_dir = Path(out if out is not None else f"results/{scale}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    jobs = expand(studies, scale, seeds, out_dir, device=device, step_factor=step_factor,
                  train_override=train_override, eval_examples=eval_examples, threads=threads or 0,
                  precision=precision)
    widest = max((j["spec"]["threads"] for j in jobs if j["kind"] == "train"), default=1)
    workers = workers or max(1, usable_cores() // widest)  # the cores, shared without oversubscribing
    runner = get_executor(executor, workers, threads=threads)
    plan = {
        "kind": "reproduce", "scale": scale, "seeds": list(range(seeds)), "step_factor": step_factor,
        "executor": executor, "workers": workers, "precision": precision, "device": device,
        "train_override": train_override or {},
        "eval_examples": eval_examples, "studies": {s.name: study_plan(s, scale) for s in studies}, "jobs": jobs,
        "environment": environment(device),
    }
    plan = merge_plan(out_dir / "plan.json", plan)
    report = run_plan(out_dir, plan, runner, jobs=jobs, quiet=quiet)
    doc = report["doc"]
    return {
        "out": str(out_dir), "scale": scale, "seeds": seeds, "wall_seconds": report["wall_seconds"],
        "jobs": doc["jobs"], "paths": report["paths"], "skipped_studies": skipped,
        "failed": {r["id"]: r.get("error") for r in doc["runs"] if r.get("status") not in ("ok", None)},
        "claims": {f"{name}/{c['id']}": c["holds"] for name, st in doc["studies"].items() for c in st["claims"]},
    }


def merge_plan(path: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Keep the studies of an earlier run into the same folder (same scale, seeds and factor)."""
    if not path.is_file():
        return plan
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return plan
    same = all(old.get(k) == plan.get(k)
               for k in ("scale", "seeds", "step_factor", "train_override", "eval_examples", "precision"))
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
