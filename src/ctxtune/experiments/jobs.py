"""The worker every executor calls: one job in, its result out.

A job is a JSON-serialisable dict:

    {"id": "elicit/prefix/s0-2",       # unique within a plan
     "kind": "train" | "analysis",
     "out_dir": "/abs/run/folder",     # where the job writes
     "depends_on": ["base/mix-1a2b3c4d/s0"],
     "resources": {"num_cpus": 1},     # optional; honoured by Ray
     "spec": {...},                    # train: RunSpec.to_dict()
     "analysis": {...}, "inputs": [...]  # analysis: see ctxtune.experiments.analyses
     ...}                              # labels for reports (study, adaptation, rows): ignored here

`execute(job)` is idempotent: a finished run returns its stored result, an interrupted one resumes from its
checkpoint (that is what makes retrying a killed worker safe).
"""

from __future__ import annotations

from typing import Any

from ctxtune.errors import ConfigError

WORKER = "ctxtune.experiments.jobs:execute"


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job; returns its result dict (a RunResult's or an analysis record)."""
    kind = job.get("kind")
    if kind == "train":
        from ctxtune.train import RunSpec, run

        spec = RunSpec.from_dict(job["spec"], f"job {job.get('id')}")
        return {"id": job["id"], **run(spec, job["out_dir"], resume=True).to_dict()}
    if kind == "analysis":
        from ctxtune.experiments.analyses import run_analysis

        return {"id": job["id"], **run_analysis(job)}
    raise ConfigError(f"unknown job kind {kind!r}; expected train or analysis")


def is_finished(job: dict[str, Any]) -> bool:
    """Whether the job's folder already holds its finished result (so the scheduler need not start it)."""
    from pathlib import Path

    from ctxtune.errors import CtxtuneError

    out = Path(job["out_dir"])
    try:
        if job.get("kind") == "train":
            from ctxtune.train import RunSpec
            from ctxtune.train.runs import read_run, read_summary

            return read_summary(out) is not None and (
                read_run(out).spec.fingerprint() == RunSpec.from_dict(job["spec"]).fingerprint()
            )
        if job.get("kind") == "analysis":
            from ctxtune.io import load_json

            stored = load_json(out / "analysis.json") if (out / "analysis.json").is_file() else None
            info = job["analysis"]
            return (isinstance(stored, dict) and stored.get("status") == "ok"
                    and stored.get("inputs") == job["inputs"] and stored.get("name") == info["name"]
                    and stored.get("seed") == info["seed"])
    except CtxtuneError:
        return False
    return False
