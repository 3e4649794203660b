"""Expand study specs into jobs: training runs (a RunSpec each) and analyses, with their dependencies.

Seeds. A base with `per_seed = true` is pretrained once per seed; otherwise one base (seed `base_seed`)
serves every seed. Bases with the same `share` id and the same configuration at a scale are one run, also
across studies. An adaptation with `stack_seeds = true` trains the adapters of all seeds as one bank (on a
shared base); adapter k of seed s draws its data and initialisation from `stream_seeds(s, k)` exactly as a
separate run of seed s would, so stacking changes the speed only (tested in the trainer).

Evaluation. Every adapter is evaluated on its evaluation tasks with `eval_examples` fresh test examples,
teacher-forced (the same verdict as greedy decoding at one forward pass); the trainer's own final greedy
check uses at most TRAINER_EVAL_CAP examples.

A job is JSON (ctxtune.experiments.jobs): {"id", "kind": "train" | "analysis", "out_dir", "depends_on",
...}; training jobs carry "spec" (RunSpec.to_dict()) and report labels: "rows" (pretraining: study -> base
name) or "study" and "adaptation", and "cost" (estimated training FLOPs per thread, `run_cost`), by which
the scheduler starts the longest chains first.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ctxtune.errors import ConfigError
from ctxtune.experiments.spec import AdaptationSpec, BaseSpec, StudySpec

TRAINER_EVAL_CAP = 256
SCALED_TRAIN_KEYS = ("steps", "warmup", "eval_every", "checkpoint_every")
SMALL_STEP_FLOPS = 1e11
"""A run whose training step costs less than this many floating-point operations gets one torch thread:
on a CPU, several such runs side by side beat one run on several threads (measured: benchmarks/NOTES.md)."""


def step_flops(model_cfg: Any, batch: int, positions: int, n_adapters: int) -> float:
    """Floating-point operations of one training step, roughly (6 x parameters x tokens)."""
    d, layers = model_cfg.d_model, model_cfg.n_layers
    params = layers * 12 * d * d + 2 * model_cfg.d_vocab * d  # attention + MLP (4d) + embeddings, roughly
    return float(6 * params * batch * n_adapters * positions)


def threads_for(model_cfg: Any, batch: int, positions: int, n_adapters: int, cores: int) -> int:
    """Torch threads of a run, from its size only (so a serial and a parallel reproduce compute the same
    numbers): 1 for small models, else up to 4 of this machine's cores."""
    flops = step_flops(model_cfg, batch, positions, n_adapters)
    return 1 if flops < SMALL_STEP_FLOPS else max(1, min(4, cores))


def positions(streams: Any, placeholders: int) -> int:
    """Sequence length a run trains on: its longest task plus the leading placeholder tokens."""
    from ctxtune.tasks import get_task

    return placeholders + max(get_task(s.task).n_input + get_task(s.task).n_output for s in streams)


def run_cost(spec: Any, model_cfg: Any) -> float:
    """A run's estimated cost (training FLOPs), per thread: the scheduler starts the longest chains first."""
    flops = step_flops(model_cfg, spec.train.batch_size, positions(spec.streams, spec.train.placeholders),
                       len(spec.streams))
    return flops * spec.train.steps / max(1, spec.threads or 1)


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


def base_key(study: str, base: BaseSpec, scale: str) -> str:
    """Folder key of a base: "<share>-<hash of its configuration>" when shared, so that studies naming the
    same share id reuse one run exactly when their configurations at this scale agree."""
    if not base.share:
        return f"{study}.{base.name}"
    s = base.scales[scale]
    blob = json.dumps({"task": base.task, "model": s.model, "train": s.train, "per_seed": base.per_seed,
                       "base_seed": base.base_seed}, sort_keys=True)
    return f"{base.share}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


