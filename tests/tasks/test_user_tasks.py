"""Tasks from a JSONL file (ctxtune.tasks.user): validation per line, stable split, layouts, names, saved form.

A toy encoder stands in for a tokenizer here (one id per character, BOS = 1 before prompts)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ctxtune.errors import ConfigError
from ctxtune.tasks import get_task
from ctxtune.tasks.user import (
    TextTask,
    load_task,
    read_task_file,
    register_run_tasks,
    save_task,
    text_split,
    text_task_from_file,
)


@pytest.fixture(autouse=True)
def forget_file_tasks() -> Iterator[None]:
    """Tasks made from files register globally: drop them after each test (the registry tests see built-ins)."""
    yield
    from ctxtune.tasks.base import _REGISTRY

    for name in [n for n in _REGISTRY if n.startswith("file_")]:
        del _REGISTRY[name]


def enc_prompt(text: str) -> list[int]:
    return [1] + [2 + (ord(c) % 60) for c in text]


def enc_completion(text: str) -> list[int]:
    return [2 + (ord(c) % 60) for c in text]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pairs(n: int) -> list[str]:
    return [json.dumps({"prompt": f"q{i} {'x' * (i % 3)}:", "completion": " " + "ab"[: 1 + i % 2]}) for i in range(n)]


def test_every_bad_line_is_named_with_its_problem(tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt": "a", "completion": "b"}),
        "{not json",
        json.dumps(["prompt", "completion"]),
        json.dumps({"prompt": "a2"}),
        json.dumps({"prompt": "a3", "completion": "b", "label": 1}),
        json.dumps({"prompt": 3, "completion": "b"}),
        json.dumps({"prompt": "", "completion": "b"}),
        json.dumps({"prompt": "a", "completion": "c"}),
    ]
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ConfigError) as err:
        read_task_file(path)
    msg = str(err.value)
    assert "7 bad lines" in msg and "line 2: not valid JSON" in msg and "line 3: expected a JSON object" in msg
    assert "line 4: missing 'completion'" in msg and "line 5: unknown key(s) 'label'" in msg
    assert "line 6: 'prompt' must be a string, got int" in msg and "and 2 more" in msg  # 5 shown, then the count


def test_single_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 8: the prompt of line 1 again with another completion"):
        read_task_file(write(tmp_path / "a.jsonl", [*pairs(7)[:1], *pairs(7)[1:], json.dumps(
            {"prompt": json.loads(pairs(1)[0])["prompt"], "completion": "zz"})]))
    (tmp_path / "b.jsonl").write_bytes(json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="line 2: not UTF-8 text"):
        read_task_file(tmp_path / "b.jsonl")
    with pytest.raises(ConfigError, match="has no examples"):
        read_task_file(write(tmp_path / "c.jsonl", ["", "   "]))
    with pytest.raises(ConfigError, match="task file not found"):
        read_task_file(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="line 1: the completion encodes to no token"):
        text_task_from_file(write(tmp_path / "d.jsonl", pairs(1)), enc_prompt, lambda _t: [])


def test_split_is_stable_and_about_a_quarter() -> None:
    prompts = [f"prompt number {i}" for i in range(4000)]
    test = sum(text_split(p) == "test" for p in prompts)
    assert 900 < test < 1100
    # sha256("hello") starts 2cf24dba5fb0a30e: 0x...0e mod 4 = 2 (train); pinned so the split never drifts
    assert text_split("hello") == "train" and text_split("hello world") == "test"
    assert text_split("prompt number 2") == "test" and text_split("prompt number 3") == "train"


def test_layouts_batches_and_names(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", ["", *pairs(60)])  # a blank line is skipped
    task = text_task_from_file(path, enc_prompt, enc_completion, tokenizer="toy")
    assert isinstance(task, TextTask) and task.name.startswith("file_") and get_task(task.name) is task
    assert text_task_from_file(path, enc_prompt, enc_completion) is task  # same content, same registered task
    assert text_task_from_file(path, enc_prompt, lambda t: enc_completion(t) + [3]).name != task.name
    assert len(task.layouts("train")) > 1 and task.d_vocab <= 62
    batch = task.make_batch(16, torch.Generator().manual_seed(0), "train", placeholders=2)
    assert batch.tokens.shape[0] == 16 and (batch.tokens[:, :2] == 0).all()
    assert batch.loss_mask[:, batch.n_prompt :].all() and not batch.loss_mask[:, : batch.n_prompt].any()
    prompts = batch.tokens[:, 2 : batch.n_prompt]
    assert torch.equal(task.outputs(prompts), batch.tokens[:, batch.n_prompt :])  # completions of these prompts
    n_test = len(task.by_split["test"])
    batches = task.make_batches(n_test, torch.Generator().manual_seed(0), "test")
    assert sum(b.tokens.shape[0] for b in batches) == n_test and len({b.tokens.shape[1] for b in batches}) > 1
    seen = sorted(tuple(r) for b in batches for r in b.tokens.tolist())
    assert seen == sorted(ex.prompt_ids + ex.completion_ids for ex in task.by_split["test"])  # each test example once


def test_empty_test_split_is_refused(tmp_path: Path) -> None:
    only_train = [json.dumps({"prompt": p, "completion": " a"}) for p in ("hello", "a", "b")]
    assert all(text_split(json.loads(line)["prompt"]) == "train" for line in only_train)
    with pytest.raises(ConfigError, match="the test split is empty"):
        text_task_from_file(write(tmp_path / "t.jsonl", only_train), enc_prompt, enc_completion)


def test_saved_form_round_trip_and_run_folder_registration(tmp_path: Path) -> None:
    task = text_task_from_file(write(tmp_path / "t.jsonl", pairs(40)), enc_prompt, enc_completion)
    saved = save_task(task, tmp_path / "run")
    again = load_task(saved)
    assert again.name == task.name and again.examples == task.examples
    data = json.loads(saved.read_text())
    data["examples"][0]["completion_ids"] = [5, 5]
    saved.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="do not match its name"):
        load_task(saved)
    run = tmp_path / "run2"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"spec": {"streams": [{"task": "file_0123456789abcdef"}]}}))
    with pytest.raises(ConfigError, match="saved copy file_0123456789abcdef.task.json is missing"):
        register_run_tasks(run)
    assert register_run_tasks(tmp_path / "not-a-run") == []
