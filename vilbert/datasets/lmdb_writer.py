"""Atomic LMDB writing: build in a hidden sibling folder, move into place only once complete.

A converter that dies half-way (a bad TSV line, a full disk, Ctrl-C) must never leave a partial
LMDB where a good one was, nor one that a later run mistakes for finished. The map grows by
doubling on ``MapFullError``, so no platform-dependent huge ``map_size`` is needed.

A killed converter (SIGKILL, a lost machine) cannot clean up, and its staging folder may be as big
as the output. Staging folders are named by :func:`vilbert.atomic.temporary_name`, which records
the writer's pid, so the next writer of the same output removes those of dead writers and never a
live writer's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from types import TracebackType
from typing import TypeVar

import lmdb

from vilbert.atomic import parse_temporary_name, temporary_name

logger = logging.getLogger(__name__)


def lmdb_paths(path: str, subdir: bool) -> list[str]:
    """The filesystem entries an LMDB at ``path`` occupies (single-file layout adds ``-lock``)."""
    return [path] if subdir else [path, path + "-lock"]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ``tmp``: the LMDB being built; ``old``: the output it replaces, for the moment of the swap.
_STAGING_SUFFIXES = ("tmp", "old")


def _legacy_staging_name(base: str) -> re.Pattern[str]:
    """How staging folders were named before they recorded their writer (``tempfile.mkdtemp``)."""
    return re.compile(rf"^\.{re.escape(base)}\.[a-z0-9_]{{8}}\.(tmp|old)$")


def _make_staging_folder(parent: str, base: str, suffix: str) -> str:
    while True:
        folder = os.path.join(parent, temporary_name(base, suffix))
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            continue
        return folder


def _size(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names
    )


def _is_stale_staging(name: str, base: str, legacy: re.Pattern[str]) -> bool:
    parsed = parse_temporary_name(name)
    if parsed is None:
        return legacy.match(name) is not None
    return parsed.target == base and parsed.suffix in _STAGING_SUFFIXES and not parsed.writer_alive


def remove_stale_staging(path: str) -> list[str]:
    """Remove the staging folders that dead writers of ``path`` left beside it. Returns their names."""
    parent, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isdir(parent):
        return []
    legacy = _legacy_staging_name(base)
    removed, freed = [], 0
    for name in sorted(os.listdir(parent)):
        folder = os.path.join(parent, name)
        if _is_stale_staging(name, base, legacy) and os.path.isdir(folder) and not os.path.islink(folder):
            size = _size(folder)
            with contextlib.suppress(FileNotFoundError):  # another writer may have removed it first
                shutil.rmtree(folder)
                removed.append(name)
                freed += size
    if removed:
        logger.info("removed %d staging folder(s) (%.1f MB) that killed writers of %s left: %s",
                    len(removed), freed / 1e6, path, ", ".join(removed))  # fmt: skip
    return removed


_Writer = TypeVar("_Writer", bound="CommitOrAbort")


class CommitOrAbort:
    """``with writer:`` commits when the block succeeds and aborts (leaving no output) when it raises."""

    def commit(self) -> int:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Writer) -> _Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class AtomicLMDBWriter(CommitOrAbort):
    """Write key/value pairs to a new LMDB at ``path``; ``subdir=False`` gives tensorpack's single file.

    Opening one first removes the staging folders that killed writers of ``path`` left.
    """

    def __init__(
        self,
        path: str,
        subdir: bool,
        overwrite: bool = False,
        batch_size: int = 256,
        initial_map_size: int = 1 << 30,
    ) -> None:
        remove_stale_staging(path)
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        self.path = path
        self.subdir = subdir
        self._batch_size = batch_size
        self._pending: list[tuple[bytes, bytes]] = []
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._tmp_dir = _make_staging_folder(parent, os.path.basename(path), "tmp")
        self._tmp_target = self._tmp_dir if subdir else os.path.join(self._tmp_dir, os.path.basename(path))
        self._env: lmdb.Environment | None = lmdb.open(
            self._tmp_target, subdir=subdir, map_size=initial_map_size, meminit=False, readahead=False
        )

    def put(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value))
        if len(self._pending) >= self._batch_size:
            self._flush()

    def _flush(self) -> None:
        assert self._env is not None, "writer already closed"
        while self._pending:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                self._pending.clear()
            except lmdb.MapFullError:
                new_size = self._env.info()["map_size"] * 2
                logger.debug("LMDB map full, growing %s to %d bytes", self.path, new_size)
                self._env.set_mapsize(new_size)

    def commit(self) -> None:
        """Flush, close, and move the finished LMDB to ``path`` (replacing what was there)."""
        try:
            self._flush()
        except BaseException:
            self.abort()
            raise
        assert self._env is not None
        self._env.close()
        self._env = None
        if self.subdir:
            os.chmod(self._tmp_dir, 0o755)
        parent = os.path.dirname(os.path.abspath(self.path))
        old_dir = None
        if any(os.path.lexists(p) for p in lmdb_paths(self.path, self.subdir)):
            old_dir = _make_staging_folder(parent, os.path.basename(self.path), "old")
            for i, p in enumerate(lmdb_paths(self.path, self.subdir)):
                if os.path.lexists(p):
                    os.replace(p, os.path.join(old_dir, str(i)))
        if self.subdir:
            os.replace(self._tmp_dir, self.path)
        else:
            for src, dst in zip(lmdb_paths(self._tmp_target, False), lmdb_paths(self.path, False)):
                if os.path.lexists(src):
                    os.replace(src, dst)
            shutil.rmtree(self._tmp_dir)
        if old_dir is not None:
            shutil.rmtree(old_dir)

    def abort(self) -> None:
        """Drop everything written so far; ``path`` is left as it was."""
        if self._env is not None:
            self._env.close()
            self._env = None
        _remove(self._tmp_dir)
