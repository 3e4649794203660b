"""Errors that reach the user.

`CtxtuneError` is bad input: the command line prints its message as one line on stderr and exits
with code 2, with no traceback. Raise it (or a subclass) wherever a user-supplied value is wrong,
with a message that names the value and what was expected.

`TrainingDiverged` is a failure during work that was valid to start: exit code 1.
"""

from __future__ import annotations

from typing import Any


class CtxtuneError(Exception):
    """Bad input from the user: shown as one line, exit code 2."""


class ConfigError(CtxtuneError):
    """A configuration value or file is invalid."""


class CheckpointError(CtxtuneError):
    """A checkpoint is missing, truncated, corrupted, unsafe or of another shape."""


class RunLocked(CtxtuneError):
    """Another process (or thread) is writing the run folder; nothing was done."""


class RunAlreadyFinished(CtxtuneError):
    """`resume` was asked of a run whose final checkpoint is already written; nothing was changed.

    Attributes:
        folder: the run folder.
        result: the finished run's `TrainResult`, rebuilt from its final checkpoint (step, final
            losses, accuracies; `seconds` is 0). The method the trainer was given holds the trained
            adapter state, so a caller may rewrite outputs that are missing (e.g. summary.json after
            a kill between the final checkpoint and the summary).
    """

    def __init__(self, message: str, folder: Any = None, result: Any = None) -> None:
        super().__init__(message)
        self.folder, self.result = folder, result


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the step. Exit code 1, not 2."""


def not_found(what: str, path: Any) -> str:
    """"{what} not found: {path}", or, for a symbolic link that resolves nowhere (a loop or a missing
    target), a message that says so: the path is there, what it points to is not."""
    from pathlib import Path

    if Path(path).is_symlink():
        return f"{what} {path} is a symbolic link that leads nowhere (a loop or a missing target)"
    return f"{what} not found: {path}"

