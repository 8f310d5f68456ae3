"""Saving and loading: ``save``/``load`` (files) and ``dumps``/``loads`` (bytes) on msgpack.

Model state_dicts, optimizer state and QAT checkpoints are all stored with these four
functions. Nothing is pickled: loading runs no code from the file and imports nothing it
names; the file can only produce the value types listed below.

File format, version 1 (every integer little-endian)::

    offset  size  field
         0     8  magic b"QATCSAVE"
         8     2  format version, uint16 = 1
        10     2  flags, uint16 = 0 (version 1 defines no flags)
        12     8  payload length n in bytes, uint64
        20     4  CRC-32 of the payload (zlib.crc32), uint32
        24     n  payload: exactly one msgpack object

How values map onto msgpack:

- None, bool, int (-2**63 <= i < 2**64), float (always float64), str (UTF-8) and bytes
  (bin) are msgpack's own types;
- an int outside that range (a random generator's 128-bit state, say) -> ext 4 whose
  data is the value in two's complement, little-endian, at most 1024 bytes;
- list -> array; dict -> map in insertion order, keys str or int;
- tuple -> array whose first element is ext 1 with empty data (the tuple marker),
  followed by the items;
- numpy.ndarray -> ext 2, whose data is a msgpack header ``[dtype, shape]`` (dtype a
  string such as ``"<f4"`` or ``"|b1"``, shape a list of non-negative ints) followed by
  the elements' raw bytes in C order, little-endian;
- numpy scalar -> ext 3, laid out like ext 2 with shape ``[]``.

Guarantees:

- Round trips are exact: same Python types (tuple stays tuple, ``np.float32`` stays
  ``np.float32``), same bits (NaN payloads, -0.0), same dict order. Arrays come back
  C-contiguous, little-endian, writable and owning their memory; Fortran-order,
  strided and big-endian arrays are stored by value.
- ``save`` writes atomically: the object is serialized in memory first, written to a
  temporary file in the target's directory, fsynced and renamed over the target. A
  failed save leaves no file behind and an existing file untouched.
- Every malformed input (wrong magic, unknown version, truncation, trailing bytes, bad
  checksum, and, checksum or not, any malformed payload) raises
  :class:`~qatcore.errors.SerializationError`. Memory allocated while loading is bounded
  by what the file's bytes justify: msgpack's length limits are set to the payload
  size, and an array's declared shape must match its data before anything is allocated.

Limits: containers nest at most 256 deep, arrays have at most 32 dimensions, and an
array or bytes value holds less than 4 GiB (msgpack's ext32/bin32 length field).
"""

from __future__ import annotations

import contextlib
import math
import os
import reprlib
import secrets
import struct
import sys
import zlib
from itertools import islice
from typing import Any

import msgpack
import numpy as np

from qatcore.errors import SerializationError

__all__ = ["dumps", "load", "loads", "save", "write_atomically"]

_MAGIC = b"QATCSAVE"
_FORMAT_VERSION = 1
_READABLE_VERSIONS = (1,)
_HEADER = struct.Struct("<8sHHQI")  # magic, version, flags, payload length, crc32

_MAX_DEPTH = 256
_MAX_NDIM = 32
_MAX_MSGPACK_LEN = 2**32 - 1  # longest bin/ext msgpack can frame
_MAX_ARRAY_HEADER_BYTES = 512  # [dtype, 32 uint64 dims] packs to under 320 bytes

_EXT_TUPLE = 1
_EXT_NDARRAY = 2
_EXT_NUMPY_SCALAR = 3
_EXT_BIG_INT = 4
_MAX_BIG_INT_BYTES = 1024
_TUPLE_MARKER_EXT = msgpack.ExtType(_EXT_TUPLE, b"")

# The whitelist of storable dtypes, keyed by their little-endian dtype string.
_DTYPES: dict[str, np.dtype] = {
    dtype.str: dtype
    for dtype in (
        np.dtype(name).newbyteorder("<")
        for name in (
            "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "float16", "float32", "float64",
        )
    )
}

_ACCEPTED = (
    "qatcore.save accepts None, bool, int (64-bit), float, str, bytes, list, tuple, "
    "dict with str or int keys, and numpy arrays and scalars of dtype bool, int8-int64, "
    "uint8-uint64, float16, float32 or float64; convert tensors with Tensor.numpy() first"
)


