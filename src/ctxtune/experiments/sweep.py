"""Sweeps: a TOML grid over methods, tasks, seeds and options, expanded to jobs and run by an executor.

A sweep spec (every table but [grid] optional; unknown keys are errors)::

    name = "prefix-vs-lora"        # study name in the results store (default: the file name)

    [model]                        # ModelConfig of the base model (pretrained once per seed)
    n_layers = 1
    d_model = 32

    [pretrain]                     # omit it and set tune.base to tune an existing run folder instead
    task = "ascending"
    [pretrain.train]               # TrainConfig; the seed comes from grid.seeds
    steps = 300

    [tune]
    # base = "runs/asc"            # an existing pretrained run folder (instead of [pretrain])
    [tune.train]                   # TrainConfig of every tuning run; the seed comes from grid.seeds
    steps = 200

    [grid]                         # one tuning run per seed x method x task x option combination
    seeds = [0, 1, 2]
    methods = ["prefix", "lora"]
    tasks = ["descending"]         # each run trains one adapter on one task
    [grid.options.prefix]          # per method: every value is a LIST of the values to try
    n_virtual = [1, 4]
    [grid.options.lora]
    rank = [1]
    targets = [["o", "mlp_out"]]

    [resources]                    # per job kind, honoured by the Ray executor
    tune = { num_cpus = 1, num_gpus = 0.25 }

Each job runs into DIR/runs/<hash8>/ (hash8: the first 8 hex digits of its configuration hash), the
results index is DIR/results.sqlite and a summary of every run is DIR/results.json. A tuning job
depends on its seed's pretraining job. Running the sweep again skips the finished runs. Unless a train
table sets checkpoint_every, runs checkpoint every steps // 10 steps, so a retried worker resumes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomllib

from ctxtune.errors import ConfigError
from ctxtune.experiments.executors import Event, Executor, JobOutcome, LocalExecutor
from ctxtune.experiments.store import ResultsStore, job_hash
from ctxtune.io import atomic_write_json, load_json

SWEEP_WORKER = "ctxtune.experiments.sweep:run_job"
TOP_KEYS = {"name", "model", "pretrain", "tune", "grid", "resources"}
CONFIG_KEYS = ("model", "task", "base", "base_dir", "options", "train")  # a run's config in results.json
PRETRAIN_DEFAULTS = {"weight_decay": 0.1, "decay_matrices_only": True, "train_mode": True}


def _table(data: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] in the sweep spec must be a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in [{name}]: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return dict(value)


def _list(grid: dict[str, Any], key: str, kind: type) -> list[Any]:
    values = grid.get(key)
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values)
    ):
        raise ConfigError(f"grid.{key} must be a non-empty list of {kind.__name__}s, got {values!r}")
    return values


def _train_dict(base: dict[str, Any], seed: int, where: str) -> dict[str, Any]:
    from ctxtune.train.config import TrainConfig

    if "seed" in base:
        raise ConfigError(f"[{where}.train] must not set seed: seeds come from grid.seeds")
    data = {**base, "seed": seed}
    if "checkpoint_every" not in data and isinstance(data.get("steps", 1000), int):
        # A sweep checkpoints by default, so a retried worker resumes instead of starting over.
        data["checkpoint_every"] = max(1, data.get("steps", 1000) // 10)
    return TrainConfig.from_dict(data).to_dict()


def option_grid(method: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a method's option lists, validated against the method's config."""
    from ctxtune.methods import get_method_class

    cls = get_method_class(method)
    for key, values in options.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"grid.options.{method}.{key} must be a non-empty list of values to try, got {values!r}"
            )
    keys = sorted(options)
    combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(options[k] for k in keys))]
    for combo in combos:
        cls.config_cls.from_dict(dict(combo), method=method)
    return combos