class Expansion:
    """The jobs of a list of studies at one scale (`expand` is the entry point)."""

    def __init__(self, scale: str, seeds: int, out: Path, common: dict[str, Any], step_factor: float,
                 train_override: dict[str, Any] | None, eval_examples: int | None) -> None:
        self.scale, self.seeds, self.out, self.common = scale, seeds, out, common
        self.step_factor, self.train_override, self.eval_examples = step_factor, train_override, eval_examples
        self.bases: dict[str, dict[str, Any]] = {}
        self.others: list[dict[str, Any]] = []

    def train_table(self, table: dict[str, Any], seed: int) -> tuple[dict[str, Any], int]:
        train = scaled_train(table, self.step_factor, self.train_override)
        train["seed"] = seed
        if self.common["precision"] != "fp32":
            train["precision"] = self.common["precision"]
        n_eval = int(self.eval_examples or train.get("eval_examples", 3200))
        train["eval_examples"] = min(n_eval, TRAINER_EVAL_CAP)
        return train, n_eval

    def spec(self, model_cfg: Any, **fields: Any) -> Any:
        """A RunSpec on this expansion's device, with the threads the run's size calls for (or --threads)."""
        from ctxtune.train.config import TrainConfig
        from ctxtune.train.spec import EvalSpec, RunSpec

        train = TrainConfig.from_dict(fields.pop("train"))
        threads = self.common["threads"]
        if not threads:
            threads = threads_for(model_cfg, train.batch_size, positions(fields["streams"], train.placeholders),
                                  len(fields["streams"]), self.common["cores"])
        return RunSpec(train=train, eval=EvalSpec(fields.pop("n_eval")), device=self.common["device"],
                       threads=threads, **fields)

    def add_base(self, study: StudySpec, b: BaseSpec) -> dict[int, Any]:
        """Pretraining jobs of base `b`; returns seed -> job id (or, for an existing model, its BaseRef)."""
        from ctxtune.model import ModelConfig
        from ctxtune.train.runs import resolve_base
        from ctxtune.train.spec import StreamSpec

        if b.source is not None:
            ref = resolve_base(b.source)  # validated (exists, readable) before anything runs
            return dict.fromkeys(range(self.seeds), ref)
        s = b.scales[self.scale]
        key = base_key(study.name, b, self.scale)
        ids: dict[int, str] = {}
        for seed in range(self.seeds) if b.per_seed else [b.base_seed]:
            job_id = f"base/{key}/s{seed}"
            if job_id in self.bases:
                job = self.bases[job_id]
                job["rows"][study.name] = b.name
                spec = job["spec"]
                extra = [t for t in b.eval_tasks if t not in spec["streams"][0]["eval_tasks"]]
                spec["streams"][0]["eval_tasks"] += extra
            else:
                train, n_eval = self.train_table(s.train, seed)
                stream = StreamSpec(b.task, seed=seed, eval_tasks=tuple(b.eval_tasks), row=b.name)
                model_cfg = ModelConfig.from_dict(s.model)
                spec = self.spec(model_cfg, kind="pretrain", method="full", streams=(stream,), train=train,
                                 n_eval=n_eval, model=model_cfg)
                self.bases[job_id] = {"id": job_id, "kind": "train", "spec": spec.to_dict(),
                                      "out_dir": str(self.out / "runs" / "bases" / f"{key}-s{seed}"),
                                      "depends_on": [], "rows": {study.name: b.name},
                                      "cost": run_cost(spec, model_cfg)}
            for sd in range(self.seeds):
                if not b.per_seed or sd == seed:
                    ids[sd] = job_id
        return ids

    def add_adaptation(self, study: StudySpec, a: AdaptationSpec, base_ids: dict[int, Any]) -> dict[int, str]:
        """Tuning jobs of adaptation `a`; returns seed -> job id."""
        from ctxtune.model import ModelConfig
        from ctxtune.train.spec import StreamSpec, check_fits

        s = a.scales[self.scale]
        groups = [list(range(self.seeds))] if a.stack_seeds else [[sd] for sd in range(self.seeds)]
        ids: dict[int, str] = {}
        for group in groups:
            base = base_ids[group[0]]
            if isinstance(base, str):  # a pretraining job of this plan
                base_job = self.bases[base]
                base_dir, deps = base_job["out_dir"], [base_job["id"]]
                base_cfg = ModelConfig.from_dict(base_job["spec"]["model"])
            else:  # an existing model
                base_dir, deps, base_cfg = base.source, [], base.model_config
            train, n_eval = self.train_table(s.train, group[0])
            streams = tuple(StreamSpec(t, seed=sd, index=k, eval_tasks=tuple(a.eval_tasks or [t]), row=f"{a.name}.{t}")
                            for sd in group for k, t in enumerate(a.tasks))
            spec = self.spec(base_cfg, kind="tune", method=a.method, streams=streams, train=train, n_eval=n_eval,
                             options=dict(s.options), base=base_dir)
            check_fits(spec, base_cfg)
            tag = f"s{group[0]}" if len(group) == 1 else f"s{group[0]}-{group[-1]}"
            job_id = f"{study.name}/{a.name}/{tag}"
            self.others.append({"id": job_id, "kind": "train", "spec": spec.to_dict(),
                                "out_dir": str(self.out / "runs" / study.name / f"{a.name}-{tag}"),
                                "depends_on": deps, "study": study.name, "adaptation": a.name,
                                "cost": run_cost(spec, base_cfg)})
            ids.update({sd: job_id for sd in group})
        return ids

    def add_study(self, study: StudySpec) -> None:
        if self.scale not in study.scales:
            raise ConfigError(f"study {study.name!r} has no scale {self.scale!r}; it has: {', '.join(study.scales)}")
        base_ids = {b.name: self.add_base(study, b) for b in study.bases.values()}
        runs = {a.name: self.add_adaptation(study, a, base_ids[a.base]) for a in study.adaptations.values()}
        by_id = {j["id"]: j for j in self.others}
        for an in study.analyses.values():
            for seed in range(self.seeds):
                deps = [runs[name][seed] for name in an.adaptations]
                self.others.append({
                    "id": f"{study.name}/analysis.{an.name}/s{seed}", "kind": "analysis",
                    "analysis": {"kind": an.kind, "name": an.name, "study": study.name, "seed": seed,
                                 "options": dict(an.options)},
                    "inputs": [{"adaptation": name, "out_dir": by_id[d]["out_dir"]}
                               for name, d in zip(an.adaptations, deps, strict=True)],
                    "out_dir": str(self.out / "runs" / study.name / f"analysis.{an.name}-s{seed}"),
                    "depends_on": sorted(set(deps)), "study": study.name,
                })


