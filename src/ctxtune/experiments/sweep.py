"""Sweeps: a TOML grid over methods, tasks, seeds and options, expanded to a plan of runs (RunSpecs).

A sweep spec (every table but [grid] optional; unknown keys are errors)::

    name = "prefix-vs-lora"        # the sweep's name: letters, digits, '.', '_', '-' (default: the file name)

    [model]                        # ModelConfig of the base model (pretrained once per seed)
    n_layers = 1
    d_model = 32

    [pretrain]                     # omit it and set tune.base to tune an existing base instead
    task = "ascending"
    [pretrain.train]               # TrainConfig; the seed comes from grid.seeds
    steps = 300

    [tune]
    # base = "runs/asc"            # an existing base (a pretraining run folder or a Hugging Face model)
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

Each run goes to DIR/runs/<hash8>/ (the first 8 hex digits of its RunSpec's fingerprint). The sweep is
reported like a study (results.json and report.html in DIR, schema docs/results-schema.md): one row per
method and option combination and task, one value per seed. Running the sweep again skips finished runs.
Unless a train table sets checkpoint_every, runs checkpoint every steps // 10 steps, so a retried worker
resumes. Everything is validated (the base exists, every task fits the model) before anything is written.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from ctxtune.configs import check_keys, load_toml, table
from ctxtune.errors import ConfigError, not_found

TOP_KEYS = {"name", "model", "pretrain", "tune", "grid", "resources"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def safe_name(name: Any, what: str = "name") -> str:
    """A name that becomes a path component: no separators, no '..', at most 100 characters."""
    if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{what} must be 1-100 letters, digits, '.', '_' or '-' (no path separators or '..'), got {name!r}"
        )
    return name


def _list(grid: dict[str, Any], key: str, kind: type) -> list[Any]:
    values = grid.get(key)
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values)
    ):
        raise ConfigError(f"grid.{key} must be a non-empty list of {kind.__name__}s, got {values!r}")
    return values


def _train(table_: dict[str, Any], seed: int, defaults: dict[str, Any], where: str) -> Any:
    from ctxtune.train.config import TrainConfig

    if "seed" in table_:
        raise ConfigError(f"[{where}.train] must not set seed: seeds come from grid.seeds")
    data = {**defaults, **table_, "seed": seed}
    if "checkpoint_every" not in data and isinstance(data.get("steps", 1000), int):
        # A sweep checkpoints by default, so a retried worker resumes instead of starting over.
        data["checkpoint_every"] = max(1, data.get("steps", 1000) // 10)
    return TrainConfig.from_dict(data)


def option_grid(method: str, options: Any) -> list[dict[str, Any]]:
    """Every combination of a method's option lists, validated against the method's config."""
    from ctxtune.methods import get_method_class

    cls = get_method_class(method)
    if not isinstance(options, dict):
        raise ConfigError(f"grid.options.{method} must be a table of option lists, got {options!r}")
    for key, values in options.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"grid.options.{method}.{key} must be a non-empty list of values to try, got {values!r}"
            )
    for key, values in options.items():
        shown = [json.dumps(v, sort_keys=True, default=str) for v in values]
        repeated = sorted({v for v in shown if shown.count(v) > 1})
        if repeated:
            raise ConfigError(f"grid.options.{method}.{key} lists {repeated[0]} twice: each value would run the "
                              "same configuration again")
    keys = sorted(options)
    combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(options[k] for k in keys))]
    for combo in combos:
        cls.config_cls.from_dict(dict(combo), method=method)
    return combos


def combo_label(method: str, combo: dict[str, Any]) -> str:
    """"prefix(n_virtual=4)": a method and its options, as a report row."""
    if not combo:
        return method
    parts = ",".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(combo.items()))
    return f"{method}({parts})"


def expand(spec: dict[str, Any], out_dir: str | Path, name: str = "sweep") -> dict[str, Any]:
    """The plan of a sweep spec (parsed TOML): its jobs and its report study; validated before anything runs.

    Returns:
        {"name", "jobs": [...], "study": the study entry for the report}.
    """
    from ctxtune.model import ModelConfig
    from ctxtune.tasks import get_task
    from ctxtune.train.run import check_device
    from ctxtune.train.spec import RunSpec, StreamSpec, check_fits

    check_keys(spec, TOP_KEYS, "the sweep spec")
    study = safe_name(spec.get("name", name), "the sweep name")
    runs = Path(out_dir).resolve() / "runs"
    model_table = table(spec, "model", "the sweep spec")
    pre = check_keys(table(spec, "pretrain", "the sweep spec"), {"task", "train"}, "[pretrain]")
    tune = check_keys(table(spec, "tune", "the sweep spec"), {"base", "train"}, "[tune]")
    grid = check_keys(table(spec, "grid", "the sweep spec"), {"seeds", "methods", "tasks", "options"}, "[grid]",
                      {"seeds", "methods", "tasks"})
    resources = check_keys(table(spec, "resources", "the sweep spec"), {"pretrain", "tune"}, "[resources]")
    seeds, methods, tasks = _list(grid, "seeds", int), _list(grid, "methods", str), _list(grid, "tasks", str)
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"grid.seeds must be distinct non-negative integers, got {seeds}")
    for key, values in (("methods", methods), ("tasks", tasks)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"grid.{key} lists {repeated[0]!r} twice: give each once")
    for t in tasks:
        get_task(t)
    options = grid.get("options", {})
    if not isinstance(options, dict) or sorted(set(options) - set(methods)):
        raise ConfigError(f"grid.options must be a table of tables named after grid.methods {methods}")
    _check_plan_size(seeds, methods, tasks, options, bool(pre))
    combos = {m: option_grid(m, options.get(m, {})) for m in methods}
    if bool(pre) == ("base" in tune):
        raise ConfigError("give exactly one of [pretrain] (with a task) or tune.base (an existing base)")
    if pre:
        if "task" not in pre:
            raise ConfigError("[pretrain] needs a task")
        get_task(pre["task"])
        model_cfg = ModelConfig.from_dict(model_table)
    else:
        if model_table:
            raise ConfigError("[model] describes the model to pretrain; with tune.base the base's own model is used")
        from ctxtune.train.runs import resolve_base

        base_ref = resolve_base(str(tune["base"]))
        model_cfg = base_ref.model_config
    for kind, res in resources.items():
        check_resources(res, f"resources.{kind}")
    check_device("cpu")

    from ctxtune.methods import get_method_class

    jobs, rows, adaptations = [], [], {}
    for seed in seeds:
        deps: list[str] = []
        if pre:
            train = _train(table(pre, "train", "[pretrain]"), seed, {**get_method_class("full").train_defaults,
                                                                        "train_mode": True}, "pretrain")
            run_spec = RunSpec("pretrain", "full", (StreamSpec(pre["task"], seed=seed, row="base"),), train,
                               model=model_cfg)
            job = _job("pretrain", run_spec, runs, [], resources, {"rows": {study: "base"}, "study": study})
            jobs.append(job)
            base, deps, identity = job["out_dir"], [job["id"]], "run:" + job["config_hash"]
        else:
            base, identity = base_ref.source, None
        for method, task, opts in ((m, t, o) for m in methods for t in tasks for o in combos[m]):
            label = combo_label(method, opts)
            train = _train(table(tune, "train", "[tune]"), seed, dict(get_method_class(method).train_defaults), "tune")
            stream = StreamSpec(task, seed=seed, row=f"{label}.{task}")
            run_spec = RunSpec("tune", method, (stream,), train, options=dict(opts), base=base)
            check_fits(run_spec, model_cfg)
            jobs.append(_job("tune", run_spec, runs, deps, resources, {"study": study, "adaptation": label}, identity))
            if stream.row not in rows:
                rows.append(stream.row)
            adaptations.setdefault(label, {"method": method, "options": opts, "tasks": [], "extension": False})
            if task not in adaptations[label]["tasks"]:
                adaptations[label]["tasks"].append(task)
    ids = [job["id"] for job in jobs]
    if len(set(ids)) != len(ids):
        twice = next(job for job in jobs if ids.count(job["id"]) > 1)
        raise ConfigError(f"the grid gives the run {twice.get('adaptation', 'base')} (seed {twice['seed']}) twice; "
                          "give each method, task and option value once")
    report_study = {
        "title": f"Sweep {study}", "paper_ref": "", "summary": "", "notes": {}, "group": "sweep", "analyses": {},
        "paper": {}, "rows": (["base"] if pre else []) + rows, "claims": [],
        "bases": {"base": {"task": pre["task"], "model": model_cfg.to_dict()}} if pre else {},
        "adaptations": adaptations,
    }
    return {"name": study, "jobs": jobs, "study": report_study}


def _check_plan_size(seeds: list[int], methods: list[str], tasks: list[str], options: dict[str, Any],
                     pretrain: bool) -> None:
    """Refuse a grid of more than MAX_PLAN_RUNS runs, counted before any combination is built."""
    from ctxtune.limits import MAX_PLAN_RUNS

    per_seed = 0
    for m in methods:
        lists = options.get(m, {})
        combos = 1
        for values in lists.values() if isinstance(lists, dict) else ():
            combos *= len(values) if isinstance(values, list) else 1
        per_seed += combos * len(tasks)
    total = len(seeds) * (per_seed + int(pretrain))
    if total > MAX_PLAN_RUNS:
        raise ConfigError(f"the sweep expands to {total:,} runs (seeds x methods x tasks x option values); at most "
                          f"{MAX_PLAN_RUNS:,} are planned: shorten grid lists")


RESOURCE_NUMBERS = ("num_cpus", "num_gpus", "memory")


def check_resources(res: Any, where: str) -> None:
    """A [resources] entry: Ray task options with finite non-negative amounts (num_cpus, num_gpus, memory in
    bytes, custom `resources`, `accelerator_type`)."""
    import math

    from ctxtune.experiments.executors import RESOURCE_KEYS

    check_keys(res, set(RESOURCE_KEYS), where)
    amounts = {k: res[k] for k in RESOURCE_NUMBERS if k in res}
    custom = res.get("resources", {})
    if not isinstance(custom, dict):
        raise ConfigError(f"{where}.resources must be a table of resource amounts, got {custom!r}")
    amounts |= {f"resources.{k}": v for k, v in custom.items()}
    for key, value in amounts.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        if not ok:
            raise ConfigError(f"{where}.{key} must be a finite number >= 0, got {value!r}")
    if "accelerator_type" in res and not isinstance(res["accelerator_type"], str):
        raise ConfigError(f"{where}.accelerator_type must be a string, got {res['accelerator_type']!r}")


def _job(kind: str, spec: Any, runs: Path, deps: list[str], resources: dict[str, Any],
         labels: dict[str, Any], base_identity: str | None = None) -> dict[str, Any]:
    h = spec.fingerprint(base_identity)
    return {"id": f"{kind}-{h[:8]}", "kind": "train", "spec": spec.to_dict(), "config_hash": h,
            "seed": spec.train.seed, "out_dir": str(runs / h[:8]), "depends_on": deps,
            "resources": dict(resources.get(kind, {})), **labels}


def load_spec(path: str | Path) -> tuple[dict[str, Any], str]:
    """Parse a sweep spec TOML file; returns (spec, default name = file stem)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"sweep spec {path} is a directory, expected a TOML file")
    if not path.is_file():
        raise ConfigError(not_found("sweep spec", path))
    return load_toml(path), path.stem


