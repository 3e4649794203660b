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
    identity        the Section 4 identity checks of `ctxtune check attention --adapter` (ctxtune.theory.identity)
                    on each trained adapter: context methods must pass (worst error and tolerance per kind of
                    check); a weight method gets "the identity does not apply" and the weight-control margins.
                    Options: dtype ("float64"), inputs (2), tokens (12): random content tokens.
    attention_change
                    per layer and head, the total-variation distance between the adapted run's renormalised
                    content attention and the base model's own (rows that predict output tokens, test
                    examples of the task), and the most-changed head's two patterns on one example. A context
                    method leaves layer 1 unchanged (paper.md §4; deeper layers move through their inputs), a
                    LoRA on q or k moves it directly. Options: examples (8), data_seed (123), dtype ("float32"),
                    plot (the adaptations whose most-changed head the report draws; all when absent).

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


COUNT_BOUNDS = {"examples": 100_000, "inputs": 1_000, "tokens": 4_096}
"""Upper bounds of an analysis' counts: every example is held in memory with its captured attention."""


def check_counts(options: dict[str, Any], where: str) -> None:
    """Counts are integers from 1 to their bound; data_seed an integer in 0..MAX_SEED; success_accuracy in [0, 1]."""
    from ctxtune.limits import MAX_SEED

    for key, bound in COUNT_BOUNDS.items():
        value = options.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise ConfigError(f"{where}.options.{key} must be an integer from 1 to {bound:,}, got {value!r}")
    seed = options.get("data_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{where}.options.data_seed must be an integer from 0 to {MAX_SEED:,}, got {seed!r}")
    acc = options.get("success_accuracy", 0.5)
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
        raise ConfigError(f"{where}.options.success_accuracy must be a number in [0, 1], got {acc!r}")


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
    check_counts(options, where)
    plot = options.get("plot")
    if plot is not None and (not isinstance(plot, list) or not set(plot) <= {a.name for a in adaptations}):
        raise ConfigError(f"{where}: plot must list some of the analysis' adaptations, got {plot!r}")
    if options.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {options['dtype']!r}")
    bad = [a.name for a in adaptations if get_method_class(a.method).identity not in spec.identities]
    if bad and kind != "diagnose":
        what = ("context methods (virtual tokens or prefixes)" if "none" not in spec.identities else
                "context methods with the full identity and weight methods (not a suffix)")
        raise ConfigError(f"{where}: {kind} reads {what} only; not {bad}")


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


# ----- identity ---------------------------------------------------------------------------------------------
DTYPES = ("float32", "float64")


class _Bases:
    """Unadapted base models of run folders, loaded once per base source and dtype (never adapted)."""

    def __init__(self, dtype: str) -> None:
        self.dtype, self.models = dtype, {}

    def get(self, run_dir: str | Path) -> Any:
        import torch

        from ctxtune.train.runs import load_run_model, read_run

        source = read_run(run_dir).base().source
        if source not in self.models:
            self.models[source] = load_run_model(run_dir).to(getattr(torch, self.dtype)).eval()
        return self.models[source]


def _trained(run_dir: str | Path, seed: int, dtype: str) -> tuple[Any, dict[str, Any]]:
    """(the run's adapter of `seed` on its own copy of the base, in `dtype` and eval mode; its stream)."""
    import torch

    from ctxtune.train.runs import load_run_method

    k, stream = adapter_of_seed(run_dir, seed)
    method = load_run_method(run_dir, adapter=k).to(getattr(torch, dtype))
    method.model.to(getattr(torch, dtype)).eval()
    return method, stream


