"""The "Real model" section (issue 17) from a fixture results document: accuracies per method, task and seed beside
the base as it is, learning curves per task, the identity table and the attention plot, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ctxtune.report.sections import real_model_accuracy, trained_tasks


def cell(row: str, task: str, method: str, values: list[float]) -> dict[str, Any]:
    return {"cell": f"{row}/{task}", "row": row, "task": task, "method": method, "extension": True,
            "seeds": list(range(len(values))), "values": values, "mean": sum(values) / len(values), "std": 0.0,
            "n": len(values), "paper": None}


def adapter(name: str, method: str, identity: str, task: str) -> tuple[dict[str, Any], dict[str, Any]]:
    checks = {k: {"control": False, "n": 4, "n_ok": 4, "max_abs_err": 2e-16, "tol": 1e-12, "margin": 2e-4,
                  "layer": 0, "head": 1} for k in ("attention", "output", "span")}
    checks["control_alpha"] = {"control": True, "n": 4, "n_ok": 4, "max_abs_err": 0.01, "tol": 1e-12, "margin": 1e10,
                               "layer": 0, "head": 0}
    ident = {"adaptation": name, "task": task, "method": method, "identity": identity, "length": 2, "passed": True,
             "status": "all checks as expected", "checks": checks}
    if identity == "none":
        ident.update(status="the identity does not apply", checks={}, weight_control={
            "expected_to_move": {"control_weights_attention": True, "control_weights_output": True},
            "max_margin": {"control_weights_attention": 3e9, "control_weights_output": 5e9}})
    moved = 0.0 if identity == "holds" else 0.4
    change = {"adaptation": name, "task": task, "method": method, "identity": identity, "examples": 2,
              "max_tv": [[moved, 0.1], [0.8, 0.9]], "mean_tv": [[moved, 0.05], [0.5, 0.7]],
              "layer0": {"head": 0, "max_tv": moved}, "per_layer_max": [moved, 0.9],
              "top": {"layer": 1, "head": 1, "max_tv": 0.9, "mean_tv": 0.7, "query_positions": [2, 3], "n_prompt": 3,
                      "query_labels": ["->", "fox"], "key_labels": ["fox", "cat", "->", "fox"],
                      "base": [[0.5, 0.2, 0.3, 0.0], [0.1, 0.1, 0.4, 0.4]],
                      "adapted": [[0.0, 0.9, 0.1, 0.0], [0.7, 0.1, 0.1, 0.1]]}}
    return ident, change


def document() -> dict[str, Any]:
    cells = [cell("as_is.lm_copy", t, "none", [v, v]) for t, v in
             (("lm_copy", 0.0), ("lm_copy_shown", 0.85), ("lm_permute", 0.0), ("lm_permute_told", 0.01))]
    cells += [cell("prefix_copy.lm_copy", "lm_copy", "prefix", [1.0, 0.995]),
              cell("lora_copy.lm_copy", "lm_copy", "lora", [1.0, 1.0]),
              cell("prefix_permute.lm_permute", "lm_permute", "prefix", [0.02, 0.0]),
              cell("lora_permute.lm_permute", "lm_permute", "lora", [0.9, 0.95])]
    curves = [{"run": f"real_lm/{row.split('.')[0]}/s{s}", "labels": [f"{row} seed {s}"], "steps": [10, 20, 30],
               "loss": [[3.0], [1.0], [0.5]], "eval_steps": [10, 30], "eval_accuracy": [[0.1], [0.9]]}
              for row in ("prefix_copy.lm_copy", "lora_copy.lm_copy", "prefix_permute.lm_permute",
                          "lora_permute.lm_permute") for s in (0, 1)]
    curves.append({"run": "real_lm/as_is/s0", "labels": ["as_is.lm_copy seed 0"], "steps": [], "loss": [],
                   "eval_steps": [], "eval_accuracy": []})
    pairs = [adapter("prefix_permute", "prefix", "holds", "lm_permute"),
             adapter("lora_permute", "lora", "none", "lm_permute")]
    analyses = {
        "identity": {"kind": "identity", "adaptations": ["prefix_permute", "lora_permute"], "options": {},
                     "per_seed": [{"seed": 0, "status": "ok", "error": None,
                                   "result": {"dtype": "float64", "adapters": [p[0] for p in pairs], "passed": True}},
                                  {"seed": 1, "status": "failed", "error": "boom", "result": None}]},
        "attention_change": {"kind": "attention_change", "adaptations": ["prefix_permute", "lora_permute"],
                             "options": {"plot": ["prefix_permute", "lora_permute"]},
                             "per_seed": [{"seed": 0, "status": "ok", "error": None,
                                           "result": {"dtype": "float32", "adapters": [p[1] for p in pairs]}}]},
    }
    study = {"title": "Real", "paper_ref": "x", "summary": "s", "notes": {}, "group": "beyond",
             "config": {"bases": {"smollm2": {"source": "smollm2"}}, "adaptations": {}}, "cells": cells,
             "claims": [], "runs": [], "curves": curves, "analyses": analyses, "seconds": 1.0}
    return {"schema": "ctxtune.results/2", "kind": "reproduce", "scale": "standard", "seeds": [0, 1],
            "created": "now", "environment": {"commit": "abc"}, "jobs": {"total": 1, "ok": 1, "failed": 0,
                                                                           "skipped": 0, "missing": 0},
            "executor": "local", "wall_seconds": 1.0, "compute_seconds": 1.0, "runs": [], "studies": {"real_lm": study}}


def test_accuracy_table_puts_the_base_beside_each_method() -> None:
    st = document()["studies"]["real_lm"]
    assert trained_tasks(st) == ["lm_copy", "lm_permute"]
    lines = real_model_accuracy(st)
    copy = [line for line in lines if line.startswith("| lm_copy |")]
    assert len(copy) == 4 and "as it is (`as_is.lm_copy`) on `lm_copy_shown`" in copy[1]
    assert "| 85.0% | 85.0% |" in copy[1]
    assert "| `prefix_copy.lm_copy` | prefix | 100.0% | 99.5% | **99.8%** |" in copy[2]
    assert sum(line.startswith("| lm_permute |") for line in lines) == 4


def test_section_plots_and_tables_without_torch(tmp_path: Path) -> None:
    """The whole report (Markdown, plots, HTML) in a fresh interpreter that must not import torch."""
    (tmp_path / "results.json").write_text(json.dumps(document()))
    code = ("import json, sys; from ctxtune.report.render import write_report; "
            f"write_report(json.load(open({str(tmp_path / 'results.json')!r})), {str(tmp_path)!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"real_lm-real-curves-lm_copy.png", "real_lm-real-curves-lm_permute.png",
            "real_lm-attention-attention_change.png"} <= plots
    md = (tmp_path / "report.md").read_text()
    assert "### Real model" in md
    assert "![Learning curves on lm_permute](plots/real_lm-real-curves-lm_permute.png)" in md
    assert "(plots/real_lm-attention-attention_change.png)" in md
    assert "| 0 | lora_permute | lora | the identity does not apply | - | - | - | - | 3.0e+09 / 5.0e+09 |" in md
    assert "| 0 | prefix_permute | prefix | all checks as expected | 2.0e-16 / 1.0e-12 |" in md
    assert "| 1 | - | - | failed: boom |" in md
    assert "| 0 | lora_permute | lora | 0.4 (1) | 0.900 (2) | 2.2 (0.700) |" in md
    assert "| 0 | prefix_permute | prefix | 0 (1) |" in md
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
