"""`ctxtune check attention`: run folders, HF folders, JSON shape, exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from ctxtune.commands.check import register
from ctxtune.model import ModelConfig


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """ctxtune (test app)."""

    register(app)
    return app


def _run(args: list[str]) -> tuple[int, str, str]:
    res = CliRunner().invoke(_app(), args)
    return res.exit_code, res.stdout, res.stderr if res.stderr_bytes is not None else ""


@pytest.fixture
def run_dir(tmp_path: Path, pretrain_run: Callable) -> Path:
    cfg = ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=16, d_vocab=10, pos="rotary")
    pretrain_run(tmp_path, cfg, steps=1)
    return tmp_path


@pytest.mark.parametrize("method", ["prefix", "prefix_kv", "soft_prompt"])
def test_json_on_run_folder(run_dir: Path, method: str) -> None:
    code, out, _ = _run(
        ["check", "attention", "--model", str(run_dir), "--method", method, "--length", "3", "--json"]
    )
    assert code == 0, out
    report = json.loads(out)
    assert {"model", "method", "length", "dtype", "checks", "cross_layer", "passed"} <= set(report)
    assert report["passed"] and report["method"] == method and report["length"] == 3
    for c in report["checks"]:
        assert {"layer", "head", "kind", "max_abs_err", "tol", "passed"} <= set(c)
        assert c["passed"] != c["control"]
        if not c["control"]:
            assert c["max_abs_err"] <= 1e-12
    assert {c["layer"] for c in report["cross_layer"]} == {0, 1}


def test_table_and_float32(run_dir: Path) -> None:
    code, out, _ = _run(["check", "attention", "--model", str(run_dir), "--dtype", "float32"])
    assert code == 0 and "worst" in out and "all checks as expected" in out


@pytest.mark.hf
def test_hf_folder(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    code, out, _ = _run(
        [
            "check",
            "attention",
            "--model",
            str(tmp_path / "m"),
            "--method",
            "prefix_kv",
            "--length",
            "2",
            "--json",
        ]
    )
    assert code == 0
    assert json.loads(out)["passed"]


@pytest.mark.parametrize(
    "args",
    [["--model", "/nonexistent/model"], ["--method", "lora"], ["--length", "0"], ["--dtype", "float16"]],
)
def test_bad_input_exit_2(run_dir: Path, args: list[str]) -> None:
    full = ["check", "attention", "--model", str(run_dir), *args]
    code, _, _ = _run(full)
    assert code == 2


def test_failed_check_exit_1(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctxtune.theory.identity as check  # the checks `check attention` shares with the identity analysis

    real = check.check_layers

    def broken(layers: list) -> list:
        from dataclasses import replace

        return [replace(r, passed=False) if not r.control else r for r in real(layers)]

    monkeypatch.setattr(check, "check_layers", broken)
    code, out, _ = _run(["check", "attention", "--model", str(run_dir), "--json"])
    assert code == 1 and json.loads(out)["passed"] is False


def test_help_has_example() -> None:
    code, out, _ = _run(["check", "attention", "--help"])
    assert code == 0 and "ctxtune check attention --model" in out
