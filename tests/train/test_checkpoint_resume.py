"""Resume semantics: finished runs untouched, invalid checkpoints refused before any write, memory refused
before anything is allocated, a true divergence message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctxtune.errors import CheckpointError, ConfigError, RunAlreadyFinished, TrainingDiverged
from ctxtune.io import load_tensors, save_tensors
from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig
from ctxtune.tasks import get_task
from ctxtune.train.config import TrainConfig
from ctxtune.train.trainer import Stream, Trainer

CFG = ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=24, act="relu")
TRAIN = TrainConfig(steps=6, batch_size=4, lr=1e-2, checkpoint_every=2, eval_examples=8)


def trainer(out: Path | None, cfg: TrainConfig = TRAIN, **opts: object) -> Trainer:
    torch.manual_seed(0)
    method = make_method("prefix", GPT(CFG).eval(), n_virtual=1, **opts)
    return Trainer(method, [Stream(get_task("add1"), 1, 2)], cfg, out_dir=out, quiet=True)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_resuming_a_finished_run_changes_nothing_and_returns_its_result(tmp_path: Path) -> None:
    first = trainer(tmp_path).run()
    before = snapshot(tmp_path)
    again = trainer(tmp_path)
    with pytest.raises(RunAlreadyFinished, match=r"already finished \(6 of 6 steps\); nothing was changed") as info:
        again.run(resume=True)
    assert snapshot(tmp_path) == before
    result = info.value.result
    assert (result.steps, result.final_loss, result.accuracy) == (6, first.final_loss, first.accuracy)
    assert result.final_loss and all(isinstance(v, float) for v in result.final_loss)
    saved = load_tensors(tmp_path / "checkpoint.safetensors")["adapter/hidden"]
    assert torch.equal(again.method.adapter_state()["hidden"], saved)  # the caller gets the trained state


def killed_after_step_4(out: Path) -> None:
    t = trainer(out)

    def stop(tr: Trainer, step: int, losses: list[float]) -> None:
        if step == 5:
            raise KeyboardInterrupt

    t.callbacks.append(stop)
    with pytest.raises(KeyboardInterrupt):
        t.run()


@pytest.mark.parametrize(
    ("meta", "message"),
    [({"step": "-5"}, "not a non-negative integer"), ({"step": "7"}, "beyond the run's 6 steps"),
     ({"finished": "maybe"}, "finished must be"), ({"optim": "[99]"}, "optim must list"),
     ({"loss": "[1, 2]"}, "loss must be 1 finite"), ({"format": "other"}, "metadata format")],
)  # fmt: skip
def test_invalid_metadata_is_refused_before_metrics_are_touched(
    tmp_path: Path, meta: dict[str, str], message: str
) -> None:
    killed_after_step_4(tmp_path)
    path = tmp_path / "checkpoint.safetensors"
    tensors = load_tensors(path)
    save_tensors(path, dict(tensors), {**tensors.metadata, **meta})
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        trainer(tmp_path).run(resume=True)
    assert snapshot(tmp_path) == before


def test_optimizer_step_count_out_of_range_is_refused(tmp_path: Path) -> None:
    killed_after_step_4(tmp_path)
    path = tmp_path / "checkpoint.safetensors"
    tensors = load_tensors(path)
    save_tensors(path, {**tensors, "optim/0/step": torch.tensor(50.0)}, tensors.metadata)
    with pytest.raises(CheckpointError, match=r"optim/0/step must be a count in \[1, 4\]"):
        trainer(tmp_path).run(resume=True)


def test_divergence_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    t = trainer(tmp_path, TrainConfig(steps=6, batch_size=4, lr=1e-2, eval_examples=8))

    def poison(tr: Trainer, step: int, losses: list[float]) -> None:
        with torch.no_grad():
            tr.method.hidden.fill_(float("nan"))

    t.callbacks.append(poison)
    with pytest.raises(TrainingDiverged, match="at step 1; no checkpoint was written, so there is nothing to resume"):
        t.run()
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_memory_is_checked_before_the_optimiser_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ctxtune.limits.physical_memory", lambda: 2**12)  # a 4 KiB machine
    pattern = r"training prefix \(batch 4 x 1 adapters\) needs at least about .*weights .* of memory"
    with pytest.raises(ConfigError, match=pattern):
        trainer(None)
