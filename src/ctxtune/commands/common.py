"""Shared command-line plumbing: one-line errors with exit code 2, JSON output, TOML options.

Contract (DESIGN.md): bad input gives one clear line on stderr naming the problem and exit code 2,
no traceback, no partial output; `--json` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import tomllib
import typer

from ctxtune.errors import ConfigError, CtxtuneError, TrainingDiverged

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


def load_toml(path: Path | None) -> dict[str, Any]:
    """Options from a TOML file (empty when no file); malformed files are a ConfigError."""
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"malformed TOML in {path}: {exc}") from None


def section(data: dict[str, Any], name: str, allowed_top: set[str] | None = None) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] in the config file must be a table")
    return dict(value)


def check_top_level(data: dict[str, Any], allowed: set[str], path: Path | None) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def given(**flags: Any) -> dict[str, Any]:
    """The flags the user actually gave (None means not given)."""
    return {k: v for k, v in flags.items() if v is not None}
