"""Atomic, safe file writing and safetensors checkpoints.

Every file ctxtune writes goes through `atomic_write_bytes`: a temporary file in the target folder,
fsync, rename over the target, fsync of the folder. A reader sees the old file or the new one, never
half of one. Tensors are stored as safetensors (no pickle is ever loaded) next to a JSON sidecar.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctxtune.errors import CheckpointError, CtxtuneError

if TYPE_CHECKING:  # torch and safetensors are imported where tensors are read or written: the report needs neither
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename, fsync folder)."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CtxtuneError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CtxtuneError(f"cannot write {path}: {exc.strerror or exc}") from None


def atomic_write_json(path: str | os.PathLike[str], obj: Any, sort_keys: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors as safetensors, atomically. Tensors are made contiguous and unshared."""
    from safetensors.torch import save as st_save

    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(clean))


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file; any other content (a pickle, a truncated file) is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(
            f"not a valid safetensors file (truncated, corrupted or another format such as a pickle): {path}"
            f" ({str(exc).splitlines()[0][:120]})"
        ) from None


def load_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"invalid JSON in {path}: {exc}") from None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on a run folder while writing it; a second writer is refused at once."""
    import fcntl

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CtxtuneError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CtxtuneError(f"{folder} is being written by another ctxtune process; wait for it or use another folder") from None
        yield
    finally:
        os.close(fd)