# --------------------------------------------------------------------------- saving


def _format_path(path: list) -> str:
    parts = [f"[{key!r}]" for key in path]
    if len(parts) > 16:
        parts = parts[:8] + [f"...{len(parts) - 14} more..."] + parts[-6:]
    return "obj" + "".join(parts)


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _check_int(value: int, path: list, what: str) -> None:
    if not -(2**63) <= value < 2**64:
        # repr of a huge int is slow and, past 4300 digits, refused by Python itself.
        shown = f"{value!r}" if value.bit_length() <= 128 else f"of {value.bit_length()} bits"
        raise SerializationError(
            f"cannot save {_format_path(path)}: {what} {shown} is outside the "
            f"64-bit range [-2**63, 2**64 - 1] msgpack can store"
        )


def _check_str(value: str, path: list, what: str) -> None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SerializationError(
                f"cannot save {_format_path(path)}: {what} is not valid Unicode ({e.reason} at "
                f"index {e.start}); only strings that encode to UTF-8 can be stored"
            ) from e


def _encode_array(array: np.ndarray, code: int, path: list) -> msgpack.ExtType:
    little_endian = array.dtype.newbyteorder("<")
    if little_endian.str not in _DTYPES:
        kind = "numpy array" if code == _EXT_NDARRAY else "numpy scalar"
        raise SerializationError(
            f"cannot save {_format_path(path)}: {kind} of dtype {array.dtype} is not "
            f"supported; {_ACCEPTED}"
        )
    header = msgpack.packb([little_endian.str, list(array.shape)])
    raw = array.astype(little_endian, copy=False).tobytes(order="C")
    if len(header) + len(raw) > _MAX_MSGPACK_LEN:
        raise SerializationError(
            f"cannot save {_format_path(path)}: the array holds {len(raw)} bytes; "
            f"one array must stay under 4 GiB (split it into several arrays)"
        )
    return msgpack.ExtType(code, header + raw)


def _encode(obj: Any, path: list, depth: int) -> Any:
    """obj as plain msgpack values (tuples and numpy values become ExtTypes), checking
    every type on the way; ``path`` holds the keys and indices leading to obj."""
    kind = type(obj)
    # Exact type checks: a subclass (IntEnum, OrderedDict, namedtuple, np.float64,
    # which subclasses float) would not come back as itself.
    if obj is None or kind is bool or kind is float:
        return obj
    if kind is int:
        if -(2**63) <= obj < 2**64:
            return obj
        size = obj.bit_length() // 8 + 1  # + 1: room for the sign bit
        if size > _MAX_BIG_INT_BYTES:
            raise SerializationError(
                f"cannot save {_format_path(path)}: int of {obj.bit_length()} bits is larger "
                f"than the {8 * _MAX_BIG_INT_BYTES} bits qatcore stores"
            )
        return msgpack.ExtType(_EXT_BIG_INT, obj.to_bytes(size, "little", signed=True))
    if kind is str:
        _check_str(obj, path, "str")
        return obj
    if kind is bytes:
        if len(obj) > _MAX_MSGPACK_LEN:
            raise SerializationError(f"cannot save {_format_path(path)}: bytes of 4 GiB or more")
        return obj
    if kind is np.ndarray:
        return _encode_array(obj, _EXT_NDARRAY, path)
    if isinstance(obj, np.generic):
        array = np.asarray(obj)
        dtype = _DTYPES.get(array.dtype.newbyteorder("<").str)
        if dtype is not None and kind is not dtype.type:
            # np.longlong and np.int64 share a dtype; only the latter comes back.
            raise SerializationError(
                f"cannot save {_format_path(path)}: numpy scalar type {_type_name(obj)} would "
                f"load as {_type_name(dtype.type(0))}; convert it first"
            )
        return _encode_array(array, _EXT_NUMPY_SCALAR, path)
    if kind is list or kind is tuple or kind is dict:
        if depth >= _MAX_DEPTH:
            raise SerializationError(
                f"cannot save {_format_path(path)}: containers nest deeper than {_MAX_DEPTH} "
                f"levels (does the object contain itself?)"
            )
        if kind is dict:
            return _encode_dict(obj, path, depth)
        encoded = [_TUPLE_MARKER_EXT] if kind is tuple else []
        for index, item in enumerate(obj):
            path.append(index)
            encoded.append(_encode(item, path, depth + 1))
            path.pop()
        return encoded
    hint = ""
    if isinstance(obj, (int, float, str, bytes, list, tuple, dict)):
        hint = " (subclasses of the accepted types would load as the base type)"
    raise SerializationError(
        f"cannot save {_format_path(path)}: type {_type_name(obj)} is not supported{hint}; "
        f"{_ACCEPTED}"
    )


