"""Region-feature stores: the ViLBERT feature LMDB and the pretraining LMDB (``docs/data.md`` §1, §2).

Both are read lazily, once per process (an LMDB environment must not cross a fork, and DataLoader
workers receive these objects by pickling), read-only and lock-free, with every value decoded by
the restricted decoders of :mod:`vilbert.datasets.serialization`. Both can also be written, always
atomically (see :mod:`vilbert.datasets.lmdb_writer`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lmdb
import numpy as np

from vilbert.datasets.lmdb_check import check_lmdb_file, lmdb_errors_named, open_checked_readonly
from vilbert.datasets.lmdb_writer import AtomicLMDBWriter, CommitOrAbort
from vilbert.datasets.serialization import (
    UnsafePickleError,
    held_view,
    loads_tensorpack_value,
    loads_tensorpack_view,
    msgpack_dumps,
    safe_pickle_loads,
)
from vilbert.datasets.validation import (
    BadRecordCounter,
    BadRecordError,
    BadRecordPolicy,
    SkippedRecordError,
    check_region_record,
)
from vilbert.errors import BadInputError

__all__ = [
    "LMDBFormatError",
    "MissingImageError",
    "PretrainDatapoint",
    "PretrainingLMDB",
    "PretrainingLMDBWriter",
    "RegionFeatureStore",
    "RegionFeatureWriter",
    "RegionFeatures",
    "Serializer",
    "UnsafePickleError",
    "safe_pickle_loads",
    "write_pretraining_lmdb",
    "write_region_features",
]

logger = logging.getLogger(__name__)

REGION_KEYS_ENTRY = b"keys"
PRETRAIN_KEYS_ENTRY = b"__keys__"
GLOBAL_BOX = np.array([0.0, 0.0, 1.0, 1.0, 1.0], dtype=np.float32)


class MissingImageError(BadInputError, KeyError):
    """An image id that the feature LMDB does not hold (still a KeyError for lookup-style callers)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class LMDBFormatError(BadInputError):
    """An LMDB lacks an entry its format requires, or holds a malformed value."""


# Shared: lazy, per-process, read-only opening.
# One environment per file and process, shared by every reader of that file: LMDB (and py-lmdb's
# guard) forbids opening the same file twice in a process, and an environment inherited through a
# fork must be closed in the child, never used. A file replaced on disk (overwrite) is reopened.
_ENVS: dict[str, tuple[tuple[int, int], lmdb.Environment]] = {}
_ENVS_PID = os.getpid()


def _file_identity(path: str, subdir: bool) -> tuple[int, int]:
    st = os.stat(os.path.join(path, "data.mdb") if subdir else path)
    return st.st_dev, st.st_ino


def _readonly_env(path: str) -> lmdb.Environment:
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        for _, inherited in _ENVS.values():
            inherited.close()
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    subdir = os.path.isdir(path)
    try:
        identity = _file_identity(path, subdir)
    except FileNotFoundError:
        raise FileNotFoundError(f"LMDB not found: {path}") from None
    key = os.path.realpath(path)
    entry = _ENVS.get(key)
    if entry is not None and entry[0] == identity:
        return entry[1]
    env = open_checked_readonly(path, subdir)  # size against its meta pages first: never a SIGBUS
    _ENVS[key] = (identity, env)
    return env


class _LazyLMDB:
    """A reader of ``path`` that opens it on first use, in whichever process uses it.

    Instances hold no environment, so they pickle to DataLoader workers as plain paths.
    """

    def __init__(self, path: str) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"LMDB not found: {path}")
        check_lmdb_file(path, os.path.isdir(path))  # here too, so a damaged file fails before any fork
        self.path = path

    def _get(self, key: bytes) -> bytes | None:
        env = _readonly_env(self.path)
        with lmdb_errors_named(self.path), env.begin(write=False, buffers=False) as txn:
            return txn.get(key)


# docs/data.md §1: region-feature LMDB


