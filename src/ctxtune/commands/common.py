"""Shared command-line plumbing: one-line errors with exit code 2, JSON output, the flags a user gave.

Contract (DESIGN.md): bad input gives one clear line on stderr naming the problem and exit code 2,
no traceback, no partial output; `--json` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ctxtune.errors import CtxtuneError, TrainingDiverged

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` as one line on stderr and return the Exit to raise."""
    first = " ".join(str(message).split())
    print(f"error: {first}", file=sys.stderr)
    return typer.Exit(code)


def cli_errors(fn: F) -> F:
    """Turn user errors into one stderr line: CtxtuneError -> exit 2, TrainingDiverged -> exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CtxtuneError as exc:
            raise fail(str(exc), 2) from None
        except TrainingDiverged as exc:
            raise fail(f"training diverged: {exc}", 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    """Exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def given(**flags: Any) -> dict[str, Any]:
    """The flags the user actually gave (None means not given)."""
    return {k: v for k, v in flags.items() if v is not None}
