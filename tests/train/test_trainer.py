"""The trainer: banks equal separate runs, bit-identical resume after SIGKILL, NaN stops, schedules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctxtune.errors import TrainingDiverged
from ctxtune.io import load_tensors, read_safetensors_header
from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig
from ctxtune.tasks import get_task
from ctxtune.train.config import TrainConfig
from ctxtune.train.trainer import Stream, Trainer

CFG = ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=24, act="relu")


def base_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).double().eval()


@pytest.mark.parametrize(
    ("key", "opts"),
    [
        ("prefix", {"n_virtual": 2}),
        ("lora", {"rank": 1}),
        ("soft_prompt", {"n_virtual": 2}),
        ("suffix", {"n_virtual": 1}),
        ("prefix_kv", {"n_virtual": 1, "reparam_dim": 4}),
    ],
)
def test_bank_of_k_equals_k_separate_runs(key: str, opts: dict) -> None:
    tasks = ["ascending", "descending", "add1"]
    streams = [Stream(get_task(t), data_seed=10 + k, init_seed=20 + k) for k, t in enumerate(tasks)]
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, grad_clip=0.5, eval_examples=16, warmup=2, schedule="cosine")
    model = base_model()
    bank = make_method(key, model, n_adapters=3, **opts).double()
    Trainer(bank, streams, cfg, quiet=True).run()
    bank_state = bank.adapter_state()
    bank.detach()
    for k, stream in enumerate(streams):
        single = make_method(key, model, **opts).double()
        Trainer(single, [stream], cfg, quiet=True).run()
        for name, tensor in single.adapter_state().items():
            assert torch.allclose(bank_state[name][k], tensor[0], atol=1e-10, rtol=0), (name, k)
        single.detach()
    assert not torch.allclose(bank_state[name][0], bank_state[name][1])


def test_same_seed_same_numbers_on_cpu() -> None:
    cfg = TrainConfig(steps=5, batch_size=8, lr=1e-2, eval_examples=16)
    results = []
    for _ in range(2):
        model = base_model()
        method = make_method("prefix", model, n_virtual=1).double()
        Trainer(method, [Stream(get_task("add1"), 1, 2)], cfg, quiet=True).run()
        results.append(method.adapter_state()["hidden"])
    assert torch.equal(results[0], results[1])


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = base_model()
    method = make_method("prefix", model, n_virtual=1).double()
    cfg = TrainConfig(steps=10, batch_size=4, lr=1e-2, checkpoint_every=2, eval_examples=8)
    trainer = Trainer(method, [Stream(get_task("add1"), 1, 2)], cfg, out_dir=tmp_path, quiet=True)

    def poison(tr: Trainer, step: int, losses: list[float]) -> None:
        if step == 5:
            with torch.no_grad():
                method.hidden.fill_(float("nan"))

    trainer.callbacks.append(poison)
    with pytest.raises(TrainingDiverged, match=r"at step 5; the last good checkpoint \(step 4\)"):
        trainer.run()
    saved = load_tensors(tmp_path / "checkpoint.safetensors")
    assert saved.metadata["step"] == "4"
    assert torch.isfinite(saved["adapter/hidden"]).all()


def test_cosine_schedule_and_warmup() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0) and cfg.lr_at(100) == pytest.approx(0.1)
    assert cfg.lr_at(55) == pytest.approx(0.55)


def _pretrain_cmd(out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ctxtune.cli",
        "pretrain",
        "--task",
        "ascending",
        "--layers",
        "1",
        "--heads",
        "1",
        "--d-model",
        "16",
        "--n-ctx",
        "24",
        "--steps",
        "150",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--eval-examples",
        "32",
        "--checkpoint-every",
        "10",
        "--dropout",
        "0.1",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def checkpoint_step(run: Path) -> int:
    """The step recorded in a run folder's checkpoint (-1 when there is none yet)."""
    path = run / "checkpoint.safetensors"
    if not path.is_file():
        return -1
    return int(read_safetensors_header(path)["__metadata__"]["step"])


def test_resume_after_sigkill_is_bit_identical(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_pretrain_cmd(whole, []), check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.Popen(_pretrain_cmd(killed, []), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if checkpoint_step(killed) >= 30:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run was killed before finishing"
    step_at_kill = checkpoint_step(killed)
    assert 30 <= step_at_kill < 150
    subprocess.run(_pretrain_cmd(killed, ["--resume"]), check=True, env=env, capture_output=True, timeout=300)
    assert (whole / "model.safetensors").read_bytes() == (killed / "model.safetensors").read_bytes()
    assert (whole / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text()