def expand(
    studies: list[StudySpec],
    scale: str,
    seeds: int,
    out_dir: str | Path,
    device: str = "cpu",
    step_factor: float = 1.0,
    train_override: dict[str, Any] | None = None,
    eval_examples: int | None = None,
    threads: int = 0,
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    """Jobs for `studies` at `scale` over seeds 0..seeds-1: dependencies first, then study by study.

    train_override replaces train keys everywhere (tests use {"steps": 2}); eval_examples replaces the
    number of test examples of the final evaluation; precision "bf16" trains every run under bfloat16 autocast.
    threads 0 picks each run's threads from its size (`threads_for`). Every RunSpec is validated here, before
    anything runs.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
    if not (isinstance(step_factor, (int, float)) and math.isfinite(step_factor) and step_factor > 0):
        raise ConfigError(f"the step factor must be a positive number, got {step_factor}")
    common = {"device": device, "threads": threads, "cores": usable_cores(), "precision": precision}
    exp = Expansion(scale, seeds, Path(out_dir).resolve(), common, step_factor, train_override, eval_examples)
    for study in studies:
        exp.add_study(study)
    return study_order(list(exp.bases.values()) + exp.others)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and `taskset` restrict)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def study_order(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dependencies first, otherwise study by study: the order among jobs whose chains of work cost the same
    (the scheduler starts the costliest chain first, `executors.chain_costs`)."""
    by_id = {j["id"]: j for j in jobs}
    placed: dict[str, dict[str, Any]] = {}

    def place(job: dict[str, Any]) -> None:
        if job["id"] in placed:
            return
        for dep in job.get("depends_on", []):
            if dep in by_id:
                place(by_id[dep])
        placed[job["id"]] = job

    for job in [j for j in jobs if j.get("depends_on")] + jobs:
        place(job)
    return list(placed.values())
