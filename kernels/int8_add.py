"""The int8 residual add: two integer tensors, each on its own grid, summed onto the output grid.

The runtime module is ``Int8Add`` (qatcore/quantization/qat/operators/arithmetic.py), which keeps
the NumPy form of both formulas below for inputs that broadcast; these loops are its elementwise
form for two inputs of the same size, bit for bit the same.

Fixed point (TFLite's int8 add, with ``requantize``'s headroom shift): with S(v; M0, shift) =
``requantize.scale_value`` and ``L = ADD_LEFT_SHIFT`` (20) fractional bits,

    y = clamp(z_y + S(S((a - z_a) << L; M_a) + S((b - z_b) << L; M_b); M_y), lo, hi)

where M_a = s_a / 2m, M_b = s_b / 2m, M_y = 2m / (2^L s_y), m = max(s_a, s_b): both inputs are
brought to a common scale keeping L fractional bits, summed (in int64; the outer S saturates the
sum to int32 first) and rounded once. |a - z_a| <= 255, so (a - z_a) << 20 fits int32.

Float32 (ONNX Runtime's QLinearAdd, its AVX2 kernel; ``requantization.add_float32``):

    y = clamp(rne(fma(a, r_a, fma(b, r_b, F))), lo, hi)

with float32 r_a = s_a / s_y, r_b = s_b / s_y, F = z_y - fma(z_a, r_a, r_b * z_b) computed once
(``requantization.add_float32_constants``), a and b converted to float32 exactly, each ``fma``
rounded once (``requantize_float32.fma_float32_value``), rne rounding half to even.

The output depends on the pair of input bytes alone, so :func:`pair_table` tabulates either add
over all 65536 pairs (64 KiB, made once per layer) and :func:`add_by_table` gathers from it,
``out[i] = table[256 * byte(a[i]) + byte(b[i])]``: the int8 runtime's fixed-point add, whose
arithmetic costs several times the gather (docs/benchmarks.md, "Measurements behind the code").

A fused ReLU is ``lo = z_y``. Both loops read a and b (uint8 or int8, any mix) as flat arrays
and store into ``out`` (uint8 or int8), whose values the clamp keeps in range. Above
``PARALLEL_MIN_ELEMENTS`` the elements are split into one contiguous chunk per task and the
tasks run under ``prange``.

>>> import numpy as np
>>> from qatcore.kernels.requantize import quantize_multiplier
>>> m0, shift = quantize_multiplier([0.5, 0.25, 2.0 / 2**20])       # s_a = 1, s_b = 0.5, s_y = 1
>>> a, b = np.array([10, 20, 0], np.uint8), np.array([4, 8, 255], np.uint8)
>>> add_fixed_point(a, 0, b, 0, m0, shift, 0, 0, 255, np.uint8)          # a + b / 2
array([ 12,  24, 128], dtype=uint8)
>>> add_float32(a, 0, b, 0, np.float32(1), np.float32(0.5), np.float32(0), 0, 255, np.uint8)
array([ 12,  24, 128], dtype=uint8)
"""

import numpy as np
from numba import njit, prange

from .requantize import scale_value
from .requantize_float32 import fma_float32_value

__all__ = ["ADD_LEFT_SHIFT", "PARALLEL_MIN_ELEMENTS", "add_fixed_point", "add_float32", "pair_table",
           "add_by_table"]

ADD_LEFT_SHIFT = 20
# From this many elements on the tasks run in parallel (docs/benchmarks.md, "Measurements
# behind the code"); below, one task runs on the calling thread.
PARALLEL_MIN_ELEMENTS = 1 << 18
_CHUNK = 1 << 14


@njit(cache=True)
def _fixed_point_range(a, a_zero_point, b, b_zero_point, multiplier, shift, out_zero_point, clamp_min, clamp_max,
                       start, stop, out):
    """out[i] for i in [start, stop), the fixed-point formula of the module docstring."""
    za, zb = np.int64(a_zero_point), np.int64(b_zero_point)
    m_a, m_b, m_y = multiplier[0], multiplier[1], multiplier[2]
    n_a, n_b, n_y = shift[0], shift[1], shift[2]
    z_y, lo, hi = np.int64(out_zero_point), np.int64(clamp_min), np.int64(clamp_max)
    # arithmetic rather than a 256-entry table of the inner terms: a table is a gather, which
    # does not vectorise well (docs/benchmarks.md, "Measurements behind the code")
    for i in range(np.uintp(start), np.uintp(stop)):  # unsigned: no wraparound test, so it vectorises
        total = (scale_value((np.int64(a[i]) - za) << ADD_LEFT_SHIFT, m_a, n_a)
                 + scale_value((np.int64(b[i]) - zb) << ADD_LEFT_SHIFT, m_b, n_b))
        out[i] = min(max(z_y + scale_value(total, m_y, n_y), lo), hi)


@njit(cache=True)
def _float32_range(a, a_zero_point, b, b_zero_point, r_a, r_b, constant, clamp_min, clamp_max, start, stop, out):
    lo, hi = np.float32(clamp_min), np.float32(clamp_max)
    for i in range(np.uintp(start), np.uintp(stop)):  # unsigned: no wraparound test, so it vectorises
        value = fma_float32_value(np.float32(a[i]), r_a, fma_float32_value(np.float32(b[i]), r_b, constant))
        out[i] = np.int64(min(max(np.rint(value), lo), hi))


