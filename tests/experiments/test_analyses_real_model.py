"""The identity and attention_change analyses (issue 17) on tiny trained runs of our GPT: context methods pass the
Section 4 checks and leave layer 1's content attention where it was; LoRA on q gets "the identity does not apply",
moves its weights' attention beyond a prefix's tolerance, and changes layer 1 directly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctxtune.errors import ConfigError
from ctxtune.experiments.analyses import check_analysis, run_analysis
from ctxtune.model import ModelConfig
from ctxtune.train import RunSpec, StreamSpec, TrainConfig, run

MODEL = ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=32)
FAST = TrainConfig(steps=3, batch_size=8, eval_examples=8, lr=5e-2)
ADAPTERS = {"prefix": {"n_virtual": 2}, "soft_prompt": {"n_virtual": 2}, "lora": {"rank": 1, "targets": ["q"]}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, pretrain_run: Callable) -> dict[str, str]:
    root = tmp_path_factory.mktemp("real_model")
    pretrain_run(root / "base", MODEL)
    out = {}
    for method, options in ADAPTERS.items():
        spec = RunSpec("tune", method, (StreamSpec("descending", seed=0),), FAST, options=options,
                       base=str(root / "base"))
        run(spec, root / method)
        out[method] = str(root / method)
    return out


def job(kind: str, runs: dict[str, str], out: Path, **options: Any) -> dict[str, Any]:
    return {"id": f"t/analysis.{kind}/s0", "kind": "analysis", "out_dir": str(out), "depends_on": [],
            "analysis": {"kind": kind, "name": kind, "study": "t", "seed": 0, "options": options},
            "inputs": [{"adaptation": f"{m}_desc", "out_dir": d} for m, d in runs.items()]}


def test_identity_holds_for_context_methods_and_not_for_lora(runs: dict[str, str], tmp_path: Path) -> None:
    record = run_analysis(job("identity", runs, tmp_path / "identity"))
    assert (tmp_path / "identity" / "analysis.json").is_file() and record["status"] == "ok"
    res = record["result"]
    assert res["dtype"] == "float64" and res["passed"]
    rows = {r["adaptation"]: r for r in res["adapters"]}
    for name in ("prefix_desc", "soft_prompt_desc"):
        row = rows[name]
        assert row["status"] == "all checks as expected" and row["identity"] == "holds"
        for kind in ("attention", "output", "span"):
            check = row["checks"][kind]
            assert check["n_ok"] == check["n"] == 2 * 2 and check["max_abs_err"] <= check["tol"]
        assert row["checks"]["control_weights_attention"]["margin"] > 1  # the perturbed copy must fail
    lora = rows["lora_desc"]
    assert lora["status"] == "the identity does not apply" and lora["identity"] == "none"
    margin = lora["weight_control"]["max_margin"]
    assert margin["control_weights_attention"] > 1 and margin["control_weights_output"] > 1
    assert run_analysis(job("identity", runs, tmp_path / "identity")).get("cached")


def test_attention_change_layer_one_moves_for_lora_only(runs: dict[str, str], tmp_path: Path) -> None:
    res = run_analysis(job("attention_change", runs, tmp_path / "change", examples=4, dtype="float64"))["result"]
    rows = {r["adaptation"]: r for r in res["adapters"]}
    for name in ("prefix_desc", "soft_prompt_desc"):
        assert rows[name]["layer0"]["max_tv"] < 1e-9, rows[name]["layer0"]  # paper.md §4: the same pattern
        assert rows[name]["identity"] == "holds"
    lora = rows["lora_desc"]
    assert lora["layer0"]["max_tv"] > 1e-4 and lora["per_layer_max"][0] == lora["layer0"]["max_tv"]
    for row in rows.values():
        assert len(row["max_tv"]) == MODEL.n_layers and len(row["mean_tv"][0]) == MODEL.n_heads
        top = row["top"]
        assert top["mean_tv"] == max(max(m) for m in row["mean_tv"])
        n_rows, n_keys = len(top["query_positions"]), len(top["key_labels"])
        assert len(top["base"]) == len(top["adapted"]) == len(top["query_labels"]) == n_rows
        assert all(len(r) == n_keys for r in top["base"] + top["adapted"])
        assert all(abs(sum(r) - 1) < 1e-3 for r in top["base"] + top["adapted"])  # rows over the content sum to 1


def test_spec_validation_of_the_new_kinds() -> None:
    from types import SimpleNamespace

    ad = [SimpleNamespace(name="a", method="prefix"), SimpleNamespace(name="b", method="lora")]
    check_analysis("identity", ad, {"dtype": "float32"}, "x")
    check_analysis("attention_change", ad, {"examples": 4}, "x")
    with pytest.raises(ConfigError, match="dtype"):
        check_analysis("identity", ad, {"dtype": "float16"}, "x")
    with pytest.raises(ConfigError, match="not a suffix"):
        check_analysis("attention_change", [SimpleNamespace(name="s", method="suffix")], {}, "x")
    with pytest.raises(ConfigError, match="options"):
        check_analysis("identity", ad, {"examples": 4}, "x")
