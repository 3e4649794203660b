"""Strict construction of the frozen config dataclasses from user mappings (TOML, JSON, flags).

Unknown keys are rejected by name and every value must have the type of the field's default (an int
where a float is expected is accepted and converted; lists become tuples), so a wrong value in a config
file is one clear ConfigError, never a TypeError deep inside validation. Every number must be finite
and every integer must fit in 64 bits (what torch and the files hold), named as `section.key`.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, TypeVar

from ctxtune.errors import ConfigError, not_found
from ctxtune.limits import check_finite, check_int64

T = TypeVar("T")


def _coerce(value: Any, default: Any, name: str, what: str) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = True
    if not ok:
        expected = "a list" if isinstance(default, tuple) else type(default).__name__
        raise ConfigError(f"{what}.{name} must be {expected}, got {_shown(value)}")
    for item in value if isinstance(value, tuple) else (value,):
        check_int64(item, f"{what}.{name}")
        check_finite(item, f"{what}.{name}")
    return value


def _shown(value: Any) -> str:
    """A value for a message: its repr, cut to 80 characters (a hand-edited file may hold anything)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a deeply nested list
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def strict_from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    """Build dataclass `cls` from `data`; `what` names the section in messages (e.g. "model")."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a table of options, got {_shown(data)}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown {what} key(s): {', '.join(unknown)}; known: {', '.join(sorted(known)) or 'none'}")
    clean = {}
    for name, value in data.items():
        default = known[name].default
        clean[name] = _coerce(value, default, name, what) if default is not MISSING else value
    return cls(**clean)


def check_keys(data: Any, allowed: set[str], where: str, required: set[str] = frozenset()) -> dict[str, Any]:
    """`data` must be a table whose keys are all in `allowed` and include `required`; returns it.

    The one key validator of every TOML and JSON input (command options, study and sweep specs, run
    folders read back): an unknown or missing key is one ConfigError naming the key and `where`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table of options, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(set(required) - set(data))
    if missing:
        raise ConfigError(f"missing key(s) in {where}: {', '.join(missing)}")
    return data


def table(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """The sub-table `name` of `data` (empty when absent); anything else there is a ConfigError."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] in {where} must be a table, got {type(value).__name__}")
    return dict(value)


def load_toml(path: Any) -> dict[str, Any]:
    """Parse a TOML file; a missing, unreadable or malformed file is one ConfigError naming it."""
    import tomllib
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, expected a TOML file")
    if not path.is_file():
        raise ConfigError(not_found("config file", path))
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"malformed TOML in {path}: {exc}") from None
    except (RecursionError, ValueError) as exc:
        raise ConfigError(f"malformed TOML in {path}: {type(exc).__name__}: {str(exc)[:120]}") from None
