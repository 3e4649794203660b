"""Atomic, safe file writing, safetensors files with metadata, and the run-folder lock.

Every file ctxtune writes goes through `atomic_write_bytes`: a temporary file in the target folder,
fsync, rename over the target, fsync of the folder. A reader sees the old file or the new one, never
half of one. Tensors are stored as safetensors (no pickle is ever loaded); a file's metadata (string
pairs in its header) travels in the same atomic write as its tensors.

`run_lock(folder)` holds an exclusive lock on a run folder while a process writes it, so a second
writer is refused at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctxtune.errors import CheckpointError, CtxtuneError, RunLocked, not_found

if TYPE_CHECKING:  # torch and safetensors are imported where tensors are read or written: the report needs neither
    import torch

LOCK_NAME = ".ctxtune.lock"
MAX_HEADER_BYTES = 100_000_000  # a safetensors header larger than this is not one ctxtune or HF writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_reason(exc: OSError) -> str:
    """The OS's words for an error ("Permission denied"), without the errno prefix."""
    return exc.strerror or str(exc)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename, fsync folder)."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CtxtuneError(f"cannot write to {folder}: {os_reason(exc)}") from None
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
        raise CtxtuneError(f"cannot write {path}: {os_reason(exc)}") from None


def atomic_write_json(path: str | os.PathLike[str], obj: Any, sort_keys: bool = True) -> None:
    """Write `obj` as indented JSON, atomically; a file that already holds exactly these bytes is left
    untouched (so re-writing an unchanged config, e.g. on resume, changes nothing on disk)."""
    data = (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode()
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass  # unreadable: fall through and let the write report the problem
    atomic_write_bytes(path, data)


def remove_stale_temp_files(path: str | os.PathLike[str]) -> None:
    """Delete temporary files a killed `atomic_write_bytes` left for `path` (call only under run_lock)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


# ----- safetensors -------------------------------------------------------------------------------
class TensorFile(dict):  # type: ignore[type-arg]
    """The tensors of one safetensors file (name -> tensor), remembering the file and its metadata,
    so later checks (dtype, shape) can name the file."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
        super().__init__(tensors)
        self.path = path
        self.metadata = metadata


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors (and string metadata) as one safetensors file, atomically.

    Tensors are made contiguous and unshared.
    """
    from safetensors.torch import save as st_save

    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(clean, metadata=metadata))


def _read_bytes(path: Path, what: str) -> bytes:
    if path.is_dir():
        raise CheckpointError(f"{what} is a directory, expected a file: {path}")
    if not path.is_file():
        raise CheckpointError(not_found(what, path))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {os_reason(exc)}") from None


def parse_safetensors_header(head: bytes, file_size: int, path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file from its first bytes; checks every tensor lies in the file.

    Args:
        head: at least the first 8 + header-length bytes of the file.
        file_size: the file's size in bytes.
        path: for messages.
    """
    bad = f"not a valid safetensors file (truncated, corrupted or another format such as a pickle): {path}"
    if len(head) < 8:
        raise CheckpointError(bad)
    (n,) = struct.unpack("<Q", head[:8])
    if n > min(MAX_HEADER_BYTES, file_size - 8) or len(head) < 8 + n:
        raise CheckpointError(bad)
    try:
        header = json.loads(head[8 : 8 + n])
    except (ValueError, RecursionError):
        raise CheckpointError(bad) from None
    if not isinstance(header, dict):
        raise CheckpointError(bad)
    data_size = file_size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(bad)
        if not 0 <= offsets[0] <= offsets[1] <= data_size:
            raise CheckpointError(f"tensor {name!r} lies outside the file (truncated?): {path}")
    return header


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a safetensors file's header without reading its tensors (for large model files)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(8)
            n = struct.unpack("<Q", first)[0] if len(first) == 8 else 0
            head = first + f.read(min(n, MAX_HEADER_BYTES))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {os_reason(exc)}") from None
    return parse_safetensors_header(head, size, path)


def load_tensors(path: str | os.PathLike[str], what: str = "checkpoint") -> TensorFile:
    """Load a safetensors file with its metadata.

    Raises:
        CheckpointError: the file is missing or unreadable, is not safetensors (a pickle, a truncated
            file), or holds a floating-point tensor with NaN or infinite values (named).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    data = _read_bytes(path, what)
    header = parse_safetensors_header(data, len(data), path)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(
            f"not a valid safetensors file (truncated, corrupted or another format such as a pickle): {path}"
            f" ({str(exc).splitlines()[0][:120]})"
        ) from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"tensor {name!r} in {path} holds NaN or infinite values")
    metadata = header.get("__metadata__") or {}
    return TensorFile(tensors, path, dict(metadata))


def load_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a missing, unreadable, malformed or absurdly nested file is a CheckpointError."""
    path = Path(path)
    data = _read_bytes(path, "file")
    try:
        return json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"invalid JSON in {path}: {exc}") from None
    except (RecursionError, ValueError) as exc:
        raise CheckpointError(f"invalid JSON in {path}: {type(exc).__name__}: {str(exc)[:120]}") from None


# ----- run-folder lock ---------------------------------------------------------------------------
@dataclass
class _Held:
    thread: int
    pid: int
    depth: int
    fd: int


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _acquire(folder: Path) -> int:
    """Open and exclusively lock folder/LOCK_NAME without waiting; returns the locked descriptor."""
    path = folder / LOCK_NAME
    busy = f"run folder {folder} is in use by another ctxtune process"
    for _ in range(3):  # retried only when a releasing holder unlinked the file between open and flock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CtxtuneError(f"cannot create the lock file {path}: {os_reason(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(f"{busy}{_holder(path)}; wait for it to finish or choose another folder") from None
        except OSError as exc:
            os.close(fd)
            raise CtxtuneError(f"cannot lock run folder {folder}: {os_reason(exc)}") from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise RunLocked(f"{busy}; wait for it to finish or choose another folder")


@contextmanager
def run_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on run folder `folder` (created if needed) for the `with` block.

    The lock is `folder/.ctxtune.lock`, locked with `fcntl.flock` and removed on release. A second
    process, or another thread of this process, that asks for the same folder gets `RunLocked` at once
    (no waiting), naming the folder. The same thread may nest `run_lock` on a folder it holds (the
    outer run boundary and the trainer can both take it).

    Raises:
        RunLocked: the folder is locked by someone else.
        CtxtuneError: the folder or lock file cannot be created.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CtxtuneError(f"cannot create run folder {folder}: {os_reason(exc)}") from None
    key = str(folder.resolve())
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held.thread == me and held.pid == os.getpid():
            held.depth += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield folder
        finally:
            with _HELD_GUARD:
                _HELD[key].depth -= 1
        return
    fd = _acquire(folder)
    with _HELD_GUARD:
        _HELD[key] = _Held(me, os.getpid(), 1, fd)
    try:
        yield folder
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        if os.getpid() == _pid_of(fd):
            (folder / LOCK_NAME).unlink(missing_ok=True)  # while still locked: see _acquire's samestat
        os.close(fd)


def _pid_of(fd: int) -> int:
    """The pid recorded in a lock file we hold (a forked child must not remove its parent's lock)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0