@njit(cache=True, parallel=True)
def _fixed_point_parallel(a, a_zero_point, b, b_zero_point, multiplier, shift, out_zero_point, clamp_min, clamp_max,
                          out):
    size = a.size
    for task in prange((size + _CHUNK - 1) // _CHUNK):
        start = np.int64(task) * _CHUNK
        _fixed_point_range(a, a_zero_point, b, b_zero_point, multiplier, shift, out_zero_point, clamp_min, clamp_max,
                           start, min(size, start + _CHUNK), out)


@njit(cache=True, parallel=True)
def _float32_parallel(a, a_zero_point, b, b_zero_point, r_a, r_b, constant, clamp_min, clamp_max, out):
    size = a.size
    for task in prange((size + _CHUNK - 1) // _CHUNK):
        start = np.int64(task) * _CHUNK
        _float32_range(a, a_zero_point, b, b_zero_point, r_a, r_b, constant, clamp_min, clamp_max, start,
                       min(size, start + _CHUNK), out)


def _flat(a, b, out_dtype, out):
    if out is None:
        out = np.empty(np.shape(a), out_dtype)
    return np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1), out.reshape(-1), out


def add_fixed_point(a, a_zero_point, b, b_zero_point, multiplier, shift, out_zero_point, clamp_min, clamp_max,
                    out_dtype, out=None):
    """The fixed-point add of the module docstring, elementwise.

    Args:
        a, b: integer arrays (uint8 or int8) of the same size; their shapes are not read.
        a_zero_point, b_zero_point: z_a, z_b.
        multiplier, shift: (3,) int64 arrays, (M0, shift) of M_a, M_b, M_y from
            ``requantize.quantize_multiplier``.
        out_zero_point, clamp_min, clamp_max: z_y and the clamp, in out_dtype's range.
        out_dtype: the output's dtype (np.uint8 or np.int8).
        out: None, or a C-contiguous array of out_dtype and a's size to write into (the int8
            execution plan's buffers); it must not overlap a or b.

    Returns:
        ``out``, or a new array shaped like ``a``.
    """
    a, b, flat, out = _flat(a, b, out_dtype, out)
    args = (a, np.int64(a_zero_point), b, np.int64(b_zero_point), multiplier, shift, np.int64(out_zero_point),
            np.int64(clamp_min), np.int64(clamp_max))
    if a.size >= PARALLEL_MIN_ELEMENTS:
        _fixed_point_parallel(*args, flat)
    else:
        _fixed_point_range(*args, 0, a.size, flat)
    return out


def add_float32(a, a_zero_point, b, b_zero_point, r_a, r_b, constant, clamp_min, clamp_max, out_dtype, out=None):
    """The float32 add of the module docstring (ONNX Runtime's QLinearAdd), elementwise.

    Args:
        a, b: integer arrays (uint8 or int8) of the same size; their shapes are not read.
        a_zero_point, b_zero_point: unused by the formula (they are inside ``constant``); kept
            so that both adds take the same arguments.
        r_a, r_b, constant: np.float32 scalars r_a, r_b and F of the module docstring.
        clamp_min, clamp_max: the clamp, in out_dtype's range.
        out_dtype, out: as for :func:`add_fixed_point`.

    Returns:
        ``out``, or a new array shaped like ``a``.
    """
    a, b, flat, out = _flat(a, b, out_dtype, out)
    args = (a, np.int64(a_zero_point), b, np.int64(b_zero_point), np.float32(r_a), np.float32(r_b),
            np.float32(constant), np.int64(clamp_min), np.int64(clamp_max))
    if a.size >= PARALLEL_MIN_ELEMENTS:
        _float32_parallel(*args, flat)
    else:
        _float32_range(*args, 0, a.size, flat)
    return out


@njit(cache=True)
def _gather_pairs(a, b, table, out):
    for i in range(np.uintp(a.size)):
        out[i] = table[(np.uintp(a[i]) << np.uintp(8)) | np.uintp(b[i])]


def pair_table(add, a_dtype, b_dtype, *arguments):
    """The results of ``add`` (:func:`add_fixed_point` or :func:`add_float32`) for every pair of
    input bytes: table[256 * u + v] = add(u as a_dtype, v as b_dtype), 65536 entries.

    Args:
        add: one of this module's adds.
        a_dtype, b_dtype: the inputs' dtypes (uint8 or int8; a byte u stands for the value of
            that dtype with those bits).
        arguments: the add's arguments after ``a`` and ``b`` in order (z_a, z_b, ..., out_dtype),
            given as for a call on the inputs.

    >>> from qatcore.kernels.requantize import quantize_multiplier
    >>> m0, shift = quantize_multiplier([0.5, 0.25, 2.0 / 2**20])
    >>> table = pair_table(add_fixed_point, np.uint8, np.uint8, 0, 0, m0, shift, 0, 0, 255, np.uint8)
    >>> int(table[256 * 10 + 4]), table.shape
    (12, (65536,))
    """
    values = np.arange(256, dtype=np.uint8)
    a = np.repeat(values, 256).view(np.dtype(a_dtype))
    b = np.tile(values, 256).view(np.dtype(b_dtype))
    z_a, z_b, *rest = arguments
    return add(a, z_a, b, z_b, *rest)


def add_by_table(a, b, table, out=None):
    """``out[i] = table[256 * byte(a[i]) + byte(b[i])]``: the add ``table`` was made for
    (:func:`pair_table`), elementwise.

    Args:
        a, b: uint8 or int8 arrays of the same size (their dtypes those of the table).
        table: 65536 values, from :func:`pair_table`.
        out: None, or a C-contiguous array of the table's dtype and a's size to write into.

    Returns:
        ``out``, or a new array shaped like ``a``.
    """
    a8, b8, flat, out = _flat(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8), table.dtype, out)
    _gather_pairs(a8, b8, table, flat)
    return out
