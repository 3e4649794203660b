"""Analyses: computed from finished run folders, scheduled like runs, written to DIR/.../analysis.json.

A study spec names them (`[analyses.NAME] kind = ..., adaptations = [...], options = {...}`); the plan adds
one analysis job per seed that depends on the runs it reads. Kinds:

    decomposition   per layer, how far each trained context method fits the prefix decomposition of paper.md
                    §4 (ctxtune.theory.suffix): attention and output errors, the fraction of the bias no fixed
                    values explain, input dependence of the virtual keys and values. Options: examples (64),
                    data_seed (123).
    diagnose        "will a prefix be enough?" (ctxtune.theory.heads) on a LoRA fit: per-head change, attention
                    TV, verdict ("success", "failure" or "inconclusive"). Options: examples (256), expected
                    ("success" | "failure": the paper's outcome, optional), compare (an adaptation, or a list of
                    them, whose best accuracy says whether our prefix succeeded, optional), success_accuracy
                    (0.5), held_out (false: a calibration case the thresholds were set on; true: a case added
                    after, with the thresholds fixed).

An analysis job: {"id", "kind": "analysis", "analysis": {"kind", "name", "study", "seed", "options"},
"inputs": [{"adaptation", "out_dir"}], "out_dir", "depends_on"}. Its result (and analysis.json) is
{"kind", "name", "study", "seed", "status": "ok", "result": {...}, "seconds"}.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxtune.configs import check_keys
from ctxtune.errors import ConfigError
from ctxtune.io import atomic_write_json

SCHEMA = "ctxtune.analysis/1"


@dataclass(frozen=True)
class AnalysisKind:
    options: dict[str, Any]  # option -> default
    identities: tuple[str, ...]  # the method facts (Method.identity) of the runs it can read
    fn: Callable[[dict[str, Any], list[dict[str, Any]], int], dict[str, Any]]


def check_analysis(kind: str, adaptations: list[Any], options: dict[str, Any], where: str) -> None:
    """Validate an analysis entry of a study spec against its kind."""
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown analysis kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    spec = KINDS[kind]
    check_keys(options, set(spec.options), f"{where}.options")
    from ctxtune.methods import get_method_class

    if kind == "diagnose":
        if get_method_class(adaptations[0].method).identity != "none":
            raise ConfigError(f"{where}: the first adaptation of a diagnose analysis must be a weight method fit")
        compare = options.get("compare")
        names = [compare] if isinstance(compare, str) else compare
        if compare is not None and (not isinstance(names, list) or not names
                                    or not set(names) <= {a.name for a in adaptations}):
            raise ConfigError(f"{where}: compare must name one or a list of the analysis' adaptations, got {compare!r}")
        if options.get("expected") not in (None, "success", "failure"):
            raise ConfigError(f"{where}: expected must be 'success' or 'failure'")
        if not isinstance(options.get("held_out", False), bool):
            raise ConfigError(f"{where}: held_out must be true or false")
    bad = [a.name for a in adaptations if get_method_class(a.method).identity not in spec.identities]
    if bad and kind != "diagnose":
        raise ConfigError(f"{where}: {kind} reads context methods only (virtual tokens or prefixes); not {bad}")


def run_analysis(job: dict[str, Any]) -> dict[str, Any]:
    """Worker for analysis jobs: compute, write analysis.json into job["out_dir"], return the record."""
    from ctxtune.io import load_json

    start = time.perf_counter()
    info = job["analysis"]
    kind = KINDS[info["kind"]]
    options = {**kind.options, **info.get("options", {})}
    what = {"kind": info["kind"], "name": info["name"], "study": info.get("study"), "seed": info["seed"],
            "options": options, "inputs": job["inputs"]}
    out = Path(job["out_dir"])
    if (out / "analysis.json").is_file():
        stored = load_json(out / "analysis.json")
        same = isinstance(stored, dict) and all(stored.get(k) == v for k, v in what.items())
        if same and stored.get("status") == "ok":
            return {**stored, "cached": True}
    result = kind.fn(options, job["inputs"], int(info["seed"]))
    record = {"schema": SCHEMA, **what, "status": "ok", "result": result,
              "seconds": round(time.perf_counter() - start, 3)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "analysis.json", record)
    return record


def method_identity(key: str) -> str:
    from ctxtune.methods import get_method_class

    return get_method_class(key).identity


def adapter_of_seed(run_dir: str | Path, seed: int) -> tuple[int, dict[str, Any]]:
    """(adapter index, stream) of the first adapter of `seed` in a run folder."""
    from ctxtune.train.runs import read_run

    record = read_run(run_dir)
    for k, stream in enumerate(record.spec.streams):
        if stream.seed == seed:
            return k, stream.to_dict()
    raise ConfigError(f"{run_dir} has no adapter of seed {seed}")


# ----- decomposition ----------------------------------------------------------------------------------------
def decomposition_analysis(options: dict[str, Any], inputs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    import torch

    from ctxtune.tasks import get_task
    from ctxtune.theory.suffix import decomposition
    from ctxtune.train.runs import load_run_method

    rows = []
    for inp in inputs:
        k, stream = adapter_of_seed(inp["out_dir"], seed)
        method = load_run_method(inp["out_dir"], adapter=k)
        method.double()
        method.model.double().eval()
        batch = get_task(stream["task"]).make_batch(
            int(options["examples"]), torch.Generator().manual_seed(int(options["data_seed"])), split="test"
        )
        for row in decomposition(method, batch.tokens, batch.n_prompt):
            rows.append({"adaptation": inp["adaptation"], "task": stream["task"], **row.to_dict()})
    return {"layers": rows}


# ----- diagnose ---------------------------------------------------------------------------------------------
def analysis_batches(task: Any, examples: int, seed: int) -> list[tuple[Any, int]]:
    """(model inputs, first analysed row) per layout of `examples` test examples of `task`."""
    import torch

    batches = task.make_batches(examples, torch.Generator().manual_seed(seed + 99), split="test")
    return [(b.tokens[:, :-1], b.n_prompt - 1) for b in batches]


def lora_targets(method: Any) -> list[str]:
    """The roles a weight method adapts (LoRA's `targets`; every map for a method without targets)."""
    return list(getattr(method.config, "targets", ("q", "k", "v", "o")))


def diagnose_method(base: Any, method: Any, task: Any, seed: int, examples: int, fit: dict[str, Any]) -> dict[str, Any]:
    """The per-head diagnosis of a fitted weight method (attached to its own copy of the model) against `base`.

    Args:
        base: the unadapted model; method: the fit on another copy; task: the task object.
        fit: what is known about the fit: "rank", "steps", "lora_accuracy" (exact match on the task, or None),
            "lora_loss", "seconds_fit".
    """
    from ctxtune.theory.heads import CHANGE_MIN, FIT_MIN_ACCURACY, TV_MIN, UNEXPLAINED_MIN, analyse_batches, conclude

    start = time.perf_counter()
    heads = analyse_batches(base, method, analysis_batches(task, examples, seed))
    targets = lora_targets(method)
    outcome = conclude(heads, fit.get("lora_accuracy"), bool({"q", "k"} & set(targets)))
    return {
        "task": task.name, "rank": fit.get("rank"), "steps": fit.get("steps"), "targets": targets,
        "lora_accuracy": fit.get("lora_accuracy"), "lora_loss": fit.get("lora_loss"),
        "heads": [{**h.__dict__, "label": h.label} for h in heads], "flagged": outcome.flagged,
        "verdict": outcome.verdict, "predicted": outcome.predicted, "reason": outcome.reason,
        "prefix_ok": None if outcome.predicted == "inconclusive" else outcome.predicted == "success",
        "seconds_fit": fit.get("seconds_fit"), "seconds_analysis": round(time.perf_counter() - start, 3),
        "thresholds": {"change_min": CHANGE_MIN, "tv_min": TV_MIN, "unexplained_min": UNEXPLAINED_MIN,
                       "fit_min_accuracy": FIT_MIN_ACCURACY},
    }


def diagnose_run(lora_run: str | Path, seed: int = 0, examples: int = 256) -> dict[str, Any]:
    """The per-head diagnosis of a finished LoRA run (adapter of `seed`) against its frozen base."""
    from ctxtune.tasks import get_task
    from ctxtune.train.runs import load_run_method, load_run_model, read_run, read_summary

    k, stream = adapter_of_seed(lora_run, seed)
    record = read_run(lora_run)
    if method_identity(record.spec.method) != "none":
        raise ConfigError(f"{lora_run} is a {record.spec.method} run; the diagnosis needs a weight method fit (LoRA)")
    summary = read_summary(lora_run) or {}
    row = summary["rows"][k] if len(summary.get("rows", [])) > k else {}
    fit = {"rank": record.spec.options.get("rank"), "steps": record.spec.train.steps,
           "lora_accuracy": row.get("accuracy", {}).get(stream["task"]),
           "lora_loss": (summary.get("final_loss") or [None] * (k + 1))[k], "seconds_fit": summary.get("train_seconds")}
    base = load_run_model(lora_run)
    method = load_run_method(lora_run, adapter=k)
    return diagnose_method(base, method, get_task(stream["task"]), seed, examples, fit)


def _compared(options: dict[str, Any]) -> list[str]:
    compare = options.get("compare")
    return [] if compare is None else [compare] if isinstance(compare, str) else list(compare)


def diagnose_analysis(options: dict[str, Any], inputs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The diagnosis of the LoRA fit (first input), compared with the paper's outcome (`expected`) and with our
    trained prefixes (`compare`: one adaptation or several; a prefix succeeds when ANY of them reaches
    `success_accuracy`, since the diagnosis answers "could a prefix do it")."""
    from ctxtune.train.runs import read_summary

    diag = diagnose_run(inputs[0]["out_dir"], seed, int(options["examples"]))
    predicted = diag["predicted"]
    decided = predicted != "inconclusive"
    out: dict[str, Any] = {"diagnosis": diag, "predicted": predicted, "expected": options.get("expected"),
                           "held_out": bool(options.get("held_out"))}
    if options.get("expected"):
        out["agrees_with_paper"] = predicted == options["expected"] if decided else None
    names = _compared(options)
    if names:
        accuracies = {}
        for name in names:
            inp = next(i for i in inputs if i["adaptation"] == name)
            k, stream = adapter_of_seed(inp["out_dir"], seed)
            accuracies[name] = float((read_summary(inp["out_dir"]) or {})["rows"][k]["accuracy"][stream["task"]])
        best = max(accuracies.values())
        ours = "success" if best >= float(options["success_accuracy"]) else "failure"
        out.update(prefix_accuracy=best, prefix_accuracies=accuracies, prefix_outcome=ours,
                   agrees_with_our_prefix=ours == predicted if decided else None)
    return out


KINDS: dict[str, AnalysisKind] = {
    "decomposition": AnalysisKind(
        {"examples": 64, "data_seed": 123}, ("holds", "partial"), decomposition_analysis
    ),
    "diagnose": AnalysisKind(
        {"examples": 256, "expected": None, "compare": None, "success_accuracy": 0.5, "held_out": False}, ("none",),
        diagnose_analysis,
    ),
}
