"""The report builds from run folders alone (a fixture results folder created here, no training)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ctxtune.errors import ConfigError
from ctxtune.report import build_report


def make_fixture(root: Path, lora_acc: float = 0.91) -> None:
    """A results folder as `ctxtune reproduce` leaves it: plan.json and two run folders."""
    base_dir, lora_dir = root / "runs" / "bases" / "mix-s0", root / "runs" / "toy" / "lora-s0-1"
    jobs = [
        {"id": "base/mix/s0", "kind": "pretrain", "out_dir": str(base_dir), "seed": 0, "studies": ["toy"],
         "depends_on": []},
        {"id": "toy/lora/s0-1", "kind": "adapt", "study": "toy", "method": "lora", "out_dir": str(lora_dir),
         "seeds": [0, 1], "depends_on": ["base/mix/s0"],
         "streams": [{"task": "double_hist", "seed": s, "k": 0, "row": "lora.double_hist",
                      "eval_tasks": ["double_hist"]} for s in (0, 1)]},
        {"id": "toy/prefix/s0", "kind": "adapt", "study": "toy", "method": "prefix", "seeds": [0],
         "out_dir": str(root / "runs" / "toy" / "prefix-s0"), "depends_on": ["base/mix/s0"],
         "streams": [{"task": "double_hist", "seed": 0, "k": 0, "row": "prefix.double_hist",
                      "eval_tasks": ["double_hist"]}]},
    ]
    study = {
        "title": "Toy", "paper_ref": "test", "summary": "a toy study", "notes": {"quick": "tiny"},
        "paper": {"lora.double_hist/double_hist": 0.9238, "prefix.double_hist/double_hist": 0.0031},
        "rows": ["mix", "lora.double_hist", "prefix.double_hist"],
        "bases": {"mix": {"task": "mix", "job_key": "mix", "per_seed": False, "eval_tasks": ["double_hist"],
                          "model": {"n_layers": 1}, "train": {"steps": 2}}},
        "adaptations": {"lora": {"method": "lora", "extension": False, "options": {"rank": 1}, "train": {"steps": 2}},
                        "prefix": {"method": "prefix", "extension": False, "options": {}, "train": {"steps": 2}}},
        "claims": [{"id": "c", "text": "LoRA >= 80% and prefix <= 5%", "checks": [
            {"cell": "lora.double_hist/double_hist", "op": ">=", "value": 0.8},
            {"cell": "prefix.double_hist/double_hist", "op": "<=", "value": 0.05}]}],
    }
    plan = {"scale": "quick", "seeds": [0, 1], "step_factor": 1.0, "executor": "local", "jobs": jobs,
            "studies": {"toy": study}, "environment": {"commit": "abc", "platform": "test", "cpu_count": 2,
                                                      "torch": "x", "device": "cpu"}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps(plan))
    base_dir.mkdir(parents=True)
    (base_dir / "summary.json").write_text(json.dumps({"result": {
        "id": "base/mix/s0", "status": "ok", "seconds": 1.0, "steps": 2,
        "rows": [{"row": None, "seed": 0, "task": "mix", "acc": {"double_hist": 0.0}}]}}))
    lora_dir.mkdir(parents=True)
    (lora_dir / "summary.json").write_text(json.dumps({"result": {
        "id": "toy/lora/s0-1", "status": "ok", "seconds": 2.0, "steps": 2, "trainable_per_adapter": 12288,
        "rows": [{"row": "lora.double_hist", "seed": s, "task": "double_hist", "acc": {"double_hist": a}}
                 for s, a in ((0, lora_acc), (1, lora_acc - 0.02))]}}))
    (lora_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": [1.0 / s, 1.1 / s]}) + "\n"
                                                    for s in (1, 2)))
    # The prefix run failed: it has an error.json and no summary.
    (root / "runs" / "toy" / "prefix-s0").mkdir(parents=True)
    (root / "runs" / "toy" / "prefix-s0" / "error.json").write_text(json.dumps({"status": "failed", "error": "boom"}))


def test_report_from_fixture(tmp_path: Path) -> None:
    make_fixture(tmp_path)
    doc = build_report(tmp_path)["doc"]
    st = doc["studies"]["toy"]
    cells = {c["cell"]: c for c in st["cells"]}
    lora = cells["lora.double_hist/double_hist"]
    assert lora["n"] == 2 and lora["mean"] == pytest.approx(0.90) and lora["std"] == pytest.approx(0.0141421, 1e-4)
    assert lora["paper"] == 0.9238
    assert cells["mix/double_hist"]["values"] == [0.0]
    assert cells["prefix.double_hist/double_hist"]["n"] == 0  # failed run: paper value only
    claim = st["claims"][0]
    assert claim["holds"] is None  # one check could not be measured
    assert claim["checks"][0]["holds"] is True and claim["checks"][0]["seeds_holding"] == 2
    assert doc["jobs"] == {"total": 3, "ok": 2, "failed": 1, "skipped": 0, "missing": 0}
    assert any(r["status"] == "failed" and r["error"] == "boom" for r in st["runs"])
    md = (tmp_path / "report.md").read_text()
    assert "90.00% ± 1.41 (n=2)" in md and "92.38%" in md and "not measured" in md and "abc" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    png = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(png)[:4] == b"\x89PNG"
    assert "http://" not in page and "https://" not in page  # self-contained
    assert json.loads((tmp_path / "results.json").read_text())["schema"] == "ctxtune.results/1"


def test_claim_that_fails_is_said_plainly(tmp_path: Path) -> None:
    make_fixture(tmp_path, lora_acc=0.30)
    (tmp_path / "runs" / "toy" / "prefix-s0" / "summary.json").write_text(json.dumps({"result": {
        "id": "toy/prefix/s0", "status": "ok", "seconds": 1.0,
        "rows": [{"row": "prefix.double_hist", "seed": 0, "task": "double_hist", "acc": {"double_hist": 0.0}}]}}))
    doc = build_report(tmp_path)["doc"]
    assert doc["studies"]["toy"]["claims"][0]["holds"] is False
    assert "does NOT hold" in (tmp_path / "report.md").read_text()


def test_report_needs_a_plan(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plan.json"):
        build_report(tmp_path)
