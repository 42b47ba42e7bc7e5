"""Safe decoding of feature-file values: a downloaded LMDB must never be able to run code.

Pickle: plain containers and scalars (dict, list, tuple, str, bytes, int, float, bool, None) are built by
pickle opcodes without any global lookup, so refusing every ``find_class`` admits exactly those.
Two globals are allowed on top:

- ``_codecs.encode`` with the latin-1 codec, which protocol-2 pickles use to spell ``bytes``;
- with ``allow_numpy=True`` only, the numpy reconstruction functions needed for plain (non-object)
  ndarrays and scalars, as written by tensorpack >= 0.10's pickle serializer.

Msgpack. tensorpack 0.9 wrote msgpack + msgpack-numpy; msgpack-numpy's own decode hook calls
``pickle.loads`` on object arrays, so the hook here reads the same ``{b"nd": ...}`` layout itself and
refuses object dtypes.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack
import msgpack_numpy
import numpy as np

from vilbert.errors import BadInputError

try:  # numpy >= 2 moved the implementation modules under numpy._core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


class UnsafePickleError(BadInputError):
    """A pickle asked for a global outside the allow-list (or was not a pickle at all)."""


def _refuse_object_dtype(dtype: np.dtype) -> np.dtype:
    # Object arrays would let a pickle smuggle arbitrary objects (or raw pointers) back in.
    if dtype.hasobject:
        raise UnsafePickleError(f"numpy object dtype {dtype} is not allowed")
    return dtype


def _safe_dtype(*args: Any) -> np.dtype:
    return _refuse_object_dtype(np.dtype(*args))


def _safe_reconstruct(subtype: type, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"ndarray subclass {subtype!r} is not allowed")
    return _multiarray._reconstruct(subtype, shape, _refuse_object_dtype(np.dtype(dtype)))


def _safe_frombuffer(buf: Any, dtype: np.dtype, shape: Any, order: str) -> np.ndarray:
    return _numeric._frombuffer(buf, _refuse_object_dtype(np.dtype(dtype)), shape, order)


def _safe_scalar(dtype: np.dtype, *args: Any) -> Any:
    return _multiarray.scalar(_refuse_object_dtype(dtype), *args)


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, encoding, errors)


_PLAIN_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {("_codecs", "encode"): _latin1_encode}

_NUMPY_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, allowed: dict[tuple[str, str], Callable[..., Any]]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"global {module}.{name} is not allowed") from None


def safe_pickle_loads(data: bytes, what: str, allow_numpy: bool = False) -> Any:
    """Unpickle ``data`` admitting only plain containers/scalars (plus ndarrays with ``allow_numpy``).

    ``what`` names the source (e.g. ``"features.lmdb key b'42'"``) for the error message.
    """
    allowed = {**_PLAIN_GLOBALS, **_NUMPY_GLOBALS} if allow_numpy else _PLAIN_GLOBALS
    try:
        return _RestrictedUnpickler(io.BytesIO(data), allowed).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{what}: refusing unsafe pickle: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as err:
        raise UnsafePickleError(f"{what}: not a valid pickle: {err}") from None


def _field(obj: dict, name: str, default: Any = None) -> Any:
    # msgpack-numpy writes bytes keys; very old writers used str keys.
    key = name.encode()
    return obj[key] if key in obj else obj.get(name, default)


def _as_str(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _msgpack_numpy_hook(obj: dict) -> Any:
    """Decode msgpack-numpy's ``{b"nd": ...}`` / ``{b"complex": ...}`` maps without ever unpickling."""
    if b"nd" in obj or "nd" in obj:
        kind = _as_str(_field(obj, "kind", ""))
        if kind == "O":
            raise UnsafePickleError("msgpack-numpy object array (stored as a pickle) is not allowed")
        descr = _field(obj, "type")
        if kind == "V":
            descr = [tuple(_as_str(t) for t in d) for d in descr]
        dtype = _refuse_object_dtype(np.dtype(_as_str(descr)))
        data = _field(obj, "data")
        if _field(obj, "nd") is True:
            return np.frombuffer(data, dtype=dtype).reshape(_field(obj, "shape"))
        return np.frombuffer(data, dtype=dtype)[0]
    if b"complex" in obj or "complex" in obj:
        return complex(_as_str(_field(obj, "data")))
    return obj


