"""Packing of int4 and int2 weights into bytes: ONNX's INT4 layout, generalised to 2 bits.

A row of ``K`` integers on the signed ``bits``-bit grid ``[-2^(bits-1), 2^(bits-1) - 1]``
(``bits`` = 4: [-8, 7]; ``bits`` = 2: [-2, 1]) becomes ``ceil(K * bits / 8)`` bytes. With
``per = 8 / bits`` elements to a byte,

    element k of a row  ->  byte k // per, bits (k % per) * bits .. (k % per) * bits + bits - 1

stored in two's complement (``q & (2^bits - 1)``). For int4, element 2j is the low nibble of
byte j and element 2j + 1 its high nibble (ONNX's INT4, ``onnx.numpy_helper``'s order); for int2,
element 4j sits in bits 0-1 of byte j, 4j + 1 in bits 2-3, and so on. Unused bits at the end of
a row are 0. Each row is packed on its own: row n starts at byte 0 of row n of the result, so a
packed matrix is an ordinary (N, ceil(K * bits / 8)) uint8 array and any of its rows can be read
without the others.

Unpacking sign-extends each field back to int8: ``v = (byte >> shift) & (2^bits - 1)``, then
``(v ^ 2^(bits-1)) - 2^(bits-1)``.

Both directions are vectorised NumPy (one pass over the data, no Python loop), fast enough for
a one-time conversion of a layer's weights; the GEMM kernels in ``lowbit_gemm.py`` read the
packed bytes directly.

>>> import numpy as np
>>> q = np.array([[-8, 7, 1], [0, -1, -2]])
>>> packed = pack_lowbit(q, 4)            # bytes: 0x7 << 4 | 0x8, 0x1; 0xf << 4 | 0x0, 0xe
>>> packed
array([[120,   1],
       [240,  14]], dtype=uint8)
>>> unpack_lowbit(packed, 4, 3)
array([[-8,  7,  1],
       [ 0, -1, -2]], dtype=int8)
>>> pack_lowbit(np.array([[1, -2, 0, -1, 1]]), 2)   # 1 | 2 << 2 | 0 << 4 | 3 << 6 = 201; then 1
array([[201,   1]], dtype=uint8)
"""

import numpy as np

from qatcore.errors import ConfigError, DTypeError, ShapeError

__all__ = ["SUPPORTED_BITS", "grid", "packed_width", "pack_lowbit", "unpack_lowbit"]

SUPPORTED_BITS = (2, 4)


def check_bits(bits, name):
    """Refuse anything but 2 or 4 (int8 weights go through ``int8_gemm``)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise ConfigError(f"{name}: bits must be 2 or 4 (int8 weights go through kernels.int8_gemm), got {bits!r}")
    return int(bits)


def grid(bits):
    """(qmin, qmax) = (-2^(bits-1), 2^(bits-1) - 1), the signed grid of ``bits`` bits."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def packed_width(k, bits):
    """Bytes in a packed row of ``k`` elements: ceil(k * bits / 8)."""
    per = 8 // bits
    return -(-k // per)


def pack_lowbit(q, bits):
    """Pack integers on the signed ``bits``-bit grid, 8 / bits to a byte (module docstring).

    Args:
        q: integer array (N, K), every value in [-2^(bits-1), 2^(bits-1) - 1].
        bits: 2 or 4.

    Returns:
        A new uint8 array (N, ceil(K * bits / 8)).

    Raises:
        ConfigError: bits is not 2 or 4, or a value lies outside the grid (the message names the
        first one in row-major order). DTypeError: q is not an integer array. ShapeError: q is
        not 2-d.
    """
    name = "pack_lowbit"
    bits = check_bits(bits, name)
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise DTypeError(f"{name}: q must be an integer array, got {q.dtype}")
    if q.ndim != 2:
        raise ShapeError(f"{name}: q must be 2-d (N, K), got shape {q.shape}")
    qmin, qmax = grid(bits)
    outside = (q < qmin) | (q > qmax)
    if outside.any():
        row, col = np.unravel_index(int(np.argmax(outside)), q.shape)
        raise ConfigError(f"{name}: q[{row}, {col}] = {q[row, col]} lies outside the int{bits} grid "
                          f"[{qmin}, {qmax}]")
    per = 8 // bits
    rows, k = q.shape
    width = packed_width(k, bits)
    fields = np.zeros((rows, width * per), np.uint8)  # the padding fields stay 0
    fields[:, :k] = q.astype(np.int64) & ((1 << bits) - 1)
    shifts = (np.arange(per, dtype=np.uint8) * np.uint8(bits))
    # the fields of a byte occupy disjoint bits, so their sum is their bitwise or
    return (fields.reshape(rows, width, per) << shifts).sum(axis=2, dtype=np.uint8)


def unpack_lowbit(packed, bits, k):
    """The int8 values of :func:`pack_lowbit`'s bytes, sign-extended.

    Args:
        packed: uint8 array (N, ceil(k * bits / 8)).
        bits: 2 or 4.
        k: elements per row (the padding fields after them are ignored).

    Returns:
        A new int8 array (N, k).

    Raises:
        ConfigError: bits is not 2 or 4, or k is not a non-negative integer. DTypeError: packed
        is not uint8. ShapeError: packed is not 2-d or its rows are not ceil(k * bits / 8) bytes.
    """
    name = "unpack_lowbit"
    bits = check_bits(bits, name)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ConfigError(f"{name}: k must be a non-negative integer, got {k!r}")
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise DTypeError(f"{name}: packed must be uint8, got {packed.dtype}")
    width = packed_width(int(k), bits)
    if packed.ndim != 2 or packed.shape[1] != width:
        raise ShapeError(f"{name}: packed must be (N, {width}) for k = {k} int{bits} elements a row, "
                         f"got shape {packed.shape}")
    per, half = 8 // bits, np.uint8(1 << (bits - 1))
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
    fields = (packed[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)
    fields = fields.reshape(packed.shape[0], width * per)[:, :k]
    return np.ascontiguousarray((fields ^ half).view(np.int8) - half.view(np.int8))