def expand(spec: dict[str, Any], out_dir: str | Path, name: str = "sweep") -> list[dict[str, Any]]:
    """The jobs of a sweep spec (parsed TOML), pretraining before tuning; validated before anything runs.

    Args:
        spec: the parsed TOML (see the module docstring).
        out_dir: the sweep folder; job folders are out_dir/runs/<hash8>.
        name: study name used when the spec has none.

    Returns:
        job dicts for `Executor.run` and `run_job`.
    """
    from ctxtune.model import ModelConfig
    from ctxtune.tasks import get_task

    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in the sweep spec: {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_KEYS))}"
        )
    study = spec.get("name", name)
    if not isinstance(study, str) or not study:
        raise ConfigError(f"name must be a non-empty string, got {study!r}")
    runs = Path(out_dir).resolve() / "runs"
    model = ModelConfig.from_dict(_table(spec, "model", set(ModelConfig.__dataclass_fields__))).to_dict()
    pre = _table(spec, "pretrain", {"task", "train"})
    tune = _table(spec, "tune", {"base", "train"})
    grid = _table(spec, "grid", {"seeds", "methods", "tasks", "options"})
    resources = _table(spec, "resources", {"pretrain", "tune"})
    seeds, methods, tasks = _list(grid, "seeds", int), _list(grid, "methods", str), _list(grid, "tasks", str)
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"grid.seeds must be distinct non-negative integers, got {seeds}")
    for t in tasks:
        get_task(t)
    options = grid.get("options", {})
    if not isinstance(options, dict) or sorted(set(options) - set(methods)):
        raise ConfigError(f"grid.options must be a table of tables named after grid.methods {methods}")
    combos = {m: option_grid(m, dict(options.get(m, {}))) for m in methods}
    if bool(pre) == ("base" in tune):
        raise ConfigError(
            "give exactly one of [pretrain] (with a task) or tune.base (an existing run folder)"
        )

    def job(
        kind: str, seed: int, config: dict[str, Any], deps: list[str], extra: dict[str, Any]
    ) -> dict[str, Any]:
        body = {"kind": kind, "seed": seed, **config}
        h = job_hash(body)
        return {
            "id": f"{kind}-{h[:8]}",
            **body,
            "config_hash": h,
            "study": study,
            "out_dir": str(runs / h[:8]),
            "depends_on": deps,
            "resources": dict(resources.get(kind, {})),
            **extra,
        }

    jobs = []
    for seed in seeds:
        if pre:
            if "task" not in pre:
                raise ConfigError("[pretrain] needs a task")
            get_task(pre["task"])
            train = _train_dict({**PRETRAIN_DEFAULTS, **pre.get("train", {})}, seed, "pretrain")
            base_job = job("pretrain", seed, {"model": model, "task": pre["task"], "train": train}, [], {})
            jobs.append(base_job)
            base, deps, base_dir = base_job["config_hash"], [base_job["id"]], base_job["out_dir"]
        else:
            base_dir = str(Path(tune["base"]).resolve())
            base, deps = base_dir, []
        for method, task, opts in ((m, t, o) for m in methods for t in tasks for o in combos[m]):
            defaults = {"weight_decay": 0.1, "decay_matrices_only": True} if method == "full" else {}
            train = _train_dict({**defaults, **tune.get("train", {})}, seed, "tune")
            config = {"base": base, "method": method, "options": opts, "tasks": [task], "train": train}
            jobs.append(job("tune", seed, config, deps, {"base_dir": base_dir}))
    return jobs


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker for sweep jobs: run one pretrain or tune job into job["out_dir"], idempotently.

    A finished run (summary.json present) returns its stored result; otherwise training resumes from the
    run's last checkpoint, or starts when there is none.
    """
    from ctxtune.model import ModelConfig
    from ctxtune.train.api import pretrain, tune
    from ctxtune.train.config import TrainConfig

    out = Path(job["out_dir"])
    if not (out / "summary.json").is_file():
        train = TrainConfig.from_dict(job["train"])
        if job["kind"] == "pretrain":
            pretrain(ModelConfig.from_dict(job["model"]), job["task"], train, out, resume=True)
        elif job["kind"] == "tune":
            tune(
                job["base_dir"], job["method"], job["tasks"], train, job.get("options", {}), out, resume=True
            )
        else:
            raise ConfigError(f"unknown job kind {job['kind']!r}; expected pretrain or tune")
    return result_of(job, load_json(out / "summary.json"))


def result_of(job: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The result a worker returns: the run's summary and its mean accuracy."""
    acc = summary.get("accuracy", {})
    mean = sum(acc.values()) / len(acc) if acc else None
    return {
        "id": job["id"],
        "kind": job["kind"],
        "out_dir": job["out_dir"],
        "accuracy": mean,
        "summary": summary,
    }