@dataclass
class RegionFeatures:
    """One image's regions with the global region (mean of the n region features) at row 0.

    ``features`` [n+1, D] and ``boxes`` [n+1, 5] (normalised x1, y1, x2, y2, relative area) and
    ``pixel_boxes`` [n+1, 4] are float32; ``num_boxes`` = n + 1. ``cls_prob`` [n, C] (real regions
    only, no global row) when the file carries it.
    """

    features: np.ndarray
    boxes: np.ndarray
    pixel_boxes: np.ndarray
    num_boxes: int
    image_h: int
    image_w: int
    cls_prob: np.ndarray | None = None


def _b64_array(item: Mapping[str, Any], field: str, rows: int, what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(item[field])
    except KeyError:
        raise LMDBFormatError(f"{what}: missing field {field!r}") from None
    except (binascii.Error, TypeError, ValueError) as err:
        raise LMDBFormatError(f"{what}: field {field!r} is not valid base64: {err}") from None
    if len(raw) % 4:
        raise LMDBFormatError(f"{what}: field {field!r} holds {len(raw)} bytes, not float32 data")
    array = np.frombuffer(raw, dtype=np.float32)
    if array.size % rows:
        raise LMDBFormatError(f"{what}: field {field!r} has {array.size} floats, not a multiple of {rows}")
    return array.reshape(rows, -1)


def _int_field(item: Mapping[str, Any], field: str, what: str) -> int:
    try:
        return int(item[field])
    except KeyError:
        raise LMDBFormatError(f"{what}: missing field {field!r}") from None
    except (TypeError, ValueError):
        raise LMDBFormatError(f"{what}: field {field!r} is not an integer: {item[field]!r}") from None


def parse_region_item(item: Any, what: str) -> RegionFeatures:
    """Turn one stored dict into :class:`RegionFeatures` (global region prepended, boxes normalised)."""
    if not isinstance(item, dict):
        raise LMDBFormatError(f"{what}: expected a dict, got {type(item).__name__}")
    image_h = _int_field(item, "image_h", what)
    image_w = _int_field(item, "image_w", what)
    n = _int_field(item, "num_boxes", what)
    if n <= 0 or image_h <= 0 or image_w <= 0:
        raise BadRecordError(f"{what}: needs num_boxes, image_h, image_w > 0, got {n}, {image_h}, {image_w}")
    boxes = _b64_array(item, "boxes", n, what)
    if boxes.shape[1] != 4:
        raise LMDBFormatError(f"{what}: boxes have {boxes.shape[1]} columns, expected 4")
    features = _b64_array(item, "features", n, what)
    cls_prob = _b64_array(item, "cls_prob", n, what).copy() if "cls_prob" in item else None
    check_region_record(what, features, boxes, image_w, image_h, n, cls_prob)

    with np.errstate(over="ignore"):  # an overflow is reported below, as a damaged record
        global_feature = features.mean(axis=0, dtype=np.float32, keepdims=True)
    if not np.isfinite(global_feature).all():
        raise BadRecordError(f"{what}: the global feature (mean of its {n} regions) overflows float32")
    scale = np.array([image_w, image_h, image_w, image_h], dtype=np.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / np.float32(image_w * image_h)
    normalised = np.concatenate([boxes / scale, area[:, None]], axis=1).astype(np.float32)
    return RegionFeatures(
        features=np.concatenate([global_feature, features], axis=0),
        boxes=np.concatenate([GLOBAL_BOX[None], normalised], axis=0),
        pixel_boxes=np.concatenate([np.array([[0, 0, image_w, image_h]], dtype=np.float32), boxes], axis=0),
        num_boxes=n + 1,
        image_h=image_h,
        image_w=image_w,
        cls_prob=cls_prob,
    )


class RegionFeatureStore(_LazyLMDB):
    """Read-only view of a ViLBERT region-feature LMDB, looked up by image id (never by scanning).

    With ``in_memory=True`` decoded images are kept in a dict; their arrays are then made read-only
    so that a caller mutating one cannot corrupt later reads.

    Every decoded image is checked (:func:`~vilbert.datasets.validation.check_region_record`). A
    damaged one is refused with an error naming the file and key (``on_bad_record="error"``), or,
    under ``"skip"``, warned about once (counted) and raised as ``SkippedRecordError`` on every
    read, which the training datasets answer by taking another sample.
    """

    def __init__(self, path: str, in_memory: bool = False, on_bad_record: BadRecordPolicy = "error") -> None:
        super().__init__(path)
        self.in_memory = in_memory
        self.bad_records = BadRecordCounter(on_bad_record)
        self._cache: dict[str, RegionFeatures] = {}
        self._skipped: dict[str, str] = {}
        self._ids: list[str] | None = None

    def image_ids(self) -> list[str]:
        """All image ids (as strings), in the order of the file's ``keys`` entry."""
        if self._ids is None:
            raw = self._get(REGION_KEYS_ENTRY)
            if raw is None:
                raise LMDBFormatError(f"{self.path}: no b'keys' entry; not a region-feature LMDB")
            keys = safe_pickle_loads(raw, f"{self.path} key {REGION_KEYS_ENTRY!r}")
            if not isinstance(keys, list):
                raise LMDBFormatError(f"{self.path}: {REGION_KEYS_ENTRY!r} entry is not a list")
            self._ids = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
        return list(self._ids)

    def __len__(self) -> int:
        if self._ids is None:
            self.image_ids()
        assert self._ids is not None
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        key = str(image_id).encode()
        return key != REGION_KEYS_ENTRY and self._get(key) is not None

    def __getitem__(self, image_id: int | str) -> RegionFeatures:
        name = str(image_id)
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if name in self._skipped:
            raise SkippedRecordError(self._skipped[name])
        key = name.encode()
        raw = self._get(key) if key != REGION_KEYS_ENTRY else None
        if raw is None:
            raise MissingImageError(f"image id {name!r} not found in region-feature LMDB {self.path}")
        what = f"{self.path} key {key!r}"
        try:
            regions = parse_region_item(safe_pickle_loads(raw, what), what)
        except (BadRecordError, LMDBFormatError) as error:
            skipped = self.bad_records.handle(error)
            self._skipped[name] = str(skipped)
            raise skipped from None
        if self.in_memory:
            for array in (regions.features, regions.boxes, regions.pixel_boxes, regions.cls_prob):
                if array is not None:
                    array.flags.writeable = False
            self._cache[name] = regions
        return regions


def _float32_rows(
    record: Mapping[str, Any], field: str, rows: int, cols: int | None, what: str
) -> np.ndarray:
    array = np.ascontiguousarray(record[field], dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != rows or (cols is not None and array.shape[1] != cols):
        expected = f"[{rows}, {cols if cols is not None else 'D'}]"
        raise BadInputError(f"{what}: {field} has shape {list(array.shape)}, expected {expected}")
    return array


def _b64(array: np.ndarray) -> bytes:
    return base64.b64encode(array.tobytes())


def _plain_image_id(image_id: Any) -> int | str:
    # numpy integers would pickle as numpy scalars, which the restricted reader refuses.
    if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
        return int(image_id)
    return str(image_id)


class RegionFeatureWriter(CommitOrAbort):
    """Writes the ``docs/data.md`` §1 format record by record (a directory LMDB; ``keys`` written
    last, at commit)."""

    def __init__(self, path: str, overwrite: bool = False) -> None:
        self.path = path
        self._writer = AtomicLMDBWriter(path, subdir=True, overwrite=overwrite)
        self._keys: list[bytes] = []
        self._seen: set[bytes] = set()

    def add(self, record: Mapping[str, Any]) -> None:
        """Add one image: ``image_id, image_h, image_w, num_boxes, boxes [n,4], features [n,D]``
        and optionally ``cls_prob [n,C]``."""
        image_id = _plain_image_id(record["image_id"])
        what = f"{self.path}: image {image_id!r}"
        key = str(image_id).encode()
        if key == REGION_KEYS_ENTRY or key in self._seen:
            raise BadInputError(f"{what}: duplicate or reserved image id")
        n = int(record["num_boxes"])
        item: dict[str, Any] = {
            "image_id": image_id,
            "image_h": int(record["image_h"]),
            "image_w": int(record["image_w"]),
            "num_boxes": n,
            "boxes": _b64(_float32_rows(record, "boxes", n, 4, what)),
            "features": _b64(_float32_rows(record, "features", n, None, what)),
        }
        if record.get("cls_prob") is not None:
            item["cls_prob"] = _b64(_float32_rows(record, "cls_prob", n, None, what))
        self._writer.put(key, pickle.dumps(item))
        self._keys.append(key)
        self._seen.add(key)

    def commit(self) -> int:
        """Write the ``keys`` entry and move the LMDB into place; returns the number of images."""
        self._writer.put(REGION_KEYS_ENTRY, pickle.dumps(self._keys))
        self._writer.commit()
        logger.info("wrote %d images to %s", len(self._keys), self.path)
        return len(self._keys)

    def abort(self) -> None:
        self._writer.abort()


def write_region_features(path: str, records: Iterable[Mapping[str, Any]], overwrite: bool = False) -> int:
    """Write a ``docs/data.md`` §1 region-feature LMDB from ``records``; returns the number of images
    written."""
    writer = RegionFeatureWriter(path, overwrite=overwrite)
    try:
        for record in records:
            writer.add(record)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


# docs/data.md §2: pretraining LMDB (tensorpack LMDBSerializer layout, read and written without tensorpack)


@dataclass
class PretrainDatapoint:
    """One Conceptual Captions image: regions [n, D], detector classes [n, C], pixel boxes [n, 4]."""

    features: np.ndarray
    cls_prob: np.ndarray
    boxes: np.ndarray
    num_boxes: int
    image_h: int
    image_w: int
    image_id: str
    caption: str

    def to_list(self) -> list[Any]:
        """The 8-element list stored on disk (the published datapoint order)."""
        return [
            np.ascontiguousarray(self.features, dtype=np.float32),
            np.ascontiguousarray(self.cls_prob, dtype=np.float32),
            np.ascontiguousarray(self.boxes, dtype=np.float32),
            int(self.num_boxes),
            int(self.image_h),
            int(self.image_w),
            str(self.image_id),
            str(self.caption),
        ]

    @classmethod
    def from_list(cls, value: Any, what: str) -> PretrainDatapoint:
        if not isinstance(value, (list, tuple)) or len(value) != 8:
            raise LMDBFormatError(f"{what}: expected an 8-element datapoint list")
        features, cls_prob, boxes, num_boxes, image_h, image_w, image_id, caption = value
        try:
            return cls(
                features=np.array(features, dtype=np.float32),
                cls_prob=np.array(cls_prob, dtype=np.float32),
                boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                num_boxes=int(num_boxes),
                image_h=int(image_h),
                image_w=int(image_w),
                image_id=image_id.decode() if isinstance(image_id, bytes) else str(image_id),
                caption=caption.decode() if isinstance(caption, bytes) else str(caption),
            )
        except (TypeError, ValueError) as err:
            raise LMDBFormatError(f"{what}: malformed datapoint: {err}") from None


class PretrainingLMDB(_LazyLMDB):
    """Random access to a tensorpack ``LMDBSerializer`` file (single file or directory)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._keys: list[bytes] | None = None
        self._env: tuple[int, lmdb.Environment] | None = None  # (pid, environment); never pickled

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_env": None}

    def keys(self) -> list[bytes]:
        if self._keys is None:
            raw = self._get(PRETRAIN_KEYS_ENTRY)
            if raw is None:
                raise LMDBFormatError(
                    f"{self.path}: no {PRETRAIN_KEYS_ENTRY!r} entry; not a tensorpack LMDBSerializer file"
                )
            keys = loads_tensorpack_value(raw, f"{self.path} key {PRETRAIN_KEYS_ENTRY!r}")
            if not isinstance(keys, list):
                raise LMDBFormatError(f"{self.path}: {PRETRAIN_KEYS_ENTRY!r} entry is not a list")
            self._keys = [k if isinstance(k, bytes) else str(k).encode() for k in keys]
        return self._keys

    def __len__(self) -> int:
        return len(self.keys())

    def __getitem__(self, index: int) -> PretrainDatapoint:
        """Datapoint ``index`` with arrays of its own (writable); :meth:`view` is the zero-copy read."""
        point = self.view(index)
        for name in ("features", "cls_prob", "boxes"):
            array = getattr(point, name)
            if not array.flags.writeable:
                setattr(point, name, np.array(array))
        return point

    def view(self, index: int) -> PretrainDatapoint:
        """Datapoint ``index`` whose arrays are read-only views of the memory map (each holds its read
        transaction open): what the pretraining dataset reads, copying each sample once, into the batch."""
        return self.views([index])[0]

    def views(self, indices: Sequence[int]) -> list[PretrainDatapoint]:
        """:meth:`view` of each index, all read in one transaction (the batch of a DataLoader worker)."""
        keys = self.keys()
        for index in indices:
            if not -len(keys) <= index < len(keys):
                raise IndexError(f"index {index} out of range for {self.path} ({len(keys)} datapoints)")
        if self._env is None or self._env[0] != os.getpid():
            self._env = (os.getpid(), _readonly_env(self.path))
        # Zero-copy: the arrays are read-only views of the memory map that hold their transaction.
        with lmdb_errors_named(self.path):
            txn = self._env[1].begin(write=False, buffers=True)
            raws = [(keys[index], txn.get(keys[index])) for index in indices]
        return [self._decode_view(key, raw, txn) for key, raw in raws]

    def _decode_view(self, key: bytes, raw: memoryview | None, txn: lmdb.Transaction) -> PretrainDatapoint:
        if raw is None:
            raise LMDBFormatError(f"{self.path}: key {key!r} is listed in __keys__ but missing")
        what = f"{self.path} key {key!r}"
        value = loads_tensorpack_view(held_view(raw, txn), what)
        if isinstance(value, list) and len(value) == 8:
            features, cls_prob, boxes, num_boxes, image_h, image_w, image_id, caption = value
            arrays = (features, cls_prob, boxes)
            plain = all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays)
            plain = plain and all(type(v) is int for v in (num_boxes, image_h, image_w))
            if plain and boxes.size % 4 == 0 and isinstance(image_id, str) and isinstance(caption, str):
                return PretrainDatapoint(
                    features, cls_prob, boxes.reshape(-1, 4), num_boxes, image_h, image_w, image_id, caption
                )
        return PretrainDatapoint.from_list(value, what)  # other layouts: converted (and copied) there


Serializer = Literal["msgpack", "pickle"]


class PretrainingLMDBWriter(CommitOrAbort):
    """Writes the tensorpack layout: keys ``b"00000000"``… then ``b"__keys__"`` at commit."""

    def __init__(
        self, path: str, serializer: Serializer = "msgpack", overwrite: bool = False, subdir: bool = False
    ) -> None:
        if serializer not in ("msgpack", "pickle"):
            raise BadInputError(f"unknown serializer {serializer!r}; use 'msgpack' or 'pickle'")
        self.path = path
        self._dumps = msgpack_dumps if serializer == "msgpack" else _pickle_dumps
        self._writer = AtomicLMDBWriter(path, subdir=subdir, overwrite=overwrite)
        self._keys: list[bytes] = []

    def add(self, datapoint: PretrainDatapoint) -> None:
        key = f"{len(self._keys):08d}".encode("ascii")
        self._writer.put(key, self._dumps(datapoint.to_list()))
        self._keys.append(key)

    def commit(self) -> int:
        self._writer.put(PRETRAIN_KEYS_ENTRY, self._dumps(self._keys))
        self._writer.commit()
        logger.info("wrote %d datapoints to %s", len(self._keys), self.path)
        return len(self._keys)

    def abort(self) -> None:
        self._writer.abort()


def _pickle_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def write_pretraining_lmdb(
    path: str,
    datapoints: Iterable[PretrainDatapoint],
    serializer: Serializer = "msgpack",
    overwrite: bool = False,
    subdir: bool = False,
) -> int:
    """Write a ``docs/data.md`` §2 pretraining LMDB (single file by default, as tensorpack does);
    returns the count."""
    writer = PretrainingLMDBWriter(path, serializer=serializer, overwrite=overwrite, subdir=subdir)
    try:
        for datapoint in datapoints:
            writer.add(datapoint)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def check_images_present(
    image_ids: Sequence[int | str], features: RegionFeatureStore, annotations_path: str
) -> None:
    """Fail at construction, not mid-epoch, when an annotated image has no features (one pass over the
    LMDB's key list, not one value read per image)."""
    available = set(features.image_ids())
    for image_id in image_ids:
        if str(image_id) not in available:
            raise MissingImageError(
                f"image {image_id} of {annotations_path} is not in the region-feature LMDB {features.path}"
            )
