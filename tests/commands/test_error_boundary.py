"""The one error boundary: any exception is one line with its exit code; OS errors name the path."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxtune.cli import debug_first
from ctxtune.commands.common import describe_error
from ctxtune.errors import ConfigError, TrainingDiverged

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_harness import CliProcess  # noqa: E402

PRETRAIN = ["pretrain", "--task", "ascending", "--layers", "1", "--heads", "1", "--d-model", "16", "--n-ctx", "24",
            "--steps", "2", "--batch-size", "4", "--eval-examples", "4", "--quiet"]  # fmt: skip


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [(PermissionError(errno.EACCES, "Permission denied", "runs/x/config.json"), 2,
      "Permission denied: runs/x/config.json"),
     (OSError(errno.ENOSPC, "No space left on device", "runs/x/a"), 2, "no space left on device: runs/x/a"),
     (OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300), 2, "File name too long: xxx"),
     (IsADirectoryError(errno.EISDIR, "Is a directory", "spec.toml"), 2, "Is a directory: spec.toml"),
     (OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"), 2, "Invalid cross-device link: a -> b"),
     (RecursionError("maximum recursion depth exceeded"), 2, "input nested too deeply"),
     (MemoryError(), 2, "out of memory"),
     (TypeError("'<' not supported between instances of 'str' and 'int'"), 2,
      "TypeError: '<' not supported between instances of 'str' and 'int' (unexpected; run with --debug"),
     (ConfigError("train.lr must be positive"), 2, "train.lr must be positive"),
     (TrainingDiverged("loss became [nan] at step 3"), 1, "training diverged: loss became [nan] at step 3"),
     (KeyboardInterrupt(), 130, "interrupted")],
)  # fmt: skip
def test_every_exception_has_a_code_and_a_message(exc: BaseException, code: int, message: str) -> None:
    got_code, got_message = describe_error(exc)
    assert got_code == code and got_message.startswith(message), got_message


def test_debug_is_moved_before_the_command_but_not_past_a_separator() -> None:
    assert debug_first(["tune", "--lr", "1", "--debug"]) == ["--debug", "tune", "--lr", "1"]
    assert debug_first(["tune", "--", "--debug"]) == ["tune", "--", "--debug"]
    assert debug_first(["tune"]) == ["tune"]


def unwritable(folder: Path) -> bool:
    """Make `folder` unwritable (chmod, or chattr +i for root); False when this machine cannot."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def test_unwritable_folder_is_one_line_naming_the_folder(cli_process: CliProcess, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if not unwritable(locked):
        pytest.skip("cannot make a folder unwritable here (root without chattr)")
    try:
        res = cli_process.run([*PRETRAIN, "--out", "locked/run"], tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True) if os.geteuid() == 0 else locked.chmod(0o755)
    assert res.code == 2 and len(res.lines) == 1, res.stderr
    assert "locked/run" in res.lines[0] and ("Permission denied" in res.stderr or "not permitted" in res.stderr)
    assert list(locked.iterdir()) == []


NO_SPACE = """
import errno, os
real_fdopen = os.fdopen


class Full:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)


os.fdopen = lambda fd, *args, **kwargs: Full(real_fdopen(fd, *args, **kwargs))
"""


def test_no_space_is_one_line_and_leaves_no_partial_file(cli_process: CliProcess, tmp_path: Path) -> None:
    res = cli_process.run([*PRETRAIN, "--out", "run"], tmp_path, prelude=NO_SPACE)
    assert res.code == 2 and res.lines == ["error: cannot write run/config.json: No space left on device"], res.stderr
    assert list((tmp_path / "run").iterdir()) == []  # no config.json, no temporary file