def run_sweep(
    jobs: list[dict[str, Any]],
    out_dir: str | Path,
    executor: Executor | None = None,
    worker: str = SWEEP_WORKER,
    on_event: Callable[[Event, dict[str, int]], None] | None = None,
    store_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run the jobs not yet done, record every start, result and failure, write results.json.

    Args:
        jobs: from `expand`.
        out_dir: the sweep folder (results.sqlite and results.json go here).
        executor: how to run them (default: in this process).
        worker: dotted path of the worker.
        on_event: called with each event and the counts {"done", "failed", "skipped", "remaining"}.
        store_path: the SQLite index (default out_dir/results.sqlite; keep it on a local disk).

    Returns:
        {"out", "done", "failed", "skipped", "runs": [...]} (the content of results.json).
    """
    out = Path(out_dir)
    store = ResultsStore(store_path if store_path is not None else out / "results.sqlite")
    executor = executor or LocalExecutor()
    finished = [
        j for j in jobs if store.is_done(j["config_hash"]) and (Path(j["out_dir"]) / "summary.json").is_file()
    ]
    skipped = {j["id"] for j in finished}
    todo = [j for j in jobs if j["id"] not in skipped]
    for j in todo:
        store.record_queued(j)
    counts = {"done": 0, "failed": 0, "skipped": len(skipped), "remaining": len(todo)}

    def handle(event: Event) -> None:
        if event.kind == "start":
            store.record_start(event.job)
        elif event.kind in ("done", "failed"):
            assert event.outcome is not None
            if event.kind == "done":
                store.record_done(event.job, event.outcome.result or {})
            else:
                store.record_failure(event.job, event.outcome.error or "failed")
            counts[event.kind] += 1
            counts["remaining"] -= 1
        if on_event is not None:
            on_event(event, dict(counts))

    outcomes: dict[str, JobOutcome] = {}
    try:
        outcomes = executor.run(todo, worker=worker, on_event=handle, finished=skipped)
    finally:
        summary = write_results(out, jobs, store, outcomes)
    return summary


def write_results(
    out: Path, jobs: list[dict[str, Any]], store: ResultsStore, outcomes: dict[str, JobOutcome]
) -> dict:
    """DIR/results.json: one entry per job of this sweep, from the store (what a report reads)."""
    entries, counts = [], {"done": 0, "failed": 0, "queued": 0, "running": 0}
    for j in jobs:
        row = store.get(j["config_hash"]) or {}
        status = row.get("status", "queued")
        counts[status] += 1
        metrics = row.get("metrics") or {}
        entries.append(
            {
                "id": j["id"],
                "kind": j["kind"],
                "study": j["study"],
                "seed": j["seed"],
                "config_hash": j["config_hash"],
                "method": j.get("method"),
                "tasks": j.get("tasks", [j.get("task")]),
                "status": status,
                "accuracy": metrics.get("accuracy"),
                "accuracy_by_task": (metrics.get("summary") or {}).get("accuracy"),
                "attempts": row.get("attempts", 0),
                "error": row.get("error"),
                "out_dir": j["out_dir"],
                "config": {k: j[k] for k in CONFIG_KEYS if k in j},
            }
        )
    skipped = sum(
        1 for j, e in zip(jobs, entries, strict=True) if j["id"] not in outcomes and e["status"] == "done"
    )
    summary = {
        "out": str(out),
        "done": counts["done"],
        "failed": counts["failed"],
        "skipped": skipped,
        "remaining": counts["queued"] + counts["running"],
        "runs": entries,
    }
    atomic_write_json(out / "results.json", summary)
    return summary


def load_spec(path: str | Path) -> tuple[dict[str, Any], str]:
    """Parse a sweep spec TOML file; returns (spec, default study name = file stem)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec not found: {path}")
    try:
        return tomllib.loads(path.read_text()), path.stem
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"malformed TOML in {path}: {exc}") from None