def identity_analysis(options: dict[str, Any], inputs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The Section 4 identity checks of `ctxtune check attention --adapter` on each trained adapter (of `seed`):
    a context method must pass them (worst error against its tolerance per kind of check); a weight method gets
    "the identity does not apply" and the weight control (how far its trained attention moved, as a margin over
    the tolerance a prefix passes at). Random content tokens (`inputs` x `tokens`), seeded by the run seed."""
    import torch

    from ctxtune.theory.identity import context_report, summarise, weight_report

    n_inputs, n_tokens = int(options["inputs"]), int(options["tokens"])
    bases = _Bases(options["dtype"])
    rows = []
    for inp in inputs:
        start = time.perf_counter()
        method, stream = _trained(inp["out_dir"], seed, options["dtype"])
        with torch.no_grad():
            if method.identity == "none":
                report = weight_report(method, bases.get(inp["out_dir"]), seed, n_inputs, n_tokens)
            else:
                report = context_report(method, seed, n_inputs, n_tokens)
        rows.append({"adaptation": inp["adaptation"], "task": stream["task"], **summarise(report),
                     "seconds": round(time.perf_counter() - start, 3)})
        del method
    return {"dtype": options["dtype"], "inputs": n_inputs, "tokens": n_tokens, "adapters": rows,
            "passed": all(r["passed"] for r in rows)}


# ----- attention_change -------------------------------------------------------------------------------------
def _rounded(values: Any, digits: int = 4) -> Any:
    return [_rounded(v, digits) for v in values] if isinstance(values, list) else round(float(values), digits)


def attention_change(base: Any, method: Any, task: Any, examples: int, data_seed: int) -> dict[str, Any]:
    """Per layer and head, how far `method` moved the attention over the content against `base` (the unadapted
    model) on `examples` test examples of `task`: the total-variation distance of the renormalised content
    attention rows that predict output tokens (max and mean over examples and rows). Also the head that moved
    most (largest mean) with its base and adapted pattern on the first example (rows: the query positions that
    predict the output; columns: every content key up to the last query; `n_prompt`: the first output token's
    column, the keys before it are the prompt's)."""
    import torch

    from ctxtune.theory.cross_layer import content_attention, total_variation

    per_layer: list[list[torch.Tensor]] = []
    example = None
    for tokens, first_row in analysis_batches(task, examples, data_seed):
        adapted, own = content_attention(base, method, tokens)
        tvs = [total_variation(a, b, first_row).transpose(0, 1).reshape(a.shape[1], -1) for a, b in
               zip(adapted, own, strict=True)]  # per layer [n_heads, batch * rows]
        per_layer.append(tvs)
        if example is None:
            example = (tokens[0].tolist(), first_row, [a[0] for a in adapted], [b[0] for b in own])
    tv = [torch.cat([batch[layer] for batch in per_layer], dim=1) for layer in range(len(per_layer[0]))]
    max_tv = [t.amax(1).tolist() for t in tv]
    mean_tv = [t.mean(1).tolist() for t in tv]
    layer, head = max(((lay, h) for lay in range(len(tv)) for h in range(len(mean_tv[lay]))),
                      key=lambda lh: mean_tv[lh[0]][lh[1]])
    toks, first_row, adapted_ex, own_ex = example
    pattern = {
        "layer": layer, "head": head, "max_tv": round(max_tv[layer][head], 4),
        "mean_tv": round(mean_tv[layer][head], 4),
        "query_positions": list(range(first_row, len(toks))), "n_prompt": first_row + 1,
        "query_labels": task.token_labels(toks[first_row:]), "key_labels": task.token_labels(toks),
        "base": _rounded(own_ex[layer][head, first_row:].tolist()),
        "adapted": _rounded(adapted_ex[layer][head, first_row:].tolist()),
    }
    first = max(range(len(mean_tv[0])), key=lambda h: max_tv[0][h])
    return {"examples": examples, "max_tv": _rounded(max_tv), "mean_tv": _rounded(mean_tv),
            "layer0": {"head": first, "max_tv": round(max_tv[0][first], 4)},
            "per_layer_max": _rounded([max(m) for m in max_tv]), "top": pattern}


def attention_change_analysis(options: dict[str, Any], inputs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """`attention_change` of each trained adapter (of `seed`) against its unadapted base (module docstring)."""
    import torch

    from ctxtune.tasks import get_task

    bases = _Bases(options["dtype"])
    rows = []
    for inp in inputs:
        start = time.perf_counter()
        method, stream = _trained(inp["out_dir"], seed, options["dtype"])
        with torch.no_grad():
            change = attention_change(bases.get(inp["out_dir"]), method, get_task(stream["task"]),
                                      int(options["examples"]), int(options["data_seed"]))
        rows.append({"adaptation": inp["adaptation"], "task": stream["task"], "method": method.key,
                     "identity": method.identity, **change, "seconds": round(time.perf_counter() - start, 3)})
        del method
    return {"dtype": options["dtype"], "adapters": rows}


KINDS: dict[str, AnalysisKind] = {
    "decomposition": AnalysisKind(
        {"examples": 64, "data_seed": 123}, ("holds", "partial"), decomposition_analysis
    ),
    "diagnose": AnalysisKind(
        {"examples": 256, "expected": None, "compare": None, "success_accuracy": 0.5, "held_out": False}, ("none",),
        diagnose_analysis,
    ),
    "identity": AnalysisKind(
        {"dtype": "float64", "inputs": 2, "tokens": 12}, ("holds", "none"), identity_analysis
    ),
    "attention_change": AnalysisKind(
        {"examples": 8, "data_seed": 123, "dtype": "float32", "plot": None}, ("holds", "none"),
        attention_change_analysis,
    ),
}
