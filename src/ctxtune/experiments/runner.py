"""Expand studies into jobs and run them.

A job is a JSON-serialisable dict describing one unit of work: a pretraining (`kind = "pretrain"`) or a
bank of adapters trained together on one base (`kind = "adapt"`). `execute_job(job)` runs it into
`job["out_dir"]` and returns its result dict; it is a pure function of the job (executors in other
processes or machines import and call it). It is idempotent: when the run's summary.json exists the
stored result is returned, and an interrupted run resumes from its last checkpoint.

Seeds. A base with `per_seed = true` is pretrained once per seed; otherwise one base (seed
`base_seed`) serves every seed, and an adaptation with `stack_seeds = true` trains the adapters of all
seeds as one bank on it. Adapter k of seed s draws data with seed s*1000+k and initialises with
s*1000+k+500, as a separate run with `make_streams(tasks, s)` would, so stacking changes the speed
only (a bank trains exactly like separate runs: tested in the trainer).

Evaluation. After training, every adapter is evaluated on its evaluation tasks with `eval_examples`
fresh test examples (teacher-forced exact match, the same verdict as greedy decoding at one forward
pass); the trainer's own final greedy check uses at most 256 examples.

Run folders hold what `ctxtune.train.runs` describes plus `job.json` (the job) and, in summary.json,
a `result` entry (what execute_job returns). A failed job writes `error.json` and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctxtune.errors import ConfigError
from ctxtune.experiments.spec import StudySpec

TRAINER_EVAL_CAP = 256
SCALED_TRAIN_KEYS = ("steps", "warmup", "eval_every", "checkpoint_every")


# ----- expansion ---------------------------------------------------------------------------------
def scaled_train(train: dict[str, Any], factor: float, override: dict[str, Any] | None) -> dict[str, Any]:
    """Train table with every step count multiplied by `factor` (at least 1 step), then `override`."""
    out = dict(train)
    if factor != 1.0:
        for key in SCALED_TRAIN_KEYS:
            if out.get(key):
                out[key] = max(1, int(math.ceil(out[key] * factor))) if key == "steps" else int(out[key] * factor)
    out.update(override or {})
    if out.get("warmup", 0) >= out.get("steps", 1000):
        out["warmup"] = 0
    if out.get("log_every", 10) > out.get("steps", 1000):
        out["log_every"] = 1
    return out


def base_key(study: str, base: Any, scale: str) -> str:
    """Folder key of a base: "<share>-<hash of its configuration>" when shared, so that studies naming the
    same share id reuse one run exactly when their configurations at this scale agree."""
    if not base.share:
        return f"{study}.{base.name}"
    s = base.scales[scale]
    blob = json.dumps({"task": base.task, "model": s.model, "train": s.train, "per_seed": base.per_seed,
                       "base_seed": base.base_seed}, sort_keys=True)
    return f"{base.share}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def expand(
    studies: list[StudySpec],
    scale: str,
    seeds: int,
    out_dir: str | Path,
    device: str = "cpu",
    step_factor: float = 1.0,
    train_override: dict[str, Any] | None = None,
    eval_examples: int | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Jobs for `studies` at `scale` over seeds 0..seeds-1, pretrainings first (dependencies before users).

    train_override replaces train keys everywhere (tests use {"steps": 2}); eval_examples replaces the
    number of test examples of the final evaluation.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not step_factor > 0:
        raise ConfigError(f"the step factor must be positive, got {step_factor}")
    out = Path(out_dir).resolve()
    bases: dict[str, dict[str, Any]] = {}
    adapts: list[dict[str, Any]] = []
    common = {"device": device, "scale": scale, "step_factor": step_factor}
    if threads:
        common["threads"] = threads
    for study in studies:
        if scale not in study.scales:
            raise ConfigError(f"study {study.name!r} has no scale {scale!r}; it has: {', '.join(study.scales)}")
        base_ids: dict[tuple[str, int], str] = {}
        for b in study.bases.values():
            s = b.scales[scale]
            key = base_key(study.name, b, scale)
            for seed in range(seeds) if b.per_seed else [b.base_seed]:
                train = scaled_train(s.train, step_factor, train_override)
                train["seed"] = seed
                n_eval = int(eval_examples or train.get("eval_examples", 3200))
                train["eval_examples"] = min(n_eval, TRAINER_EVAL_CAP)
                job_id = f"base/{key}/s{seed}"
                job = {
                    "id": job_id, "kind": "pretrain", "out_dir": str(out / "runs" / "bases" / f"{key}-s{seed}"),
                    "task": b.task, "model": dict(s.model), "train": train, "seed": seed,
                    "eval": {"tasks": list(b.eval_tasks), "examples": n_eval, "mode": "teacher"},
                    "depends_on": [], "studies": [study.name], **common,
                }
                if job_id in bases:
                    old = bases[job_id]
                    old["eval"]["tasks"] += [t for t in b.eval_tasks if t not in old["eval"]["tasks"]]
                    old["studies"].append(study.name)
                else:
                    bases[job_id] = job
                for sd in range(seeds):
                    if b.per_seed and sd != seed:
                        continue
                    base_ids[(b.name, sd)] = job_id
        for a in study.adaptations.values():
            s = a.scales[scale]
            groups = [list(range(seeds))] if a.stack_seeds else [[sd] for sd in range(seeds)]
            for group in groups:
                base_id = base_ids[(a.base, group[0])]
                train = scaled_train(s.train, step_factor, train_override)
                train["seed"] = group[0]
                n_eval = int(eval_examples or train.get("eval_examples", 3200))
                train["eval_examples"] = min(n_eval, TRAINER_EVAL_CAP)
                streams = [
                    {"task": t, "seed": sd, "k": k, "row": f"{a.name}.{t}",
                     "eval_tasks": list(a.eval_tasks or [t])}
                    for sd in group for k, t in enumerate(a.tasks)
                ]
                tag = f"s{group[0]}" if len(group) == 1 else f"s{group[0]}-{group[-1]}"
                adapts.append({
                    "id": f"{study.name}/{a.name}/{tag}", "kind": "adapt",
                    "out_dir": str(out / "runs" / study.name / f"{a.name}-{tag}"),
                    "study": study.name, "adaptation": a.name, "method": a.method, "options": dict(s.options),
                    "base_id": base_id, "base_dir": bases[base_id]["out_dir"], "train": train, "seeds": group,
                    "streams": streams, "eval": {"examples": n_eval, "mode": "teacher"},
                    "depends_on": [base_id], **common,
                })
    return list(bases.values()) + adapts


# ----- execution ---------------------------------------------------------------------------------
def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def stored_result(job: dict[str, Any]) -> dict[str, Any] | None:
    path = Path(job["out_dir"]) / "summary.json"
    if not path.is_file():
        return None
    try:
        data = _load_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, dict):
        return None
    return {**result, "cached": True}


def place(model: Any, device: str) -> Any:
    """Move a base model to `device` before a method is attached (methods create their adapters on the
    base's device; the trainer and the evaluator move each CPU-generated batch to it)."""
    import torch

    if device == "cpu":
        return model
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return model.to(dev)


def _write_job(out: Path, job: dict[str, Any]) -> None:
    from ctxtune.io import atomic_write_json

    path = out / "job.json"
    if path.is_file():
        old = _load_json(path)
        keep = ("kind", "task", "model", "train", "method", "options", "streams", "base_id")
        if {k: old.get(k) for k in keep} != {k: job.get(k) for k in keep}:
            raise ConfigError(f"{out} holds a run of another job; choose another --out folder")
    atomic_write_json(path, job)


def execute_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job into job["out_dir"] and return its result (stored result if already finished)."""
    done = stored_result(job)
    if done is not None:
        return done
    import torch

    from ctxtune.io import atomic_write_json
    from ctxtune.methods import make_method
    from ctxtune.model import GPT, ModelConfig
    from ctxtune.tasks import get_task
    from ctxtune.train.api import check_fits, write_run_config
    from ctxtune.train.config import TrainConfig
    from ctxtune.train.evaluate import evaluate
    from ctxtune.train.runs import load_base_model, save_adapter, save_model
    from ctxtune.train.trainer import Stream, Trainer

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    start = time.perf_counter()
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    _write_job(out, job)
    (out / "error.json").unlink(missing_ok=True)
    device = job.get("device", "cpu")
    cfg = TrainConfig.from_dict(job["train"])
    resume = (out / "checkpoint.safetensors").is_file()
    mode = job["eval"].get("mode", "teacher")
    n_eval = int(job["eval"]["examples"])
    rows: list[dict[str, Any]] = []

    if job["kind"] == "pretrain":
        model_cfg = ModelConfig.from_dict(job["model"])
        task = get_task(job["task"])
        check_fits(model_cfg, [task], cfg.placeholders)
        torch.manual_seed(cfg.seed)
        model = place(GPT(model_cfg), device)
        method = make_method("full", model)
        write_run_config(out, "pretrain", model_cfg, {"key": "full", "options": {}, "n_adapters": 1}, cfg, [task.name])
        streams = [Stream(task, data_seed=cfg.seed * 1000, init_seed=cfg.seed * 1000 + 500)]
        result = Trainer(method, streams, cfg, out, quiet=True).run(resume=resume)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        eval_tasks = [get_task(t) for t in job["eval"]["tasks"]]
        accs = evaluate(method, eval_tasks, n_eval, seed=cfg.seed, placeholders=cfg.placeholders, mode=mode,
                        adapters=[0] * len(eval_tasks))
        rows.append({"row": None, "seed": job["seed"], "task": task.name,
                     "acc": dict(zip(job["eval"]["tasks"], accs, strict=True))})
        model.to("cpu")
        save_model(out, model)
        info = {**method.describe(), "trainable_per_adapter": method.num_trainable()}
    elif job["kind"] == "adapt":
        model = place(load_base_model(job["base_dir"]), device)
        streams_spec = job["streams"]
        tasks = [get_task(s["task"]) for s in streams_spec]
        method = make_method(job["method"], model, n_adapters=len(tasks), **job["options"])
        method.to(next(model.parameters()).device)
        extra = method.config.n_virtual if getattr(method.config, "position_policy", "keep") == "shift" else 0
        check_fits(model.cfg, tasks, cfg.placeholders, extra)
        spec = {"key": job["method"], "options": method.config.to_dict(), "n_adapters": len(tasks)}
        write_run_config(out, "tune", model.cfg, spec, cfg, [t.name for t in tasks], base=job["base_dir"])
        streams = [Stream(t, data_seed=s["seed"] * 1000 + s["k"], init_seed=s["seed"] * 1000 + s["k"] + 500)
                   for t, s in zip(tasks, streams_spec, strict=True)]
        result = Trainer(method, streams, cfg, out, quiet=True).run(resume=resume)
        for k, s in enumerate(streams_spec):
            names = s["eval_tasks"]
            accs = evaluate(method, [get_task(t) for t in names], n_eval, seed=s["seed"], placeholders=cfg.placeholders,
                            mode=mode, adapters=[k] * len(names))
            rows.append({"row": s["row"], "seed": s["seed"], "task": s["task"],
                         "acc": dict(zip(names, accs, strict=True))})
        if job["method"] == "full":
            model.to("cpu")
            save_model(out, model)
        else:
            method.to("cpu")
            save_adapter(out, method)
        info = {**method.describe(), "trainable_per_adapter": method.num_trainable() // max(1, len(tasks))}
    else:
        raise ConfigError(f"unknown job kind {job.get('kind')!r}")

    res = {
        "id": job["id"], "kind": job["kind"], "status": "ok", "out_dir": str(out), "rows": rows,
        "steps": result.steps, "final_loss": result.final_loss, "train_seconds": round(result.seconds, 3),
        "seconds": round(time.perf_counter() - start, 3), "trainable_per_adapter": info["trainable_per_adapter"],
        "n_adapters": info["n_adapters"], "device": device, "resumed": resume,
    }
    summary = {
        "steps": result.steps, "final_loss": result.final_loss, "seconds": round(result.seconds, 3),
        "accuracy": [float(a) for a in result.accuracy], **info, "result": res,
    }
    atomic_write_json(out / "summary.json", summary)
    return res


def safe_execute_job(job: dict[str, Any]) -> dict[str, Any]:
    """execute_job that never raises: a failure is recorded in error.json and returned as a result."""
    start = time.perf_counter()
    try:
        return execute_job(job)
    except BaseException as exc:  # noqa: BLE001 - a failed job must not stop the others
        if isinstance(exc, KeyboardInterrupt):
            raise
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        res = {"id": job.get("id"), "kind": job.get("kind"), "status": "failed", "error": message,
               "out_dir": job.get("out_dir"), "seconds": round(time.perf_counter() - start, 3)}
        _record_error(job, res, traceback.format_exc())
        return res


def _record_error(job: dict[str, Any], res: dict[str, Any], trace: str | None) -> None:
    """error.json in the job's run folder (what the report reads for failed and skipped jobs)."""
    try:
        from ctxtune.io import atomic_write_json

        atomic_write_json(Path(job["out_dir"]) / "error.json", {**res, "traceback": trace})
    except Exception:  # noqa: BLE001
        pass


# ----- scheduling ----------------------------------------------------------------------------------
def waves(jobs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Jobs grouped so that every job comes after the jobs it depends on."""
    placed: dict[str, int] = {}
    remaining = list(jobs)
    out: list[list[dict[str, Any]]] = []
    while remaining:
        wave = [j for j in remaining if all(d in placed for d in j.get("depends_on", []))]
        if not wave:
            raise ConfigError(f"jobs with unknown or circular dependencies: {[j['id'] for j in remaining]}")
        for j in wave:
            placed[j["id"]] = len(out)
        out.append(wave)
        remaining = [j for j in remaining if j["id"] not in placed]
    return out


def run_jobs(
    jobs: list[dict[str, Any]],
    executor: Any = None,
    on_result: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `jobs` in dependency order; returns results by job id. A job whose dependency failed is skipped.

    executor: None runs in this process, one job after another; otherwise an executor of
    `ctxtune.experiments.executors` (its `run(jobs, worker, on_event)`), which calls `execute_job` by import.
    """
    results: dict[str, dict[str, Any]] = {}
    if executor is not None:
        by_id = {j["id"]: j for j in jobs}

        def on_event(event: Any) -> None:
            if event.kind not in ("done", "failed") or event.outcome is None:
                return
            res = outcome_result(event.job, event.outcome)
            results[event.job["id"]] = res
            if on_result:
                on_result(event.job, res)

        outcomes = executor.run(jobs, worker="ctxtune.experiments.runner:execute_job", on_event=on_event)
        for job_id, outcome in outcomes.items():
            if job_id not in results:
                results[job_id] = outcome_result(by_id[job_id], outcome)
                if on_result:
                    on_result(by_id[job_id], results[job_id])
        return results

    def ready(job: dict[str, Any]) -> bool:
        return all(results.get(d, {}).get("status") == "ok" for d in job.get("depends_on", []))

    def skipped(job: dict[str, Any]) -> dict[str, Any]:
        bad = [d for d in job.get("depends_on", []) if results.get(d, {}).get("status") != "ok"]
        res = {"id": job["id"], "kind": job["kind"], "status": "skipped", "out_dir": job["out_dir"],
               "error": f"dependency failed: {', '.join(bad)}", "seconds": 0.0}
        _record_error(job, res, None)
        return res

    waves(jobs)  # rejects unknown or circular dependencies
    for j in study_order(jobs):
        results[j["id"]] = safe_execute_job(j) if ready(j) else skipped(j)
        if on_result:
            on_result(j, results[j["id"]])
    return results


def study_order(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dependencies first, otherwise study by study: a run cut short still leaves whole studies behind."""
    by_id = {j["id"]: j for j in jobs}
    placed: dict[str, dict[str, Any]] = {}

    def place_job(job: dict[str, Any]) -> None:
        if job["id"] in placed:
            return
        for dep in job.get("depends_on", []):
            if dep in by_id:
                place_job(by_id[dep])
        placed[job["id"]] = job

    for job in [j for j in jobs if j.get("depends_on")] + jobs:
        place_job(job)
    return list(placed.values())


def outcome_result(job: dict[str, Any], outcome: Any) -> dict[str, Any]:
    """An executor's JobOutcome as a runner result dict."""
    if outcome.status == "done" and isinstance(outcome.result, dict):
        return outcome.result
    res = {"id": job["id"], "kind": job["kind"], "status": "failed", "out_dir": job["out_dir"],
           "error": outcome.error or "failed", "seconds": outcome.seconds}
    if "dependency" in str(outcome.error or "") and not outcome.attempts:
        res["status"] = "skipped"
    _record_error(job, res, outcome.traceback)
    return res


class ProgressPrinter:
    """Progress of a job list: a rich bar on a terminal, one line per finished job otherwise."""

    def __init__(self, jobs: list[dict[str, Any]], quiet: bool = False) -> None:
        self.total, self.done, self.quiet = len(jobs), 0, quiet
        self.bar: Any = None
        self.task: Any = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]reproduce"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task("starting", total=self.total)

    def __enter__(self) -> ProgressPrinter:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, job: dict[str, Any], result: dict[str, Any]) -> None:
        self.done += 1
        status = result.get("status")
        took = f"{result.get('seconds', 0):.1f}s" + (" (stored)" if result.get("cached") else "")
        line = f"[{self.done}/{self.total}] {job['id']}: {status} {took}"
        if status != "ok":
            line += f" - {result.get('error', '')}"
        if self.bar is not None:
            self.bar.console.print(line)
            self.bar.update(self.task, advance=1, description=job["id"])
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)
