"""Read MNIST-format IDX files that are already on disk; qatcore never downloads.

An IDX file is a big-endian header followed by the raw array:

    byte 0-1   0x00 0x00              (magic)
    byte 2     dtype code             0x08 uint8, 0x09 int8, 0x0B int16,
                                      0x0C int32, 0x0D float32, 0x0E float64
    byte 3     ndim
    then       ndim x uint32          the size of each dimension
    then       prod(dims) x itemsize  the values, C order, big-endian

``read_idx`` reads one such file (optionally gzip-compressed, by its ``.gz``
suffix); ``load_mnist_idx`` finds the four MNIST files in a folder (the same names
serve Fashion-MNIST) and returns images ``x = pixel / 255`` as float32 of shape
``(N, 1, rows, cols)`` and labels as int64. Every check happens before the array
is allocated, so a damaged header cannot ask for gigabytes.

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as folder:
...     path = pathlib.Path(folder) / "labels.idx1-ubyte"
...     _ = path.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 2, 1]))
...     read_idx(path).tolist()
[7, 2, 1]
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from qatcore.errors import DataError

__all__ = ["load_mnist_idx", "read_idx"]

# IDX dtype code -> the (big-endian) numpy dtype of the values in the file
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_READ_CHUNK_BYTES = 1 << 20

# (split, what) -> the stem in its dashed and dotted spellings; each may end in .gz
_MNIST_STEMS = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file into a numpy array of native byte order.

    A path ending in ``.gz`` is decompressed on the fly. The header's dimensions
    are checked against the bytes actually present before the array is made.

    Args:
        path: the IDX file.

    Returns:
        an array with the file's shape and dtype (uint8, int8, int16, int32,
        float32 or float64; converted from big-endian to native order).

    Raises:
        DataError: the file is missing, is not IDX (bad magic, unknown dtype code),
            is truncated or has bytes after the declared data; the message names
            the file.

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = pathlib.Path(folder) / "pair.idx2-int16"
    ...     header = bytes([0, 0, 0x0B, 2, 0, 0, 0, 1, 0, 0, 0, 2])
    ...     _ = path.write_bytes(header + bytes([0xFF, 0xFE, 0x01, 0x00]))
    ...     read_idx(path)
    array([[ -2, 256]], dtype=int16)
    """
    path = Path(path)
    compressed = path.name.endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as stream:
            return _read_idx_stream(stream, path, compressed)
    except FileNotFoundError as error:
        raise DataError(f"IDX file {str(path)!r} does not exist") from error
    except IsADirectoryError as error:
        raise DataError(f"IDX path {str(path)!r} is a directory, not a file") from error
    except (OSError, EOFError, zlib.error) as error:
        # gzip raises these for a damaged or truncated compressed stream
        raise DataError(
            f"IDX file {str(path)!r} could not be read "
            f"({'gzip ' if compressed else ''}{type(error).__name__}: {error})"
        ) from error


