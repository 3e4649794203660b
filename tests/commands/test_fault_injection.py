"""Kill a real training process (SIGKILL) while it writes a checkpoint, at several points, then resume:
the result is bit-identical to an uninterrupted run.

The kill comes from inside the process (a prelude run before `ctxtune.cli.main()` wraps the OS calls
`ctxtune.io.atomic_write_bytes` makes, and `open` for the metrics log) at one point of the N-th
checkpoint write: halfway through writing the temporary file, after its fsync, just before the rename,
just after the rename (before the folder fsync), or halfway through the next metrics line. The run
is then resumed with `--resume` by a fresh process.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from ctxtune.io import read_safetensors_header

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_harness import CliProcess  # noqa: E402

STEPS, EVERY = 12, 2
FINAL = STEPS // EVERY + 1  # the checkpoint written after the final evaluation
PRETRAIN = [
    "pretrain", "--task", "ascending", "--layers", "1", "--heads", "1", "--d-model", "16", "--n-ctx", "24",
    "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--batch-size", "8", "--lr", "3e-3",
    "--eval-examples", "16", "--dropout", "0.1", "--quiet", "--out", "run",
]  # fmt: skip

KILL = """
import builtins, os, signal
POINT, N = {point!r}, {n}
count = [0]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def is_checkpoint_temp(fd):
    return ".checkpoint.safetensors." in os.readlink(f"/proc/self/fd/{{fd}}")


class HalfWriter:
    '''Writes half of what it is given, flushes, and dies.'''

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        die()

    def __getattr__(self, name):
        return getattr(self.f, name)


real_fdopen, real_fsync, real_replace, real_open = os.fdopen, os.fsync, os.replace, builtins.open


def fdopen(fd, *args, **kwargs):
    f = real_fdopen(fd, *args, **kwargs)
    if is_checkpoint_temp(fd):
        count[0] += 1
        if POINT == "mid_write" and count[0] == N:
            return HalfWriter(f)
    return f


def fsync(fd):
    real_fsync(fd)
    if POINT == "after_fsync" and count[0] == N and is_checkpoint_temp(fd):
        die()


def replace(src, dst, *args, **kwargs):
    checkpoint = str(dst).endswith("checkpoint.safetensors")
    if checkpoint and POINT == "before_rename" and count[0] == N:
        die()
    real_replace(src, dst, *args, **kwargs)
    if checkpoint and POINT == "after_rename" and count[0] == N:
        die()


def open_(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if POINT == "metrics_mid_line" and count[0] == N and str(file).endswith("metrics.jsonl") and "a" in mode:
        return HalfWriter(f)
    return f


os.fdopen, os.fsync, os.replace, builtins.open = fdopen, fsync, replace, open_
"""

POINTS = [
    ("mid_write", 3),
    ("after_fsync", 3),
    ("before_rename", 3),
    ("after_rename", 3),
    ("metrics_mid_line", 5),  # log_every is 10: the step-12 line follows the 5th checkpoint (step 10)
    ("mid_write", FINAL),
    ("before_rename", FINAL),
]


def outputs(run: Path) -> dict[str, object]:
    """What a finished run must reproduce exactly (summary without its wall-clock times, its folder and
    whether it was resumed)."""
    summary = json.loads((run / "summary.json").read_text())
    for key in ("seconds", "train_seconds", "out_dir", "resumed"):
        summary.pop(key)
    return {
        "model": (run / "model.safetensors").read_bytes(),
        "metrics": (run / "metrics.jsonl").read_text(),
        "summary": summary,
    }


@pytest.fixture(scope="module")
def reference(cli_process: CliProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("uninterrupted")
    res = cli_process.run(PRETRAIN, root)
    assert res.code == 0, res.stderr
    return outputs(root / "run")


def kill_and_resume(cli_process: CliProcess, root: Path, point: str, n: int) -> Path:
    killed = cli_process.run(PRETRAIN, root, prelude=KILL.format(point=point, n=n))
    assert killed.code == -signal.SIGKILL, f"{point}: the run was not killed ({killed.code}): {killed.stderr}"
    assert not (root / "run" / "model.safetensors").exists()
    resumed = cli_process.run([*PRETRAIN, "--resume"], root)
    assert resumed.code == 0, f"{point}: {resumed.stderr}"
    return root / "run"


@pytest.mark.parametrize(("point", "n"), POINTS, ids=[f"{p}-{n}" for p, n in POINTS])
def test_kill_while_checkpointing_then_resume_is_bit_identical(
    point: str, n: int, reference: dict[str, object], cli_process: CliProcess, tmp_path: Path
) -> None:
    run = kill_and_resume(cli_process, tmp_path, point, n)
    assert outputs(run) == reference
    assert not list(run.glob(".*.tmp")), "temporary files of the killed write were left behind"
    assert read_safetensors_header(run / "checkpoint.safetensors")["__metadata__"]["finished"] == "true"


def test_kill_after_the_final_checkpoint_then_resume_completes_the_outputs(
    reference: dict[str, object], cli_process: CliProcess, tmp_path: Path
) -> None:
    run = kill_and_resume(cli_process, tmp_path, "after_rename", FINAL)
    assert outputs(run) == reference
