"""`precision = "bf16"`: bfloat16 autocast in training with float32 master weights, opt-in and checked."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from ctxtune.errors import ConfigError
from ctxtune.model import ModelConfig
from ctxtune.train import RunSpec, StreamSpec, TrainConfig, run

run_module = importlib.import_module("ctxtune.train.run")  # the module (the package exports the function)
MODEL = ModelConfig(n_layers=2, n_heads=2, d_model=32, n_ctx=24)


def pretrain(out: Path, precision: str) -> object:
    train = TrainConfig(steps=30, batch_size=16, lr=3e-3, eval_examples=64, precision=precision)
    return run(RunSpec("pretrain", "full", (StreamSpec("ascending"),), train, model=MODEL), out)


def test_precision_is_validated() -> None:
    with pytest.raises(ConfigError, match="train.precision must be one of fp32, bf16"):
        TrainConfig(precision="fp16")


def test_bf16_is_refused_without_native_bfloat16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_module, "bf16_supported", lambda device: False)
    with pytest.raises(ConfigError, match="needs native bfloat16"):
        pretrain(tmp_path / "r", "bf16")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not run_module.bf16_supported(torch.device("cpu")), reason="no native bfloat16 on this CPU")
def test_bf16_trains_with_float32_master_weights(tmp_path: Path) -> None:
    fp32, bf16 = pretrain(tmp_path / "fp32", "fp32"), pretrain(tmp_path / "bf16", "bf16")
    assert all(torch.isfinite(torch.tensor(r.final_loss)).all() for r in (fp32, bf16))
    assert bf16.final_loss != fp32.final_loss  # autocast really changed the computation
    assert abs(bf16.final_loss[0] - fp32.final_loss[0]) < 0.2 * fp32.final_loss[0]  # and stayed close
    from ctxtune.io import load_tensors

    weights = load_tensors(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # master weights stay float32
