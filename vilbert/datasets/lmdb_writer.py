"""Atomic LMDB writing: build in a hidden sibling folder, move into place only once complete.

A converter that dies half-way (a bad TSV line, a full disk, Ctrl-C) must never leave a partial
LMDB where a good one was, nor one that a later run mistakes for finished. The map grows by
doubling on ``MapFullError``, so no platform-dependent huge ``map_size`` is needed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from types import TracebackType
from typing import TypeVar

import lmdb

logger = logging.getLogger(__name__)


def lmdb_paths(path: str, subdir: bool) -> list[str]:
    """The filesystem entries an LMDB at ``path`` occupies (single-file layout adds ``-lock``)."""
    return [path] if subdir else [path, path + "-lock"]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


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
    """Write key/value pairs to a new LMDB at ``path``; ``subdir=False`` gives tensorpack's single file."""

    def __init__(
        self,
        path: str,
        subdir: bool,
        overwrite: bool = False,
        batch_size: int = 256,
        initial_map_size: int = 1 << 30,
    ) -> None:
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        self.path = path
        self.subdir = subdir
        self._batch_size = batch_size
        self._pending: list[tuple[bytes, bytes]] = []
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
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
            old_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", suffix=".old", dir=parent)
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