def safe_msgpack_loads(data: bytes, what: str) -> Any:
    """Decode a msgpack (+ msgpack-numpy) value as tensorpack 0.9 wrote it; ``what`` names the source."""
    try:
        return msgpack.unpackb(data, raw=False, object_hook=_msgpack_numpy_hook, strict_map_key=False)
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{what}: {err}") from None
    except (msgpack.UnpackException, ValueError, TypeError) as err:
        raise UnsafePickleError(f"{what}: not a valid msgpack value: {err}") from None


def msgpack_dumps(obj: Any) -> bytes:
    """Encode as tensorpack 0.9's ``dumps_msgpack``: ``use_bin_type=True`` with numpy support."""
    return msgpack.packb(obj, use_bin_type=True, default=msgpack_numpy.encode)


class _TransactionBytes:
    """Bytes of a memory map exposed to numpy, holding ``owner`` (a read transaction) while in use."""

    __slots__ = ("__array_interface__", "_owner")

    def __init__(self, view: memoryview, owner: object) -> None:
        address = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
        self.__array_interface__ = {
            "shape": (len(view),),
            "typestr": "|u1",
            "data": (address, True),
            "version": 3,
        }
        self._owner = owner


def held_view(view: memoryview, owner: object) -> memoryview:
    """A read-only view of ``view`` that keeps ``owner`` alive for as long as anything made from it.

    An LMDB buffer is valid only while its transaction is open; arrays decoded from the returned
    view (see :func:`loads_tensorpack_view`) keep the transaction, hence the mapping, alive.
    """
    if not len(view):
        return memoryview(b"")
    return memoryview(np.asarray(_TransactionBytes(view, owner)))


class _NotPlainLayout(Exception):
    """Internal: a value not in the published datapoint layout (the general decoder takes it)."""


_DATAPOINT_LIST = 0x98  # fixarray of 8: features, cls_prob, boxes, num_boxes, image_h, image_w, id, caption
_NDARRAY_MAP = 0x85  # msgpack-numpy's map: nd, type, kind, shape, data (data last)
_DATA_KEY = b"\xc4\x04data"
_EMPTY_BIN = b"\xc4\x00"
_BIN_LENGTH = {0xC4: struct.Struct(">B"), 0xC5: struct.Struct(">H"), 0xC6: struct.Struct(">I")}
_HEADER_BYTES = 256  # a msgpack-numpy map's fields before its data are far shorter
_MAX_CACHED_HEADERS = 4096
_NDARRAY_FIELDS = frozenset({b"nd", b"type", b"kind", b"shape", b"data"})


