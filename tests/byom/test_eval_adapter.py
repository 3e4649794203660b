"""`ctxtune eval --adapter` with a JSONL task: the accuracy of a PEFT adapter on a task whose answers are known
from PEFT's own greedy decoding (so prompt tokens, positions, adapters and exact match all have to be right)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byom_models import labelled_task  # noqa: E402

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_accuracy_matches_peft_greedy_decoding(cli: Callable, llama_dir: Path, peft_adapters: dict, tmp_path: Path,
                                               kind: str) -> None:
    task, expected, n_test = labelled_task(tmp_path / "t.jsonl", llama_dir, peft_adapters[kind])
    assert 0 < expected < 1  # some right, some wrong: the number is informative
    res = cli(["eval", "--adapter", str(peft_adapters[kind]), "--base", str(llama_dir), "--task-file", str(task),
               "--json"])
    assert res.code == 0, res.stderr
    payload = json.loads(res.stdout)
    ((name, acc),) = payload["accuracy"].items()
    assert name.startswith("file_") and acc == pytest.approx(expected)
    assert payload["examples"][name] == n_test  # every test example once


def test_eval_input_errors(cli: Callable, llama_dir: Path, peft_adapters: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a:", "completion": "b"}\n{"prompt": "c:"}\n')
    cases = [
        (["--adapter", str(peft_adapters["lora"]), "--base", str(llama_dir), "--task-file", str(bad)],
         "line 2: missing 'completion'"),
        (["--adapter", str(peft_adapters["lora"]), "--base", str(llama_dir)], "no task given"),
        (["--adapter", "1", "--task", "add1"], "--index 1"),
        (["--task", "add1"], "exactly one of --run"),
    ]
    for args, message in cases:
        res = cli(["eval", *args])
        assert res.code == 2 and message in res.stderr, (args, res.stderr)