def store_recorder(store_path: Path, jobs: list[dict[str, Any]]) -> Any:
    """Index every job in the SQLite results store; returns the event handler that records starts and ends."""
    from ctxtune.experiments.jobs import is_finished
    from ctxtune.experiments.store import ResultsStore

    store = ResultsStore(store_path)
    for job in jobs:
        store.record_queued(job)
        if is_finished(job) and not store.is_done(job["config_hash"]):
            store.record_done(job, {"stored": True})

    def handle(event: Any) -> None:
        if event.kind == "start":
            store.record_start(event.job)
        elif event.kind == "done" and event.outcome is not None:
            store.record_done(event.job, event.outcome.result or {})
        elif event.kind == "failed" and event.outcome is not None:
            store.record_failure(event.job, event.outcome.error or "failed")

    return handle


def run_sweep(plan: dict[str, Any], out: Path, executor: Any, store: Path | None = None, quiet: bool = True,
              worker: str | None = None, on_event: Any = None) -> dict[str, Any]:
    """Run an expanded sweep into `out` (results.json, report, SQLite index); returns `run_plan`'s result."""
    from ctxtune.experiments.pipeline import WORKER, run_plan
    from ctxtune.report import environment

    document = {"kind": "sweep", "seeds": sorted({j["seed"] for j in plan["jobs"]}), "executor": executor.name,
                "studies": {plan["name"]: plan["study"]}, "jobs": plan["jobs"], "environment": environment()}
    recorder = store_recorder(store or out / "results.sqlite", plan["jobs"])

    def handle(event: Any) -> None:
        recorder(event)
        if on_event is not None:
            on_event(event)

    return run_plan(out, document, executor, on_event=handle, quiet=quiet, worker=worker or WORKER)
