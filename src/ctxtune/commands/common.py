"""Shared command-line plumbing: one error boundary, JSON output, the flags a user gave.

Contract (DESIGN.md): bad input gives one clear line on stderr naming the problem and exit code 2,
no traceback, no partial output; `--json` prints exactly one JSON object on stdout.

The error boundary (`cli_errors` on every command, `describe_error` in `ctxtune.cli.main`) turns ANY
exception into one `error: ...` line: exit 1 for a failure during work that was valid to start
(`TrainingDiverged`), 130 for Ctrl-C, 2 for everything else (ctxtune's own errors, OS errors with the
path at fault, errors from hand-edited files or libraries). `--debug` (or CTXTUNE_DEBUG=1) prints the
traceback before the line.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from ctxtune.errors import ConfigError, CtxtuneError, TrainingDiverged
from ctxtune.limits import INT64_MAX, INT64_MIN

F = TypeVar("F", bound=Callable[..., Any])
MAX_MESSAGE = 2000  # characters of one error line (a 10,000-character file name stays readable)

_debug = False


def set_debug(on: bool) -> None:
    """Show tracebacks of errors (the global --debug flag)."""
    global _debug
    _debug = on


def debug_enabled() -> bool:
    return _debug or os.environ.get("CTXTUNE_DEBUG", "") not in ("", "0")


def one_line(message: str) -> str:
    """Collapse whitespace and cut very long messages to one readable line."""
    line = " ".join(str(message).split())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` as one line on stderr and return the Exit to raise."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return typer.Exit(code)


def os_error_message(exc: OSError) -> str:
    """'Permission denied: runs/x/config.json' from an OSError (the OS's reason, then the path(s))."""
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    return f"{reason}: {' -> '.join(names)}" if names else f"{reason} ({type(exc).__name__})"


def describe_error(exc: BaseException) -> tuple[int, str]:
    """Exit code and one-line message for any exception that reaches the command line."""
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, TrainingDiverged):
        return 1, f"training diverged: {exc}"
    if isinstance(exc, CtxtuneError):
        return 2, str(exc)
    if isinstance(exc, OSError):
        return 2, os_error_message(exc)
    if isinstance(exc, MemoryError) or _is_allocation_failure(exc):
        return 2, "out of memory: the command needs more memory than this machine has (lower the sizes or counts given)"
    if isinstance(exc, RecursionError):
        return 2, "input nested too deeply (RecursionError): check the files and values given"
    first = (str(exc).strip().splitlines() or [""])[0]
    return 2, f"{type(exc).__name__}: {first} (unexpected; run with --debug for the traceback)"


def _is_allocation_failure(exc: BaseException) -> bool:
    """torch's allocators raise RuntimeError (a subclass for CUDA) when memory runs out."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def report_error(exc: BaseException) -> int:
    """Print the error line (and with --debug the traceback first); return the exit code."""
    code, message = describe_error(exc)
    if debug_enabled():
        traceback.print_exception(exc)
    print(f"error: {one_line(message)}", file=sys.stderr)
    return code


def cli_errors(fn: F) -> F:
    """The error boundary of a command: numbers checked first, then any exception becomes one stderr
    line with its exit code (see `describe_error`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            check_number_flags(kwargs)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BaseException as exc:  # noqa: B036 - the boundary: KeyboardInterrupt included
            raise typer.Exit(report_error(exc)) from None

    return wrapper  # type: ignore[return-value]


def check_number_flags(values: dict[str, Any]) -> None:
    """Refuse integer flags beyond 64 bits and float flags that are NaN or infinite, naming the flag."""
    for name, value in values.items():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, bool):
                continue
            if isinstance(item, int) and not INT64_MIN <= item <= INT64_MAX:
                digits = len(str(abs(item)))
                raise ConfigError(f"{flag_name(name)} has {digits} digits: it does not fit in a 64-bit integer")
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{flag_name(name)} must be a finite number, got {item}")


def flag_name(param: str) -> str:
    """The command-line spelling of a command's parameter (e.g. weight_decay -> --weight-decay)."""
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    for p in getattr(getattr(ctx, "command", None), "params", []):
        if p.name == param and getattr(p, "opts", None):
            return str(p.opts[0])
    return "--" + param.replace("_", "-")


def check_output_path(path: Path, flag: str, kind: str) -> None:
    """Refuse an output path that cannot be written, before any work.

    Args:
        path: the output file or folder (it may not exist yet; missing parents are created later).
        flag: the option's name for messages, e.g. "--out".
        kind: "file" or "folder".

    Raises:
        ConfigError: the path is of the other kind (or a device, a socket, ...), a parent is a file, or
            the nearest existing folder is not writable.
    """
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} exists and is not a folder")
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory, expected a file")
    if kind == "file" and path.exists() and not path.is_file():
        raise ConfigError(f"{flag} {path} exists and is not a regular file")
    ancestor = path if kind == "folder" and path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: permission denied to write in {ancestor}")


def check_out_apart(out: Path, flag: str, inputs: list[tuple[str, str | Path]]) -> None:
    """Refuse an output folder that is, contains or lies inside one of the command's inputs, before any work
    (writing or `--overwrite` there would destroy or change the input).

    Args:
        out: the output folder.
        flag: the option's name for messages, e.g. "--out".
        inputs: (what, path) of every input folder or file, e.g. ("run folder", run).
    """
    mine = out.expanduser().resolve()
    for what, path in inputs:
        theirs = Path(path).expanduser().resolve()
        if mine == theirs or mine in theirs.parents:
            relation = "is" if mine == theirs else "contains"
            raise ConfigError(f"{flag} {out} {relation} the {what} {path}: writing there would overwrite it; "
                              "choose another folder")
        if theirs in mine.parents:
            raise ConfigError(f"{flag} {out} lies inside the {what} {path}: choose a folder outside it")


def check_not_in_run_folder(out: Path, flag: str) -> None:
    """Refuse an output folder that is, or lies inside, a ctxtune run folder (its files belong to the run; an
    export's --overwrite or a results folder would replace or mix into them)."""
    from ctxtune.train.runs import is_run_folder

    path = out.expanduser()
    for candidate in [path, *path.resolve().parents]:
        if is_run_folder(candidate):
            where = "is" if candidate == path else f"lies inside {candidate},"
            raise ConfigError(f"{flag} {out} {where} a ctxtune run folder: choose a folder outside run folders")


def emit_json(obj: Any) -> None:
    """Exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def given(**flags: Any) -> dict[str, Any]:
    """The flags the user actually gave (None means not given)."""
    return {k: v for k, v in flags.items() if v is not None}
