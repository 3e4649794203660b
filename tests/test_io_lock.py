"""ctxtune.io: the run-folder lock, safetensors metadata and validation, unchanged JSON left alone."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ctxtune.errors import CheckpointError, RunLocked
from ctxtune.io import LOCK_NAME, atomic_write_json, load_json, load_tensors, run_lock, save_tensors

SRC = Path(__file__).resolve().parents[1] / "src"


def test_second_process_is_refused_at_once_naming_the_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = f"from ctxtune.io import run_lock\nwith run_lock({str(run)!r}):\n    pass\n"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with run_lock(run):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"run folder {run} is in use by another ctxtune process (pid {os.getpid()})" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # released: the next writer gets it


def test_same_thread_may_nest_another_thread_may_not(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with run_lock(tmp_path):
                pass
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    with run_lock(tmp_path):
        with run_lock(tmp_path):  # the outer run boundary and the trainer
            assert (tmp_path / LOCK_NAME).is_file()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert (tmp_path / LOCK_NAME).is_file(), "leaving the inner block must not release the lock"
    assert len(errors) == 1 and isinstance(errors[0], RunLocked)
    assert not (tmp_path / LOCK_NAME).exists(), "the lock file is removed on release"


def test_a_stale_lock_file_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("999999\n")
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_metadata_round_trip_and_nan_refused_by_name(tmp_path: Path) -> None:
    save_tensors(tmp_path / "a.safetensors", {"w": torch.ones(2)}, {"step": "3"})
    loaded = load_tensors(tmp_path / "a.safetensors")
    assert loaded.metadata == {"step": "3"} and loaded.path == tmp_path / "a.safetensors"
    save_tensors(tmp_path / "b.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CheckpointError, match=r"tensor 'w' in .*b\.safetensors holds NaN"):
        load_tensors(tmp_path / "b.safetensors")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 2) + b"[]",
     struct.pack("<Q", 60) + b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}' + b"\0"],
    ids=["empty", "short", "huge-header", "list-header", "truncated-data"],
)  # fmt: skip
def test_malformed_safetensors_is_one_checkpoint_error(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "x.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"x\.safetensors"):
        load_tensors(tmp_path / "x.safetensors")


def test_load_json_names_the_file_for_deep_nesting_and_huge_ints(tmp_path: Path) -> None:
    for name, text in [("deep.json", "[" * 100_000 + "]" * 100_000), ("int.json", "1" * 5000)]:
        (tmp_path / name).write_text(text)
        with pytest.raises(CheckpointError, match=f"invalid JSON in .*{name}"):
            load_json(tmp_path / name)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_json(tmp_path)


def test_unchanged_json_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    atomic_write_json(path, {"a": 1})
    before = path.stat().st_mtime_ns
    os.utime(path, ns=(before - 10**9, before - 10**9))
    atomic_write_json(path, {"a": 1})
    assert path.stat().st_mtime_ns == before - 10**9
    atomic_write_json(path, {"a": 2})
    assert load_json(path) == {"a": 2}
