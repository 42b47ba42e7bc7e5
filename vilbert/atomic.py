"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

The data goes to a temporary file in the destination folder (same file system, so the rename is
atomic), is flushed and fsync'ed, then `os.replace`s the target. If anything fails, the temporary
file is removed and the previous file is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable
from typing import IO, Any

import torch

# ``.<target name>.<8 hex digits>.tmp``: the temporary files ``atomic_write`` creates.
TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable; not every platform can open a folder, which is fine."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(file) on a temporary file beside `path`, then move it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never clobber a stranger's file; mode 0o666 lets the umask decide, as open() would.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_folder(folder)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed writer left in ``folder`` (a SIGKILL skips the cleanup in
    ``atomic_write``); call it only while nothing writes there. Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if TEMPORARY_NAME.match(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save that never leaves a truncated checkpoint behind (e.g. when a run is killed)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    data = text.encode(encoding)
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Serialise first, so an unserialisable object fails before anything touches the disk."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
