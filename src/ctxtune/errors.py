"""Errors that reach the user.

`CtxtuneError` is bad input: the command line prints its message as one line on stderr and exits
with code 2, with no traceback. Raise it (or a subclass) wherever a user-supplied value is wrong,
with a message that names the value and what was expected.
"""

from __future__ import annotations


class CtxtuneError(Exception):
    """Bad input from the user: shown as one line, exit code 2."""


class ConfigError(CtxtuneError):
    """A configuration value or file is invalid."""


class CheckpointError(CtxtuneError):
    """A checkpoint is missing, truncated, corrupted, unsafe or of another shape."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the step. Exit code 1, not 2."""