class _ArrayHeader(NamedTuple):
    """What the fields of one msgpack-numpy map say: dtype, shape, and where its data starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    length: int  # bytes of data
    size: int  # bytes of the map before its data


# A dataset's arrays share a handful of headers (one per dtype and shape): the same bytes always
# decode to the same fields, so each distinct header is parsed and checked once.
_HEADERS: dict[bytes, _ArrayHeader] = {}


def _parse_header(head: bytes, cut: int, length_format: struct.Struct) -> _ArrayHeader:
    """The fields of the map whose bytes up to its data's bin header are ``head[:cut]``."""
    (length,) = length_format.unpack_from(head, cut + 1)
    fields = msgpack.unpackb(head[:cut] + _EMPTY_BIN, raw=False, strict_map_key=False)
    if fields.keys() != _NDARRAY_FIELDS or fields[b"nd"] is not True or fields[b"kind"] != b"":
        raise _NotPlainLayout("not a plain msgpack-numpy array")  # e.g. structured dtypes
    dtype, shape = _array_dtype(fields[b"type"]), fields[b"shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _NotPlainLayout("array shape is not a list of sizes")
    if dtype.itemsize == 0 or math.prod(shape) * dtype.itemsize != length:
        raise _NotPlainLayout("array data does not match its shape")
    return _ArrayHeader(dtype, tuple(shape), length, cut + 1 + length_format.size)


def _ndarray_view(view: memoryview, pos: int) -> tuple[np.ndarray, int]:
    """The msgpack-numpy array at ``pos`` as a view of ``view``, and the position after it.

    The small fields before the data are decoded by msgpack itself, with the data replaced by an
    empty bin: msgpack must read exactly that prefix as one 5-entry map, so the fields are those of
    the real value, whose data then starts right after the bin header.
    """
    head = bytes(view[pos : pos + _HEADER_BYTES])
    cut = head.find(_DATA_KEY) + len(_DATA_KEY)
    if head[:1] != bytes([_NDARRAY_MAP]) or cut < len(_DATA_KEY) or cut >= len(head):
        raise _NotPlainLayout("not a msgpack-numpy array")
    length_format = _BIN_LENGTH.get(head[cut])
    if length_format is None or cut + 1 + length_format.size > len(head):
        raise _NotPlainLayout("array data is not a bin")
    key = head[: cut + 1 + length_format.size]  # every byte before the data
    header = _HEADERS.get(key)
    if header is None:
        header = _parse_header(head, cut, length_format)
        if len(_HEADERS) >= _MAX_CACHED_HEADERS:
            _HEADERS.clear()
        _HEADERS[key] = header
    start = pos + header.size
    if start + header.length > len(view):
        raise _NotPlainLayout("array data does not match its shape")
    data = np.frombuffer(view, dtype=header.dtype, count=header.length // header.dtype.itemsize, offset=start)
    return data.reshape(header.shape), start + header.length


def _array_dtype(name: Any) -> np.dtype:
    if not isinstance(name, str):
        raise _NotPlainLayout("dtype is not a string")
    return _refuse_object_dtype(np.dtype(name))


def _datapoint_view(view: memoryview) -> list[Any]:
    if view[0] != _DATAPOINT_LIST:
        raise _NotPlainLayout("not an 8-element list")
    arrays, pos = [], 1
    for _ in range(3):
        array, pos = _ndarray_view(view, pos)
        arrays.append(array)
    # The scalars may be msgpack-numpy maps too (numpy ints written by older tools).
    rest = msgpack.unpackb(
        b"\x95" + bytes(view[pos:]), raw=False, strict_map_key=False, object_hook=_msgpack_numpy_hook
    )
    return [*arrays, *rest]


def loads_tensorpack_view(data: memoryview, what: str) -> Any:
    """:func:`loads_tensorpack_value` for a buffer (an LMDB memory map), without copying array data.

    A pretraining datapoint in the published msgpack layout (three msgpack-numpy arrays, then
    scalars and strings) is decoded with its arrays as read-only views of ``data``, which must stay
    valid while they are used (see :func:`held_view`). Anything else (pickles, other layouts,
    damaged values) goes through the general decoders, which copy and name ``what`` in errors.
    """
    view = memoryview(data)
    if len(view) and view[0] == _DATAPOINT_LIST:
        try:
            return _datapoint_view(view)
        except (_NotPlainLayout, msgpack.UnpackException, ValueError, TypeError):
            pass  # outside the published layout, or damaged: the general decoder decides and names it
    return loads_tensorpack_value(bytes(view), what)


def loads_tensorpack_value(data: bytes, what: str) -> Any:
    """Decode a tensorpack LMDBSerializer value: pickle (first byte 0x80, tensorpack >= 0.10) or msgpack."""
    if data[:1] == b"\x80":
        return safe_pickle_loads(data, what, allow_numpy=True)
    return safe_msgpack_loads(data, what)