def _encode_dict(obj: dict, path: list, depth: int) -> dict:
    encoded = {}
    for key, value in obj.items():
        key_kind = type(key)
        if key_kind is not str and key_kind is not int:
            raise SerializationError(
                f"cannot save {_format_path(path)}: dict key {reprlib.repr(key)} has type "
                f"{_type_name(key)}; keys must be str or int"
            )
        path.append(key)
        if key_kind is int:
            _check_int(key, path, "dict key")
        else:
            _check_str(key, path, "dict key")
        encoded[key] = _encode(value, path, depth + 1)
        path.pop()
    return encoded


def dumps(obj: Any) -> bytes:
    """Serialize ``obj`` to the bytes of a qatcore file (see the module docstring).

    Args:
        obj: None, bool, int, float, str, bytes, list, tuple, dict (str or int keys) or
            numpy array/scalar of a supported dtype, nested at most 256 deep.

    Returns:
        the whole file: 24-byte header followed by the msgpack payload.

    Raises:
        SerializationError: naming where in ``obj`` an unsupported value sits.

    >>> import numpy as np
    >>> data = dumps({"scale": np.float32(0.5), "shape": (2, 3)})
    >>> data[:8]
    b'QATCSAVE'
    >>> loads(data)
    {'scale': np.float32(0.5), 'shape': (2, 3)}
    """
    encoded = _encode(obj, [], 0)
    try:
        payload = msgpack.packb(encoded, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as e:  # _encode should have caught it
        raise SerializationError(f"cannot save obj: msgpack refused it ({e})") from e
    header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, 0, len(payload), zlib.crc32(payload))
    return header + payload


