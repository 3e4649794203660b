"""`ctxtune diagnose` and `ctxtune approx`: one JSON object with --json; bad input is one stderr line, exit 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ctxtune.model import ModelConfig


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, pretrain_run: Callable) -> Path:
    out = tmp_path_factory.mktemp("diag") / "base"
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=24)
    pretrain_run(out, cfg)
    return out


def test_diagnose_json_and_plot(cli: Callable, base_run: Path, tmp_path: Path) -> None:
    png = tmp_path / "heads.png"
    res = cli(
        [
            "diagnose",
            "--base",
            str(base_run),
            "--task",
            "descending",
            "--steps",
            "3",
            "--examples",
            "8",
            "--eval-examples",
            "16",
            "--json",
            "--plot",
            str(png),
        ]
    )
    assert res.code == 0, res.stderr
    payload = json.loads(res.stdout)  # exactly one object
    assert res.stdout.count("\n") == 1
    assert len(payload["heads"]) == 4 and {"unexplained", "attention_tv", "label"} <= set(payload["heads"][0])
    # 3 LoRA steps do not learn the task: the diagnosis must say so instead of giving a verdict
    assert payload["predicted"] == "inconclusive" and payload["prefix_ok"] is None
    assert payload["verdict"].startswith("inconclusive: the reference LoRA fit did not learn the task")
    assert png.stat().st_size > 1000


def test_diagnose_table(cli: Callable, base_run: Path) -> None:
    res = cli(
        [
            "diagnose",
            "--base",
            str(base_run),
            "--task",
            "add1",
            "--steps",
            "2",
            "--examples",
            "4",
            "--eval-examples",
            "16",
        ]
    )
    assert res.code == 0, res.stderr
    assert "verdict:" in res.stdout and "2.2" in res.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--base", "/nonexistent/run", "--task", "descending"],
        ["--task", "no_such_task"],
        ["--task", "descending", "--steps", "0"],
        ["--task", "descending", "--plot", "heads.txt"],
        ["--task", "descending", "--rank", "99"],
    ],
)
def test_diagnose_bad_input(cli: Callable, base_run: Path, args: list[str]) -> None:
    full = ["diagnose", *(["--base", str(base_run)] if "--base" not in args else []), *args]
    res = cli(full)
    assert res.code == 2, (res.stdout, res.stderr)
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error:")


def test_approx_json_and_bad_input(cli: Callable, tmp_path: Path) -> None:
    res = cli(["approx", "--p", "2,8", "--targets", "abs", "--json", "--out", str(tmp_path / "ua.json")])
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["P"] == [2, 8] and (tmp_path / "ua.json").is_file()
    for bad in (["--p", "0"], ["--targets", "nope"], ["--mode", "magic"], ["--c", "-1"]):
        res = cli(["approx", *bad])
        assert res.code == 2 and len(res.stderr.strip().splitlines()) == 1
