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
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

# This machine's name as it appears in temporary names: a pid is only meaningful on its own host.
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "localhost"

# ``.<target name>.<pid>@<host>.<8 hex digits>.<suffix>``: the names ``temporary_name`` gives.
_TEMPORARY_NAME = re.compile(
    r"^\.(?P<target>.+)\.(?P<pid>[0-9]+)@(?P<host>[A-Za-z0-9-]+)\.[0-9a-f]{8}\.(?P<suffix>[a-z]+)$"
)
# ``.<target name>.<8 hex digits>.tmp``: what ``atomic_write`` named its files before they carried
# the pid; only a killed writer of an older version can have left one, so they are always stale.
_LEGACY_TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


@dataclass(frozen=True)
class TemporaryName:
    """What a temporary name says about the file: whose output it stages, and who writes it."""

    target: str
    pid: int
    host: str
    suffix: str

    @property
    def writer_alive(self) -> bool:
        return process_alive(self.pid, self.host)


def temporary_name(target: str, suffix: str = "tmp") -> str:
    """A fresh hidden name beside ``target`` (a base name) that records this process as its writer."""
    return f".{target}.{os.getpid()}@{HOST}.{secrets.token_hex(4)}.{suffix}"


def parse_temporary_name(name: str) -> TemporaryName | None:
    """The writer recorded in ``name``, or None for a name ``temporary_name`` did not make."""
    match = _TEMPORARY_NAME.match(name)
    if match is None:
        return None
    return TemporaryName(match["target"], int(match["pid"]), match["host"], match["suffix"])


def process_alive(pid: int, host: str = HOST) -> bool:
    """Whether process ``pid`` of ``host`` may still run. Another host's processes cannot be seen
    from here, so they count as alive: a file of theirs is kept rather than removed under them."""
    if host != HOST or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


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
    temporary = os.path.join(folder, temporary_name(os.path.basename(path)))
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


def _is_stale_temporary(name: str) -> bool:
    parsed = parse_temporary_name(name)
    if parsed is not None:
        return parsed.suffix == "tmp" and not parsed.writer_alive
    return _LEGACY_TEMPORARY_NAME.match(name) is not None


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed writers left in ``folder`` (a SIGKILL skips the cleanup
    in ``atomic_write``); a file whose writer is alive, or runs on another host, is kept. Returns
    the names removed."""
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if _is_stale_temporary(name) and os.path.isfile(path):
            with contextlib.suppress(FileNotFoundError):  # another run may have removed it first
                os.remove(path)
                removed.append(name)
    return removed


WRITE_FAILURES = ("PytorchStreamWriter failed", "No space left", "Input/output error", "file write failed")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save that never leaves a truncated checkpoint behind (e.g. when a run is killed).

    torch is imported here, not at the top: the LMDB writers share this module's temporary names,
    and the data tools that use them start without loading torch."""
    import torch

    try:
        atomic_write(path, lambda handle: torch.save(obj, handle))
    except RuntimeError as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not any(sign in message for sign in WRITE_FAILURES):
            raise  # e.g. an object that cannot be pickled: a bug, with its traceback
        # torch's zip writer reports a full disk or an I/O error as a RuntimeError.
        raise OSError(f"{path}: could not be written ({message}); the previous file is intact") from error


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    data = text.encode(encoding)
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Serialise first, so an unserialisable object fails before anything touches the disk."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
