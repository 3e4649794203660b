"""Run folders read back from anywhere: relative bases, moved folders, adapters as bases refused, reruns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ctxtune.errors import ConfigError
from ctxtune.model import ModelConfig
from ctxtune.train import RunSpec, StreamSpec, TrainConfig, run
from ctxtune.train.runs import load_run_method, read_run, resolve_base

MODEL = ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=32)
FAST = TrainConfig(steps=3, batch_size=8, eval_examples=16)


def tune_spec(base: str, method: str = "prefix", tasks: tuple[str, ...] = ("descending",)) -> RunSpec:
    streams = tuple(StreamSpec(t, index=k) for k, t in enumerate(tasks))
    return RunSpec("tune", method, streams, FAST, options={"n_virtual": 1} if method == "prefix" else {}, base=base)


@pytest.fixture
def workspace(tmp_path: Path, pretrain_run: Callable, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A base and a tune run made from inside `tmp_path/work` with relative paths."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    pretrain_run(Path("base"), MODEL)
    run(tune_spec("base"), Path("tuned"))
    return work


def test_base_is_recorded_absolute_and_relative(workspace: Path) -> None:
    config = json.loads((workspace / "tuned" / "config.json").read_text())
    assert config["base"] == {"path": str((workspace / "base").resolve()), "relative": "../base"}


def test_eval_of_an_absolute_run_path_from_another_directory(workspace: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, "-m", "ctxtune.cli", "eval", "--run", str(workspace / "tuned"), "--task",
                          "descending", "--examples", "8", "--json"], cwd=elsewhere, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)["accuracy"]) == {"descending"}


def test_a_results_folder_moved_as_a_whole_still_finds_its_bases(workspace: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.move(str(workspace), moved)
    method = load_run_method(moved / "tuned")  # the recorded absolute base is gone; the relative one is used
    assert method.key == "prefix" and read_run(moved / "tuned").base().source == str((moved / "base").resolve())


def test_an_adapter_run_is_not_a_base(workspace: Path) -> None:
    with pytest.raises(ConfigError, match="tuned is a prefix run: it saved an adapter, not a model"):
        resolve_base("tuned")
    with pytest.raises(ConfigError, match="saved an adapter"):
        run(tune_spec("tuned"), Path("tuned-on-tuned"))
    assert not Path("tuned-on-tuned").exists()


def test_a_full_fine_tune_is_a_base(workspace: Path) -> None:
    run(tune_spec("base", method="full"), Path("finetuned"))
    assert resolve_base("finetuned").kind == "run"
    run(tune_spec("finetuned"), Path("prefix-on-finetuned"))


def test_running_a_finished_run_again_changes_nothing(workspace: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (workspace / "tuned").iterdir()}
    again = run(tune_spec("base"), Path("tuned"))
    assert again.cached
    assert {p.name: p.stat().st_mtime_ns for p in (workspace / "tuned").iterdir()} == before


def test_a_folder_holding_another_run_is_refused(workspace: Path) -> None:
    with pytest.raises(ConfigError, match="holds a run with another configuration"):
        run(tune_spec("base", tasks=("add1",)), Path("tuned"))


def test_same_task_twice_on_the_command_line_is_refused(workspace: Path, cli: Callable) -> None:
    res = cli(["tune", "--base", "base", "--method", "prefix", "--task", "descending", "--task", "descending",
               "--out", "twice", "--steps", "2", "--quiet"])
    assert res.code == 2 and "given twice" in res.stderr and not Path("twice").exists()