def _read_idx_stream(stream, path: Path, compressed: bool) -> np.ndarray:
    name = repr(str(path))
    magic = _read_at_most(stream, 4)
    if len(magic) < 4:
        raise DataError(
            f"IDX file {name} is truncated: it has {len(magic)} bytes, "
            f"fewer than the 4-byte magic number"
        )
    if magic[:2] != b"\x00\x00":
        hint = ""
        if magic[:2] == _GZIP_MAGIC and not compressed:
            hint = "; it looks gzip-compressed, name it with a .gz suffix"
        raise DataError(
            f"IDX file {name} has bad magic {magic.hex(' ')}: an IDX file starts with "
            f"two zero bytes{hint}"
        )
    dtype_code, ndim = magic[2], magic[3]
    if dtype_code not in _IDX_DTYPES:
        accepted = ", ".join(f"0x{code:02X} {dtype.name}" for code, dtype in _IDX_DTYPES.items())
        raise DataError(
            f"IDX file {name} has unknown dtype code 0x{dtype_code:02X}; accepted: {accepted}"
        )
    if ndim == 0:
        raise DataError(f"IDX file {name} declares 0 dimensions; expected at least 1")
    dims_bytes = _read_at_most(stream, 4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise DataError(
            f"IDX file {name} is truncated in its header: {ndim} dimensions need "
            f"{4 * ndim} bytes of sizes, found {len(dims_bytes)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(dims_bytes, dtype=">u4"))
    dtype = _IDX_DTYPES[dtype_code]
    num_values = 1
    for size in shape:
        num_values *= size
    expected_bytes = num_values * dtype.itemsize

    if not compressed:
        # a plain file's size is known up front: refuse before reading anything more
        present = os.fstat(stream.fileno()).st_size - 4 - 4 * ndim
        if present != expected_bytes:
            raise DataError(_size_message(name, shape, dtype, expected_bytes, str(present)))
    # Read one byte past the end so trailing data in a gzip stream is noticed; reading
    # in chunks keeps a lying header in a compressed file from allocating its claim.
    payload = _read_at_most(stream, expected_bytes + 1)
    if len(payload) < expected_bytes:
        raise DataError(
            _size_message(name, shape, dtype, expected_bytes, str(len(payload)))
        )
    if len(payload) > expected_bytes:
        raise DataError(
            _size_message(name, shape, dtype, expected_bytes, f"more than {expected_bytes}")
        )
    # the bytearray is writable, so the uint8/int8 case needs no copy; the others
    # are copied once into native byte order
    values = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=False)


def _size_message(
    name: str, shape: tuple[int, ...], dtype: np.dtype, expected: int, present: str
) -> str:
    too_short = present.isdigit() and int(present) < expected
    problem = "is truncated" if too_short else "has bytes after the declared data"
    return (
        f"IDX file {name} {problem}: its header declares shape {shape} of {dtype.name}, "
        f"which needs {expected} data bytes, but {present} are present"
    )


def _read_at_most(stream, num_bytes: int) -> bytearray:
    """Up to ``num_bytes`` from ``stream`` (fewer only at end of file), read in chunks."""
    buffer = bytearray()
    while len(buffer) < num_bytes:
        chunk = stream.read(min(_READ_CHUNK_BYTES, num_bytes - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    return buffer


def load_mnist_idx(
    folder: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST (or Fashion-MNIST) from the four IDX files in ``folder``.

    Each file is looked for as ``train-images-idx3-ubyte``, ``train-images.idx3-ubyte``,
    and both again with ``.gz`` (the first one that exists is used); likewise
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``.

    Args:
        folder: directory holding the files (nothing is downloaded).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images float32 of shape
        ``(N, 1, rows, cols)`` with values ``pixel / 255`` in [0, 1], labels int64.

    Raises:
        DataError: the folder or a file is missing (the message lists the names
            looked for), a file is damaged (see :func:`read_idx`), images are not
            3-D uint8, labels are not 1-D integers, the image and label counts of
            a split differ, or train and test images differ in size.

    >>> import gzip, tempfile, pathlib
    >>> def idx(dtype_code, dims, values):
    ...     header = bytes([0, 0, dtype_code, len(dims)])
    ...     return header + b"".join(d.to_bytes(4, "big") for d in dims) + bytes(values)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = pathlib.Path(tmp)
    ...     for split in ("train", "t10k"):
    ...         _ = (folder / f"{split}-images-idx3-ubyte").write_bytes(
    ...             idx(0x08, [2, 1, 2], [0, 255, 51, 102]))
    ...         _ = (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(
    ...             gzip.compress(idx(0x08, [2], [3, 9])))
    ...     x_train, y_train, x_test, y_test = load_mnist_idx(folder)
    >>> x_train.shape, x_train.dtype, y_train.tolist()
    ((2, 1, 1, 2), dtype('float32'), [3, 9])
    >>> x_train[1].ravel().tolist()
    [0.20000000298023224, 0.4000000059604645]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"MNIST folder {str(folder)!r} does not exist or is not a directory"
        )
    splits = []
    for split in ("train", "test"):
        images_path = _find_file(folder, split, "images")
        labels_path = _find_file(folder, split, "labels")
        images_name, labels_name = images_path.name, labels_path.name
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"MNIST {split} images {images_name!r} must be a 3-D uint8 array "
                f"(count, rows, cols), got shape {images.shape} of {images.dtype}"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"MNIST {split} labels {labels_name!r} must be a 1-D integer array, "
                f"got shape {labels.shape} of {labels.dtype}"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"MNIST {split} split in {str(folder)!r} has {images.shape[0]} images in "
                f"{images_name!r} but {labels.shape[0]} labels in {labels_name!r}"
            )
        x = (images.astype(np.float32) / np.float32(255.0))[:, np.newaxis, :, :]
        splits.append((x, labels.astype(np.int64)))
    (x_train, y_train), (x_test, y_test) = splits
    if x_train.shape[2:] != x_test.shape[2:]:
        raise DataError(
            f"MNIST train images are {x_train.shape[2]}x{x_train.shape[3]} but test images "
            f"are {x_test.shape[2]}x{x_test.shape[3]} in {str(folder)!r}"
        )
    return x_train, y_train, x_test, y_test


def _find_file(folder: Path, split: str, what: str) -> Path:
    candidates = [stem + suffix for suffix in ("", ".gz") for stem in _MNIST_STEMS[split, what]]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"MNIST {split} {what} file not found in {str(folder)!r}; looked for "
        + ", ".join(candidates)
    )
