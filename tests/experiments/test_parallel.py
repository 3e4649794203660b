"""Parallel by default: worker processes give the numbers of a serial run; threads follow the run's size."""

from __future__ import annotations

import json
from pathlib import Path

from ctxtune.experiments.plan import SMALL_STEP_FLOPS, threads_for
from ctxtune.experiments.reproduce import reproduce
from ctxtune.model import ModelConfig


def cells(folder: Path) -> dict[str, list[float]]:
    doc = json.loads((folder / "results.json").read_text())
    return {c["cell"]: c["values"] for st in doc["studies"].values() for c in st["cells"] if c["values"]}


def losses(folder: Path) -> dict[str, list[float]]:
    return {str(p.parent.relative_to(folder)): json.loads(p.read_text())["final_loss"]
            for p in sorted(folder.rglob("summary.json"))}


def test_parallel_workers_give_the_serial_numbers(tmp_path: Path) -> None:
    args = dict(scale="quick", seeds=2, only=["cannot_learn_new_attention"], train_override={"steps": 3},
                eval_examples=32, quiet=True)
    serial = reproduce(out=tmp_path / "serial", executor="local", **args)
    parallel = reproduce(out=tmp_path / "parallel", executor="process", workers=2, **args)
    assert serial["jobs"]["ok"] == parallel["jobs"]["ok"] == serial["jobs"]["total"] > 2
    assert cells(tmp_path / "serial") == cells(tmp_path / "parallel") != {}
    assert losses(tmp_path / "serial") == losses(tmp_path / "parallel")
    plan = json.loads((tmp_path / "parallel" / "plan.json").read_text())
    assert plan["workers"] == 2 and all(j["spec"]["threads"] == 1 for j in plan["jobs"] if j["kind"] == "train")


def test_threads_follow_the_size_of_a_run() -> None:
    small = ModelConfig(n_layers=4, n_heads=4, d_model=256, n_ctx=32)  # the paper's studies: 1 thread
    assert threads_for(small, 64, 20, 1, cores=16) == 1
    big = ModelConfig(n_layers=30, n_heads=9, d_model=576, n_ctx=64, d_vocab=49152)  # SmolLM2-sized
    assert threads_for(big, 16, 40, 1, cores=16) == 4 and threads_for(big, 16, 40, 1, cores=2) == 2
    assert 6 * (4 * 12 * 256 * 256) * 64 * 20 < SMALL_STEP_FLOPS
