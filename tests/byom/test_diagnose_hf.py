"""`ctxtune diagnose` on Hugging Face models with a JSONL task: tiny random Llama and GPT-2 folders saved with
save_pretrained. The LoRA fit goes through the run boundary; the run folder keeps the task (re-readable)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byom_models import constant_task  # noqa: E402

from ctxtune.tasks.base import _REGISTRY  # noqa: E402

pytestmark = pytest.mark.hf


def diagnose(cli: Callable, *args: str) -> dict:
    res = cli(["diagnose", *args, "--json"])
    assert res.code == 0, res.stderr
    assert res.stdout.count("\n") == 1
    return json.loads(res.stdout)


def test_llama_fit_learns_and_gives_a_verdict(cli: Callable, llama_dir: Path, tmp_path: Path) -> None:
    task = constant_task(tmp_path / "ok.jsonl")
    out = tmp_path / "fit"
    d = diagnose(cli, "--base", str(llama_dir), "--task-file", str(task), "--steps", "60", "--lr", "1e-2",
                 "--out", str(out))
    assert d["targets"] == ["q", "k", "v", "o"] and len(d["heads"]) == 2 * 4 and d["task"].startswith("file_")
    assert d["lora_accuracy"] >= 0.5 and d["predicted"] in ("success", "failure") and d["reason"] == ""
    assert d["prefix_ok"] == (d["predicted"] == "success")
    flagged = [h["label"] for h in d["heads"] if h["needs_new_attention"]]
    assert d["flagged"] == flagged and all(label.startswith("1.") for label in flagged)
    # the run folder keeps the tokenised task: a new process (here: the task forgotten) reads the run again
    assert (out / f"{d['task']}.task.json").is_file()
    _REGISTRY.pop(d["task"])
    res = cli(["eval", "--run", str(out), "--task", d["task"], "--json"])
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["accuracy"][d["task"]] == pytest.approx(d["lora_accuracy"])


def test_a_fit_that_did_not_learn_is_inconclusive(cli: Callable, llama_dir: Path, tmp_path: Path) -> None:
    task = constant_task(tmp_path / "ok.jsonl")
    d = diagnose(cli, "--base", str(llama_dir), "--task-file", str(task), "--steps", "1")
    assert d["lora_accuracy"] < 0.5 and d["predicted"] == "inconclusive" and d["prefix_ok"] is None
    assert d["verdict"].startswith("inconclusive: the reference LoRA fit did not learn the task")


def test_gpt2_has_no_query_key_site_and_says_so(cli: Callable, gpt2_dir: Path, tmp_path: Path) -> None:
    task = constant_task(tmp_path / "ok.jsonl")
    d = diagnose(cli, "--base", str(gpt2_dir), "--task-file", str(task), "--steps", "20")
    assert d["targets"] == ["o", "mlp_in", "mlp_out"] and d["predicted"] == "inconclusive"
    assert "no query or key map" in d["reason"]
    assert all(h["attention_tv"] < 1e-6 for h in d["heads"])  # o and the MLP cannot move a pattern at all


def test_a_given_peft_lora_is_diagnosed_without_a_fit(cli: Callable, llama_dir: Path, peft_adapters: dict,
                                                      tmp_path: Path) -> None:
    task = constant_task(tmp_path / "ok.jsonl")
    d = diagnose(cli, "--adapter", str(peft_adapters["lora"]), "--base", str(llama_dir), "--task-file", str(task))
    assert d["steps"] is None and d["rank"] == 4 and d["seconds_fit"] == 0.0 and len(d["heads"]) == 8
    assert d["lora_accuracy"] is not None and d["predicted"] == "inconclusive"  # 3 random steps: not this task
    assert any(h["attention_tv"] > 1e-3 for h in d["heads"])  # the PEFT LoRA's q/k change is seen


@pytest.mark.parametrize("args,message", [
    (["--adapter", "PREFIX", "--task", "add1"], "is a prefix_kv adapter: the diagnosis reads a weight fit"),
    (["--base", "LLAMA", "--task-file", "BAD"], "line 2: 'completion' is empty"),
    (["--base", "LLAMA", "--task-file", "BAD", "--task", "add1"], "exactly one of --task"),
    (["--task", "add1"], "--base is required"),
    (["--base", "LLAMA", "--task-file", "NOPE"], "task file not found"),
])
def test_bad_input(cli: Callable, llama_dir: Path, peft_adapters: dict, tmp_path: Path, args: list,
                   message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a:", "completion": "b"}\n{"prompt": "c:", "completion": ""}\n')
    names = {"PREFIX": str(peft_adapters["prefix"]), "LLAMA": str(llama_dir), "BAD": str(bad),
             "NOPE": str(tmp_path / "nope.jsonl")}
    res = cli(["diagnose", *[names.get(a, a) for a in args]])
    assert res.code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_task_file_on_a_ctxtune_base_is_refused(cli: Callable, tmp_path: Path, pretrain_run: Callable) -> None:
    from ctxtune.model import ModelConfig

    pretrain_run(tmp_path / "base", ModelConfig(n_layers=1, n_heads=1, d_model=8, n_ctx=24))
    res = cli(["diagnose", "--base", str(tmp_path / "base"), "--task-file", str(constant_task(tmp_path / "t.jsonl"))])
    assert res.code == 2 and "--task-file needs a Hugging Face base model" in res.stderr
