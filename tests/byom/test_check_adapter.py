"""`ctxtune check attention --adapter`: trained PEFT and ctxtune adapters. Context adapters pass the Section 4
checks on their trained state; weight adapters (LoRA) are "the identity does not apply" with the weight
control, never a pass of the identity."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byom_models import peft, train_peft  # noqa: E402

from ctxtune.model import ModelConfig  # noqa: E402
from ctxtune.train import RunSpec, StreamSpec, TrainConfig, run  # noqa: E402

pytestmark = pytest.mark.hf


def check(cli: Callable, *args: str) -> tuple[int, dict, str]:
    res = cli(["check", "attention", *args, "--json"])
    return res.code, json.loads(res.stdout) if res.stdout else {}, res.stderr


@pytest.mark.parametrize("kind,method,length", [("prefix", "prefix_kv", 3), ("prompt", "soft_prompt", 4)])
def test_peft_context_adapters_pass_on_their_trained_state(cli: Callable, llama_dir: Path, peft_adapters: dict,
                                                          kind: str, method: str, length: int) -> None:
    code, report, err = check(cli, "--model", str(llama_dir), "--adapter", str(peft_adapters[kind]))
    assert code == 0, err
    assert report["method"] == method and report["length"] == length and report["identity"] == "holds"
    assert report["status"] == "all checks as expected" and report["adapter"] == str(peft_adapters[kind])
    identity = [c for c in report["checks"] if not c["control"]]
    assert identity and all(c["max_abs_err"] <= 1e-12 for c in identity)
    assert all(c["passed"] != c["control"] for c in report["checks"])


def test_peft_lora_is_not_applicable_and_moves_attention(cli: Callable, llama_dir: Path, peft_adapters: dict) -> None:
    code, report, err = check(cli, "--model", str(llama_dir), "--adapter", str(peft_adapters["lora"]))
    assert code == 0, err
    assert report["identity"] == "none" and report["status"] == "the identity does not apply"
    margins = report["weight_control"]["max_margin"]
    # a prefix passes the attention check within 1x the tolerance; the trained LoRA fails it by orders of magnitude
    assert margins["control_weights_attention"] > 1e6 and margins["control_weights_output"] > 1e6
    assert all(c["control"] and not c["passed"] for c in report["checks"] if c["expected_to_fail"])
    table = cli(["check", "attention", "--model", str(llama_dir), "--adapter", str(peft_adapters["lora"])])
    assert table.code == 0 and "identity does not apply" in table.stdout
    assert "all checks as expected" not in table.stdout


def test_an_untrained_lora_fails_the_weight_control(cli: Callable, llama_dir: Path, tmp_path: Path) -> None:
    folder = train_peft(llama_dir, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]), tmp_path / "z", steps=0)
    code, report, _ = check(cli, "--model", str(llama_dir), "--adapter", str(folder))
    assert code == 1 and report["status"] == "the identity does not apply; weight control unexpected"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, pretrain_run: Callable) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    pretrain_run(root / "base", ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=24, d_vocab=10, pos="rotary"))
    out = {}
    for method, options in (("lora", {"rank": 2, "targets": ["q", "v"]}), ("prefix", {"n_virtual": 2})):
        spec = RunSpec("tune", method, (StreamSpec("descending"),), TrainConfig(steps=4, lr=5e-2, batch_size=8,
                       eval_examples=8), options=options, base=str(root / "base"))
        run(spec, root / method)
        out[method] = root / method
    return out


def test_ctxtune_lora_run_as_model_is_never_a_silent_pass(cli: Callable, runs: dict) -> None:
    code, report, err = check(cli, "--model", str(runs["lora"]))
    assert code == 0, err
    assert report["method"] == "lora" and report["status"] == "the identity does not apply"
    assert report["weight_control"]["expected_to_move"] == {"control_weights_attention": True,
                                                            "control_weights_output": True}


def test_ctxtune_prefix_run_checks_its_trained_prefix(cli: Callable, runs: dict) -> None:
    code, report, err = check(cli, "--adapter", str(runs["prefix"]))
    assert code == 0, err
    assert report["method"] == "prefix" and report["length"] == 2 and report["status"] == "all checks as expected"
    assert "prefix run (adapter 0" in report["adapter_description"]


@pytest.mark.parametrize("args,message", [
    (["--adapter", "/nonexistent/adapter"], "not found"),
    ([], "give --model"),
    (["--adapter", "RUN", "--method", "prefix"], "--method describes a random adapter"),
    (["--adapter", "RUN", "--index", "3"], "--index 3 out of range"),
])
def test_bad_adapter_input(cli: Callable, runs: dict, args: list, message: str) -> None:
    res = cli(["check", "attention", *[str(runs["prefix"]) if a == "RUN" else a for a in args]])
    assert res.code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_peft_adapter_without_a_local_base(cli: Callable, peft_adapters: dict, tmp_path: Path) -> None:
    folder = tmp_path / "moved"
    folder.mkdir()
    cfg = json.loads((peft_adapters["prefix"] / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/some-model"}))
    weights = peft_adapters["prefix"] / "adapter_model.safetensors"
    (folder / "adapter_model.safetensors").write_bytes(weights.read_bytes())
    res = cli(["check", "attention", "--adapter", str(folder)])
    assert res.code == 2 and "needs its base model: pass it with --model" in res.stderr