def _as_path(path: Any) -> str:
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
        if isinstance(path, str):
            return path
    raise SerializationError(f"path must be a str or os.PathLike of str, got {_type_name(path)}")


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable. Not every platform can open a directory
    # (Windows cannot), so this is best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to the file ``path`` atomically (see the module docstring).

    The whole file is built in memory first, so an unsupported value leaves no file
    behind; it is then written to a temporary file next to ``path``, fsynced and
    renamed over ``path``. An existing file at ``path`` is replaced only on success.

    Args:
        obj: a value :func:`dumps` accepts.
        path: str or os.PathLike; its directory must exist.

    Raises:
        SerializationError: for an unsupported value (naming where it sits), a missing
            directory or a failed write.

    >>> import os, tempfile
    >>> import numpy as np
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "ckpt.qat")
    ...     save({"step": 3, "weight": np.arange(3, dtype=np.float32)}, path)
    ...     state = load(path)
    >>> state
    {'step': 3, 'weight': array([0., 1., 2.], dtype=float32)}
    """
    write_atomically(dumps(obj), path)


def write_atomically(data: bytes, path) -> None:
    """Write ``data`` to ``path`` so that the file is either the old one or all of the new
    one, never a part: a temporary file beside it, fsynced, then renamed over it.

    Raises:
        SerializationError: a missing directory or a failed write (the temporary is removed).
    """
    target = _as_path(path)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise SerializationError(
            f"cannot save to {target!r}: directory {directory!r} does not exist"
        )
    temporary = os.path.join(
        directory, f".{os.path.basename(target)}.{secrets.token_hex(8)}.tmp"
    )
    created = False
    try:
        # "x": never clobber a file we did not create; mode 0o666 minus the umask,
        # like any new file (tempfile.mkstemp would force 0o600).
        with open(temporary, "xb") as file:
            created = True
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException as e:  # also KeyboardInterrupt: never leave the temporary behind
        if created:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        if isinstance(e, OSError):
            raise SerializationError(f"cannot save to {target!r}: {e}") from e
        raise
    _fsync_directory(directory)


# --------------------------------------------------------------------------- loading


# Why a marker inside the array rather than an ext whose data is the packed items:
# decoding such an ext calls msgpack.unpackb again from inside the ext hook, and each
# nested unpackb keeps a ~40 KB context on the C stack; 200 nested tuples in a hostile
# file segfaulted the interpreter. With the marker all nesting stays inside one
# unpackb, whose own limit raises StackError.
class _TupleMarker:
    """What ext 1 decodes to: the first element of an array that is a tuple."""

    __slots__ = ()


_TUPLE_MARKER = _TupleMarker()
# Types msgpack's unpacker can produce that are never part of a loaded value: the
# marker outside its place, and msgpack's own timestamp ext (-1), which is decoded
# without going through our ext hook.
_STRAY_TYPES = frozenset({_TupleMarker, msgpack.Timestamp})


def _decode_array(data: bytes) -> np.ndarray:
    unpacker = msgpack.Unpacker(max_buffer_size=_MAX_ARRAY_HEADER_BYTES, raw=False)
    unpacker.feed(data[:_MAX_ARRAY_HEADER_BYTES])
    try:
        header = unpacker.unpack()
    except (ValueError, msgpack.UnpackException) as e:
        raise SerializationError(
            f"array header is not valid msgpack within {_MAX_ARRAY_HEADER_BYTES} bytes "
            f"({type(e).__name__})"
        ) from e
    offset = unpacker.tell()
    if type(header) is not list or len(header) != 2:
        raise SerializationError("array header is not [dtype, shape]")
    dtype_name, shape = header
    if type(dtype_name) is not str or dtype_name not in _DTYPES:
        raise SerializationError(
            f"array dtype {reprlib.repr(dtype_name)} is not one of {sorted(_DTYPES)}"
        )
    if (
        type(shape) is not list
        or len(shape) > _MAX_NDIM
        or not all(type(dim) is int and dim >= 0 for dim in shape)
    ):
        raise SerializationError(
            f"array shape {reprlib.repr(shape)} is not a list of at most {_MAX_NDIM} "
            f"non-negative ints"
        )
    dtype = _DTYPES[dtype_name]
    # Python ints: a hostile shape cannot overflow, and nothing is allocated until the
    # declared size matches the bytes actually present.
    declared_bytes = math.prod(shape) * dtype.itemsize
    present_bytes = len(data) - offset
    if declared_bytes != present_bytes:
        raise SerializationError(
            f"array of shape {tuple(shape)} and dtype {dtype_name} needs {declared_bytes} "
            f"bytes but {present_bytes} are present"
        )
    if math.prod(dim for dim in shape if dim) * dtype.itemsize > sys.maxsize:
        raise SerializationError(f"array shape {tuple(shape)} is too large for numpy")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape).copy()  # own, writable memory rather than a view of data


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_TUPLE:
        if data:
            raise SerializationError(f"tuple marker carries {len(data)} bytes of data")
        return _TUPLE_MARKER
    if code == _EXT_NDARRAY:
        return _decode_array(data)
    if code == _EXT_NUMPY_SCALAR:
        array = _decode_array(data)
        if array.ndim != 0:
            raise SerializationError(f"numpy scalar has shape {array.shape}")
        return array[()]
    if code == _EXT_BIG_INT:
        if not 0 < len(data) <= _MAX_BIG_INT_BYTES:
            raise SerializationError(f"big int of {len(data)} bytes")
        value = int.from_bytes(data, "little", signed=True)
        if -(2**63) <= value < 2**64:
            raise SerializationError("big int ext holds a value msgpack stores natively")
        return value
    raise SerializationError(f"unknown msgpack ext type {code}")


def _list_hook(items: list) -> list | tuple:
    is_tuple = bool(items) and items[0] is _TUPLE_MARKER
    values = islice(items, 1, None) if is_tuple else items
    if not _STRAY_TYPES.isdisjoint(map(type, values)):
        raise SerializationError("a tuple marker or timestamp sits where a value belongs")
    return tuple(islice(items, 1, None)) if is_tuple else items


def _pairs_hook(pairs: list) -> dict:
    result = {}
    for key, value in pairs:
        key_kind = type(key)
        if key_kind is not str and key_kind is not int:
            raise SerializationError(f"map key of type {_type_name(key)}; keys are str or int")
        if type(value) in _STRAY_TYPES:
            raise SerializationError("a tuple marker or timestamp sits where a value belongs")
        if key in result:
            raise SerializationError(f"map key {reprlib.repr(key)} appears twice")
        result[key] = value
    return result


def _unpack_payload(payload: memoryview, source: str) -> Any:
    limit = len(payload)  # no string, container or ext can be longer than the payload
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=False,
            use_list=True,
            list_hook=_list_hook,
            object_pairs_hook=_pairs_hook,
            ext_hook=_ext_hook,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=limit,
        )
    # msgpack documents ValueError subclasses, but hooks and numpy may raise TypeError,
    # OverflowError or MemoryError; the promise is SerializationError for any payload.
    except Exception as e:
        if isinstance(e, SerializationError):
            detail = str(e)
        elif isinstance(e, msgpack.StackError):
            detail = "containers nest deeper than msgpack's unpacker allows"
        else:
            detail = f"{type(e).__name__}: {e}"
        raise SerializationError(f"cannot load {source}: corrupt payload ({detail})") from e
    if type(obj) in _STRAY_TYPES:
        raise SerializationError(
            f"cannot load {source}: corrupt payload (a tuple marker or timestamp as the whole value)"
        )
    return obj


def _check_container(data: bytes, source: str) -> memoryview:
    """The payload of a qatcore file, after checking magic, version, length and crc."""
    if not data.startswith(_MAGIC):
        if len(data) < len(_MAGIC) and _MAGIC.startswith(data):
            raise SerializationError(
                f"cannot load {source}: truncated ({len(data)} bytes); not a complete qatcore file"
            )
        raise SerializationError(
            f"cannot load {source}: not a qatcore file (it does not start with {_MAGIC!r})"
        )
    if len(data) < _HEADER.size:
        raise SerializationError(
            f"cannot load {source}: truncated header ({len(data)} of {_HEADER.size} bytes)"
        )
    _, version, flags, length, crc = _HEADER.unpack_from(data)
    if version not in _READABLE_VERSIONS:
        raise SerializationError(
            f"cannot load {source}: file format version {version}; this qatcore reads "
            f"version {', '.join(map(str, _READABLE_VERSIONS))} (is the file from a newer qatcore?)"
        )
    if flags != 0:
        raise SerializationError(
            f"cannot load {source}: unknown flags 0x{flags:04x}; format version "
            f"{version} defines none"
        )
    present = len(data) - _HEADER.size
    if present < length:
        raise SerializationError(
            f"cannot load {source}: truncated payload ({present} of {length} bytes)"
        )
    if present > length:
        raise SerializationError(
            f"cannot load {source}: {present - length} trailing bytes after the payload"
        )
    payload = memoryview(data)[_HEADER.size :]
    if zlib.crc32(payload) != crc:
        raise SerializationError(
            f"cannot load {source}: checksum mismatch; the file is corrupted"
        )
    return payload


def _loads(data: bytes, source: str) -> Any:
    return _unpack_payload(_check_container(data, source), source)


def loads(data: bytes) -> Any:
    """The object stored in ``data``, the bytes of a qatcore file (see :func:`dumps`).

    Args:
        data: bytes, bytearray or memoryview.

    Returns:
        the stored object, with the same types and bits that were saved.

    Raises:
        SerializationError: ``data`` is not a complete, intact qatcore file.

    >>> loads(dumps([1, (2.5, b"x"), None]))
    [1, (2.5, b'x'), None]
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SerializationError(f"loads() takes bytes, got {_type_name(data)}")
    return _loads(bytes(data), "data")


def load(path: str | os.PathLike) -> Any:
    """The object stored in the file ``path`` by :func:`save`.

    Args:
        path: str or os.PathLike.

    Returns:
        the stored object, with the same types and bits that were saved.

    Raises:
        SerializationError: the file cannot be read or is not a complete, intact
            qatcore file.

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "config.qat")
    ...     save({"bits": 8, "symmetric": True}, path)
    ...     load(path)
    {'bits': 8, 'symmetric': True}
    """
    source = _as_path(path)
    try:
        with open(source, "rb") as file:
            data = file.read()
    except OSError as e:
        raise SerializationError(f"cannot load {source!r}: {e}") from e
    return _loads(data, repr(source))
