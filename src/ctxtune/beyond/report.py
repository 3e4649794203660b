"""The report's "beyond the paper" section, rendered from the JSON results of `ctxtune.beyond`.

`beyond_section(results_dir)` reads (each optional; a missing file gives a one-line note):
    suffix_vs_prefix.json      `ctxtune.beyond.suffix.run_study` (schema in that module's docstring)
    diagnose_validation.json   `ctxtune.beyond.diagnose.validate`
    universal.json             `ctxtune.beyond.universal.approximation_study` (kernel prefixes)
    universal_fit.json         the same with mode "fit" (optional)
and returns Markdown that starts with a level-2 heading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def beyond_section(results_dir: str | Path) -> str:
    """Markdown for the report's "Beyond the paper" section from the JSON files in `results_dir`."""
    from ctxtune.beyond import diagnose, suffix, universal

    results_dir = Path(results_dir)
    parts = ["## Beyond the paper", ""]

    parts += ["### 1. Suffix vs prefix", ""]
    res = _load(results_dir / "suffix_vs_prefix.json")
    if res is None:
        parts.append("_No results: run `ctxtune suffix-study`._")
    else:
        parts += [
            "A suffix (virtual tokens after the input) keeps the relative content attention of every later query "
            "(any extra keys do), but from layer 2 on its keys and values depend on the input, so the bias it "
            "adds is no longer a mix of fixed vectors. `fixed-bias unexplained` is the fraction of the bias that "
            "no input-independent values explain (0 for any prefix or soft prompt); `key/value dep.` the relative "
            "spread of the virtual keys/values over inputs. Layers are 1-based. Learning at matched parameter "
            "budgets (quick scale, small models, 1-2 seeds, "
            "minutes on CPU):",
            "",
            suffix.summarize(res),
        ]
    parts += ["", "### 2. Will a prefix be enough? (`ctxtune diagnose`)", ""]
    res = _load(results_dir / "diagnose_validation.json")
    if res is None:
        parts.append("_No results: run `ctxtune.beyond.diagnose.validate`._")
    else:
        th = res["thresholds"]
        parts += [
            "A rank-4 LoRA (q, k, v, o) is fitted for a few hundred steps; each head's change is compared with "
            "the base on the same layer inputs. Verdict: a first-layer head whose relative content attention "
            f"moved by TV >= {th['tv_min']} (and whose output changed by >= {th['change_min']} of its energy) "
            "needs a new attention pattern, which no context method can produce. All diagnoses ran before any "
            "prefix was trained; the thresholds were calibrated on these same four cases, so the agreement is "
            f"not out-of-sample. A prefix 'succeeds' at >= {100 * th['success_accuracy']:.0f}% exact match.",
            "",
            diagnose.summarize(res),
        ]
    parts += ["", "### 3. Universal approximation by prefixing one fixed head", ""]
    res = _load(results_dir / "universal.json")
    if res is None:
        parts.append("_No results: run `ctxtune approx --out results/beyond/universal.json`._")
    else:
        parts += [
            "A hand-set single-head attention layer (never trained) on the circle; the prefix puts P keys on the "
            "circle with values f(key) and a sharpness that grows as P^2 (kernel smoother). Sup and L2 errors on "
            "4,096 points; slope = log-log slope over the last four P. Continuous targets converge; the step "
            "stalls at half its jump in sup norm (a continuous output cannot follow a jump) while its L2 error "
            "still falls; with the prefix norm (temperature) held fixed the error floors.",
            "",
            universal.summarize(res),
        ]
        fit = _load(results_dir / "universal_fit.json")
        if fit is not None:
            parts += ["", "Prefixes optimised by Adam from the kernel prefix:", "", universal.summarize(fit)]
        if (results_dir / "universal.png").is_file():
            parts += ["", "Plot: `universal.png` in the results folder."]
    return "\n".join(parts) + "\n"
