"""Analyses: computed from finished run folders, scheduled like runs, written to DIR/.../analysis.json.

A study spec names them (`[analyses.NAME] kind = ..., adaptations = [...], options = {...}`); the plan adds
one analysis job per seed that depends on the runs it reads. Kinds:

    decomposition   per layer, how far each trained context method fits the prefix decomposition of paper.md
                    §4 (ctxtune.theory.suffix): attention and output errors, the fraction of the bias no fixed
                    values explain, input dependence of the virtual keys and values. Options: examples (64),
                    data_seed (123).
    diagnose        "will a prefix be enough?" (ctxtune.theory.heads) on a LoRA fit: per-head change, attention
                    TV, verdict. Options: examples (256), expected ("success" | "failure": the paper's outcome,
                    optional), compare (an adaptation whose accuracy says whether our prefix succeeded,
                    optional), success_accuracy (0.5).

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
        if compare is not None and compare not in {a.name for a in adaptations}:
            raise ConfigError(f"{where}: compare must be one of the analysis' adaptations, got {compare!r}")
        if options.get("expected") not in (None, "success", "failure"):
            raise ConfigError(f"{where}: expected must be 'success' or 'failure'")
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
def diagnose_run(lora_run: str | Path, seed: int = 0, examples: int = 256) -> dict[str, Any]:
    """The per-head diagnosis of a finished LoRA run (adapter of `seed`) against its frozen base."""
    import torch

    from ctxtune.tasks import get_task
    from ctxtune.theory.heads import CHANGE_MIN, TV_MIN, UNEXPLAINED_MIN, analyse, verdict
    from ctxtune.train.runs import load_run_method, load_run_model, read_run, read_summary

    k, stream = adapter_of_seed(lora_run, seed)
    record = read_run(lora_run)
    if method_identity(record.spec.method) != "none":
        raise ConfigError(f"{lora_run} is a {record.spec.method} run; the diagnosis needs a weight method fit (LoRA)")
    start = time.perf_counter()
    base = load_run_model(lora_run)
    method = load_run_method(lora_run, adapter=k)
    task = get_task(stream["task"])
    batch = task.make_batch(examples, torch.Generator().manual_seed(seed + 99), split="test")
    heads = analyse(base, method, batch.tokens[:, :-1], batch.n_prompt - 1)
    flagged, sentence = verdict(heads)
    summary = read_summary(lora_run) or {}
    row = summary["rows"][k] if len(summary.get("rows", [])) > k else {}
    return {
        "task": stream["task"], "rank": record.spec.options.get("rank"), "steps": record.spec.train.steps,
        "lora_accuracy": row.get("accuracy", {}).get(stream["task"]),
        "lora_loss": (summary.get("final_loss") or [None] * (k + 1))[k],
        "heads": [{**h.__dict__, "label": h.label} for h in heads], "flagged": flagged, "verdict": sentence,
        "prefix_ok": not flagged, "seconds_fit": summary.get("train_seconds"),
        "seconds_analysis": round(time.perf_counter() - start, 3),
        "thresholds": {"change_min": CHANGE_MIN, "tv_min": TV_MIN, "unexplained_min": UNEXPLAINED_MIN},
    }


def diagnose_analysis(options: dict[str, Any], inputs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    from ctxtune.train.runs import read_summary

    diag = diagnose_run(inputs[0]["out_dir"], seed, int(options["examples"]))
    predicted = "success" if diag["prefix_ok"] else "failure"
    out: dict[str, Any] = {"diagnosis": diag, "predicted": predicted, "expected": options.get("expected")}
    if options.get("expected"):
        out["agrees_with_paper"] = predicted == options["expected"]
    if options.get("compare"):
        inp = next(i for i in inputs if i["adaptation"] == options["compare"])
        k, stream = adapter_of_seed(inp["out_dir"], seed)
        acc = float((read_summary(inp["out_dir"]) or {})["rows"][k]["accuracy"][stream["task"]])
        ours = "success" if acc >= float(options["success_accuracy"]) else "failure"
        out.update(prefix_accuracy=acc, prefix_outcome=ours, agrees_with_our_prefix=ours == predicted)
    return out


KINDS: dict[str, AnalysisKind] = {
    "decomposition": AnalysisKind(
        {"examples": 64, "data_seed": 123}, ("holds", "partial"), decomposition_analysis
    ),
    "diagnose": AnalysisKind(
        {"examples": 256, "expected": None, "compare": None, "success_accuracy": 0.5}, ("none",), diagnose_analysis
    ),
}
