"""Shared fixtures: tiny configurations, seeded models, and a CLI runner that runs the real entry point."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import pytest
import torch

from ctxtune.model import GPT, ModelConfig

torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=32, d_vocab=10)


@pytest.fixture
def tiny_model(tiny_cfg: ModelConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_cfg).double().eval()


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def _run_cli(args: list[str]) -> CliResult:
    from ctxtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["ctxtune", *args]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli() -> Callable[[list[str]], CliResult]:
    """Run `ctxtune ARGS` in-process through the console entry point; returns code, stdout, stderr."""
    return _run_cli


def _pretrain_run(out, model_cfg: ModelConfig, task: str = "ascending", **train):  # noqa: ANN001, ANN201
    """Pretrain a tiny model into the run folder `out` through the one run boundary; returns the RunResult."""
    from ctxtune.train import RunSpec, StreamSpec, TrainConfig, run

    cfg = TrainConfig(**{"steps": 3, "batch_size": 8, "eval_examples": 16, **train})
    return run(RunSpec("pretrain", "full", (StreamSpec(task, seed=cfg.seed),), cfg, model=model_cfg), out)


@pytest.fixture(scope="session")
def pretrain_run() -> Callable:
    """`pretrain_run(out, model_cfg, task="ascending", **train)`: a tiny pretraining run folder (3 steps)."""
    return _pretrain_run
