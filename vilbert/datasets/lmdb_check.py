"""Check an LMDB file against its own meta pages before mapping it, and name the file in lmdb errors.

LMDB maps the whole data file and trusts it: a file truncated after it was written (a copy that
stopped, a full disk) is mapped past its end and the first read of a missing page kills the
process with SIGBUS, with no message. Every LMDB file starts with two meta pages that record the
page size and the last page in use, so the size the file must have is known before any read; a
file shorter than that, an empty one or one that is not an LMDB at all is refused here as one line
naming the file. Errors that py-lmdb raises later (a page overwritten with garbage) are turned into
the same one-line error with the path, never a traceback.

The layout read here is that of LMDB 0.9 (the version py-lmdb bundles) on a 64-bit little-endian
machine: a 16-byte page header, then ``MDB_meta`` (magic, version, address, map size, two
``MDB_db`` records of which the first holds the page size, last page number, transaction id).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb

from vilbert.errors import BadInputError

LMDB_MAGIC = 0xBEEFC0DE
LMDB_DATA_VERSION = 1
_PAGE_HEADER = 16
_MAGIC_VERSION = struct.Struct("<II")
_PAGE_SIZE_OFFSET = _PAGE_HEADER + 24  # mm_dbs[0].md_pad holds the page size
_LAST_PAGE_OFFSET = _PAGE_HEADER + 120  # mm_last_pg, then mm_txnid
_LAST_PAGE_TXNID = struct.Struct("<QQ")
_META_BYTES = _LAST_PAGE_OFFSET + _LAST_PAGE_TXNID.size
_PAGE_SIZES = tuple(1 << shift for shift in range(9, 17))  # 512 B .. 64 KiB


class DamagedLMDBError(BadInputError):
    """An LMDB file that is empty, truncated, not an LMDB, or that py-lmdb cannot read."""


@dataclass(frozen=True)
class LMDBMeta:
    """What the newer of the two meta pages says: page size, last page in use, transaction id."""

    page_size: int
    last_page: int
    txnid: int

    @property
    def required_bytes(self) -> int:
        """The size the data file must at least have: every page up to the last one in use."""
        return (self.last_page + 1) * self.page_size


def data_file(path: str, subdir: bool) -> str:
    """The file holding the pages: ``data.mdb`` inside a directory LMDB, else the file itself."""
    return os.path.join(path, "data.mdb") if subdir else path


def _meta_at(head: bytes, offset: int) -> LMDBMeta | None:
    if len(head) < offset + _META_BYTES:
        return None
    magic, version = _MAGIC_VERSION.unpack_from(head, offset + _PAGE_HEADER)
    if magic != LMDB_MAGIC or version != LMDB_DATA_VERSION:
        return None
    (page_size,) = struct.unpack_from("<I", head, offset + _PAGE_SIZE_OFFSET)
    last_page, txnid = _LAST_PAGE_TXNID.unpack_from(head, offset + _LAST_PAGE_OFFSET)
    if page_size not in _PAGE_SIZES or last_page < 1:
        return None
    return LMDBMeta(page_size=page_size, last_page=last_page, txnid=txnid)


def read_meta(path: str, subdir: bool) -> LMDBMeta:
    """The current meta page of the LMDB at ``path``; refuses a file that cannot be a complete LMDB."""
    name = data_file(path, subdir)
    try:
        size = os.path.getsize(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"LMDB not found: {name}") from None
    if size == 0:
        raise DamagedLMDBError(f"{name}: LMDB data file is empty (0 bytes)")
    with open(name, "rb") as f:
        head = f.read(max(_PAGE_SIZES) + _META_BYTES)
    first = _meta_at(head, 0)
    if first is None:
        magic = _MAGIC_VERSION.unpack_from(head, _PAGE_HEADER) if len(head) >= _PAGE_HEADER + 8 else None
        if magic is not None and magic[0] == LMDB_MAGIC:
            raise DamagedLMDBError(
                f"{name}: LMDB format version {magic[1]} or page size unsupported (expected version "
                f"{LMDB_DATA_VERSION}, as written by py-lmdb)"
            )
        raise DamagedLMDBError(f"{name}: not an LMDB file (no LMDB meta page at its start; {size} bytes)")
    if size < 2 * first.page_size:
        raise DamagedLMDBError(
            f"{name}: LMDB file truncated: {size} bytes, less than its two {first.page_size}-byte meta pages"
        )
    second = _meta_at(head, first.page_size)
    return first if second is None or first.txnid >= second.txnid else second


def check_lmdb_file(path: str, subdir: bool) -> LMDBMeta:
    """Refuse an LMDB whose data file is shorter than its meta page says (reading it would SIGBUS)."""
    meta = read_meta(path, subdir)
    name = data_file(path, subdir)
    size = os.path.getsize(name)
    if size < meta.required_bytes:
        raise DamagedLMDBError(
            f"{name}: LMDB file truncated: {size} bytes, but its meta page says {meta.last_page + 1} "
            f"pages of {meta.page_size} bytes ({meta.required_bytes} bytes)"
        )
    return meta


def _one_line(error: lmdb.Error) -> str:
    return " ".join(str(error).split())


@contextlib.contextmanager
def lmdb_errors_named(path: str) -> Iterator[None]:
    """Turn an ``lmdb.Error`` raised inside the block into a :class:`DamagedLMDBError` naming ``path``."""
    try:
        yield
    except lmdb.Error as error:
        detail = f"{type(error).__name__}: {_one_line(error)}"
        raise DamagedLMDBError(f"{path}: unreadable LMDB ({detail})") from None


def open_checked_readonly(path: str, subdir: bool) -> lmdb.Environment:
    """Check ``path`` against its meta pages, then open it read-only and lock-free."""
    check_lmdb_file(path, subdir)
    with lmdb_errors_named(path):
        return lmdb.open(path, subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False)
