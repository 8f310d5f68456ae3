"""Matrix products against int4 / int2 weights packed by ``lowbit_pack``: dynamic int8 activations
(8da4w) and weight-only, and the per-token activation quantization that feeds the first.

Weights. ``w_packed`` (N, ceil(K * bits / 8)) uint8 holds w_q (N, K) on the signed ``bits``-bit
grid (bits 4 or 2), ``lowbit_pack``'s layout; ``w_scale`` (N, G) float32 holds one scale per
group of ``group_size`` consecutive k (G = K / group_size; group_size = K is per channel, and a
per-tensor scale is that with the scale repeated in every row). Group g is k in
[g * group_size, (g + 1) * group_size).

Dynamic int8 activations, symmetric weights (:func:`dynamic_int8_lowbit_gemm`). For x_q (M, K)
int8, x_zero (M,) int32 and x_scale (M,) float32 (one token a row, :func:`quantize_per_token`):

    isum[m, n, g] = sum_{k in g} (x_q[m, k] - x_zero[m]) * w_q[n, k]                  (exact integers)
    acc = 0.0;  for g = 0 .. G-1:  acc = acc + float64(isum[m, n, g]) * float64(w_scale[n, g])
    y[m, n] = float32(acc * float64(x_scale[m]))     (+ bias[n], a float32 addition)

every float64 operation rounding on its own (no fused multiply-add). |x_q - x_zero| <= 255 and
|w_q| <= 8, so every partial sum of a group is below 2040 * group_size < 2^31 for group_size up
to ``MAX_GROUP_SIZE`` = 2^20: the int32 sums are exact. The result is the definition's, bit for
bit, on every path (the oracle in ``tests/kernels/test_lowbit_gemm.py`` is NumPy int64 and
float64); row m depends on row m and the weights only.

Weight-only (:func:`weight_only_lowbit_gemm`). For float32 x (M, K) and an optional zero point
w_zero (N, G) int32 (the dequantized weight is (w_q - w_zero) * w_scale):

    y[m, n] = float32(sum_g float64(w_scale[n, g]) * sum_{k in g} float64(x[m, k]) * float64(w_q[n, k] - w_zero[n, g]))

in float64 (+ bias[n] in float32). The order of the float64 sums is this module's, fixed, and
the same for every (m, n) whatever M, the thread count or the path. With ``per = 8 / bits``
elements to a packed byte and i = k - g * group_size the position of k in its group, the
products p_k = float64(x[m, k]) * float64(w_q[n, k] - w_zero[n, g]) of group g go to 8 lanes,
lane (i // per) % 8 taking them in increasing i:

    P_l = 0;  P_l = P_l + p_k  for the k of lane l, in order         (per group, l = 0 .. 7)
    A_l = 0;  A_l = A_l + P_l * float64(w_scale[n, g])  for g = 0 .. G-1
    y[m, n] = float32(((A_0 + A_4) + (A_2 + A_6)) + ((A_1 + A_5) + (A_3 + A_7)))

(the lanes of a vector loop that reads 8 packed bytes a step, one a lane). It differs from the
left-to-right sum by rounding only; the tests allow 1e-6 of the float32 output.

quantize_per_token(x, bits, symmetric): the integers of ``BlockFakeQuantize.block_qparams`` per
token, bit for bit: (s, z) = ``token_qparams`` of each row (block_fake_quant's kernels compute
them), q = clamp(rne(x * (1 / s)) + z, qmin, qmax) in float32, NaN -> 0, as int8; z as int32 (0
for a row holding a NaN, whose s is NaN); s float32.

Paths (the tiles are in ``lowbit_tiles``). With AVX-512 VNNI and group_size <= 2^18 the dynamic
product lays the activations out once per call as words of 4 k of 16 rows (x + 128); a task of
64 weight rows unpacks them to int8 (each group zero-padded to a multiple of 4 k) with each
group's weight sum, and tiles of 2 x 16 activation rows by 4 weight rows compute every group's
isum in the 16 int32 lanes of ``vpdpbusd`` and add isum * scale to float64 lanes with a fused
multiply-add, which rounds once as the definition's multiply-then-add does because the product
is exact (|isum| < 2040 * 2^18 < 2^29, times a float32). The weight-only product runs its order
in 8 float64 lanes (LLVM vector code) where group_size is a multiple of 8 * per, and a group's
products with a fused multiply-add where its zero points lie within +-2^24 (the product of a
float32 and an integer below 2^29 is exact). Elsewhere, without VNNI and under
``NUMBA_DISABLE_JIT``, plain loops compute the same numbers: the tests compare every path bit for
bit, the tiles' float64 sums too. Tasks run under ``prange`` from ``PARALLEL_MIN_MACS``
multiply-adds on; a row's numbers do not depend on the tiling, the tasks or the threads.

>>> import numpy as np
>>> from qatcore.kernels.lowbit_pack import pack_lowbit
>>> x = np.array([[0.5, -1.0, 0.25, 2.0]], np.float32)
>>> x_q, x_zero, x_scale = quantize_per_token(x)               # s = 3 / 255, z = -43
>>> x_q, x_zero
(array([[  -1, -128,  -22,  127]], dtype=int8), array([-43], dtype=int32))
>>> w_packed = pack_lowbit(np.array([[1, -2, 3, 7], [-8, 0, 1, 2]]), 4)
>>> w_scale = np.array([[0.5, 0.25], [1.0, 1.0]], np.float32)   # group_size 2
>>> dynamic_int8_lowbit_gemm(x_q, x_zero, x_scale, w_packed, 4, w_scale, 2)
array([[4.932353  , 0.29411766]], dtype=float32)
>>> weight_only_lowbit_gemm(x, w_packed, 4, w_scale, None, 2)   # 0.5*2.5 + 0.25*14.75; -4 + 4.25
array([[4.9375, 0.25  ]], dtype=float32)
"""

import numpy as np
from numba import get_thread_id, njit, prange

from qatcore.errors import ConfigError, DTypeError, ShapeError

from .block_fake_quant import _clamp, _constants, _range_qparams, _ranges, _scheme
from .int8_gemm import scratch_for
from .lowbit_pack import check_bits, packed_width
from .lowbit_tiles import (
    LANES,
    ROW_BLOCKS,
    TILE_COLS,
    TILE_ROWS,
    USE_LOOKUP,
    USE_VECTOR_TILES,
    USE_VNNI,
    dynamic_tile_1,
    dynamic_tile_2,
    group_sums_vector,
    unpack_vector_2,
    unpack_vector_4,
    weight_only_block,
)

__all__ = ["MAX_GROUP_SIZE", "PARALLEL_MIN_MACS", "quantize_per_token", "dynamic_int8_lowbit_gemm",
           "weight_only_lowbit_gemm"]

# The longest group whose int32 sums are exact: 2040 * 2^20 = 2139095040 < 2^31.
MAX_GROUP_SIZE = 1 << 20
# Up to this group size |isum| <= 2040 * 2^18 < 2^29, so isum * float32 scale is exact in float64
# and the VNNI tile may add it with a fused multiply-add; longer groups take the loops.
_FMA_MAX_GROUP_SIZE = 1 << 18
# Below this many multiply-adds (M * N * K) the tasks run serially.
PARALLEL_MIN_MACS = 1 << 22
# Weight rows per task.
_TASK_ROWS = 64


# ----------------------------------------------------------------------------------------
# quantize_per_token: block_fake_quant's pass 1 (_ranges) and qparams (_range_qparams), then the integers.


@njit(cache=True)
def _quantize_tokens(x, ranges, scheme, constants, q, zero_point, scale):
    qmin, qmax = constants[0], constants[1]
    for m in range(x.shape[0]):
        s, z, inv = _range_qparams(ranges, m, scheme, constants)
        scale[m] = s
        zero_point[m] = np.int32(z) if z == z else np.int32(0)
        for k in range(x.shape[1]):
            v = _clamp(np.rint(x[m, k] * inv) + z, qmin, qmax)
            q[m, k] = np.int8(v) if v == v else np.int8(0)


def quantize_per_token(x, bits=8, symmetric=False):
    """Quantize each row of x with its own scale and zero point (module docstring).

    Args:
        x: float32 (M, K), C-contiguous, K >= 1.
        bits: 2 to 8; the grid is [-2^(bits-1), 2^(bits-1) - 1].
        symmetric: z = 0 and s = max(|min|, |max|) / ((qmax - qmin) / 2); else the affine rule.

    Returns:
        (x_q int8 (M, K), zero int32 (M,), scale float32 (M,)).

    Raises:
        DTypeError, ShapeError (x), ConfigError (bits, symmetric).
    """
    name = "quantize_per_token"
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ConfigError(f"{name}: bits must be an integer from 2 to 8, got {bits!r}")
    if not isinstance(symmetric, (bool, np.bool_)):
        raise ConfigError(f"{name}: symmetric must be a bool, got {symmetric!r}")
    _check_array(x, name, "x", np.float32, (None, None), "(M, K)")
    if x.shape[1] == 0:
        raise ShapeError(f"{name}: x must have at least one column, got shape {x.shape}")
    scheme = _scheme(None, bool(symmetric))
    ranges = np.empty((x.shape[0], 2), np.float32)
    _ranges(x.view(np.int32), ranges.view(np.int32), np.int32(31), np.int32(0x7FFFFFFF))
    q = np.empty(x.shape, np.int8)
    zero_point = np.empty(x.shape[0], np.int32)
    scale = np.empty(x.shape[0], np.float32)
    with np.errstate(all="ignore"):  # +-inf and NaN go through the IEEE arithmetic, also in plain Python
        _quantize_tokens(x, ranges, scheme, _constants(x.dtype, int(bits), scheme), q, zero_point, scale)
    return q, zero_point, scale


# ----------------------------------------------------------------------------------------
# Unpacking weight rows inside the kernels: 16 packed bytes a step as LLVM vector code (byte
# shifts sign-extend each field, shuffles interleave them), the rest one element at a time.


@njit(cache=True)
def _weight(packed, n, k, bits):
    """w_q[n, k] as an int32."""
    per = 8 // bits
    field = (np.int32(packed[n, k // per]) >> ((k % per) * bits)) & ((1 << bits) - 1)
    half = 1 << (bits - 1)
    return np.int32((field ^ half) - half)


@njit(cache=True)
def _unpack_contiguous(packed, n, bits, k, out):
    """out[i] = w_q[n, i] for i < k."""
    start = 0
    if USE_VECTOR_TILES:
        steps = k // (16 * (8 // bits))
        if bits == 4:
            unpack_vector_4(packed, n, steps, out)
        else:
            unpack_vector_2(packed, n, steps, out)
        start = steps * 16 * (8 // bits)
    for i in range(start, k):
        out[i] = _weight(packed, n, i, bits)


@njit(cache=True)
def _prepare_rows(packed, bits, w_scale, group_size, padded, n0, n1, rows, sums, scales):
    """For weight rows n0 <= n0 + r < n1: rows[r, g * padded + i] = w_q[n0 + r, g * group_size + i]
    (zero for group_size <= i < padded), sums[r, g] = the group's sum, scales[r, g] = float64
    of its scale; rows beyond n1 (up to rows.shape[0]) are zero."""
    groups = w_scale.shape[1]
    for r in range(rows.shape[0]):
        n = n0 + r
        if n >= n1:
            rows[r, :] = 0
            sums[r, :] = 0
            scales[r, :] = 0.0
            continue
        row = rows[r]
        if padded == group_size:
            _unpack_contiguous(packed, n, bits, groups * group_size, row)
        else:
            for g in range(groups):
                for i in range(group_size):
                    row[g * padded + i] = _weight(packed, n, g * group_size + i, bits)
                for i in range(group_size, padded):
                    row[g * padded + i] = 0
        if USE_VECTOR_TILES and padded == group_size and group_size % 16 == 0:
            group_sums_vector(rows, r, groups, group_size // 16, sums)
        else:
            for g in range(groups):
                total = np.int32(0)
                for i in range(g * padded, g * padded + group_size):
                    total = np.int32(total + np.int32(row[i]))
                sums[r, g] = total
        for g in range(groups):
            scales[r, g] = np.float64(w_scale[n, g])


@njit(cache=True)
def _activation_words(x_q, x_words, group_size, padded, words):
    """words[m // 16, c, m % 16] = bytes 4c .. 4c + 3 of row m laid out with each group padded to
    ``padded`` k (the padding 0), each byte x + 128; zero beyond the rows. x_words is x_q viewed as
    uint32 when padded == group_size (then K % 4 == 0), else empty."""
    words[:] = 0
    rows, depth = x_q.shape
    if padded == group_size:
        for m in range(rows):
            block, lane = m // 16, m % 16
            for c in range(np.uintp(depth // 4)):
                words[block, c, lane] = x_words[m, c] ^ np.uint32(0x80808080)
        return
    for m in range(rows):
        block, lane = m // 16, m % 16
        for g in range(depth // group_size):
            for i in range(group_size):
                position = g * padded + i
                byte = np.uint32(np.uint8(x_q[m, g * group_size + i]) ^ np.uint8(0x80))
                words[block, position // 4, lane] |= byte << np.uint32(8 * (position % 4))


@njit(cache=True)
def _store_dynamic(acc, block0, blocks, n_first, cols, x_scale, bias, has_bias, out):
    """out[m, n_first + c] = float32(acc[c, m - 16 * block0] * x_scale[m]) (+ bias) for the rows
    of the tile's blocks that exist."""
    first, last = 16 * block0, min(out.shape[0], 16 * (block0 + blocks))
    for c in range(cols):
        n = n_first + c
        for m in range(first, last):
            y = np.float32(acc[c, m - first] * np.float64(x_scale[m]))
            out[m, n] = np.float32(y + bias[n]) if has_bias else y


@njit(cache=True)
def _dynamic_vnni_task(task, words, negative_zeros, x_scale, packed, bits, w_scale, group_size, padded, bias, has_bias,
                       rows, sums, scales, acc, out):
    n0 = task * _TASK_ROWS
    n1 = min(out.shape[1], n0 + _TASK_ROWS)
    _prepare_rows(packed, bits, w_scale, group_size, padded, n0, n1, rows, sums, scales)
    blocks, groups, chunks = words.shape[0], w_scale.shape[1], padded // 4
    for block0 in range(0, blocks, ROW_BLOCKS):
        count = min(ROW_BLOCKS, blocks - block0)
        for r0 in range(0, n1 - n0, TILE_COLS):
            if count == ROW_BLOCKS:
                dynamic_tile_2(words, block0, rows, r0, sums, scales, negative_zeros, groups, chunks, acc)
            else:
                dynamic_tile_1(words, block0, rows, r0, sums, scales, negative_zeros, groups, chunks, acc)
            _store_dynamic(acc, block0, count, n0 + r0, min(TILE_COLS, n1 - n0 - r0), x_scale, bias, has_bias, out)


@njit(cache=True, parallel=True)
def _dynamic_vnni_parallel(words, negative_zeros, x_scale, packed, bits, w_scale, group_size, padded, bias, has_bias,
                           n_tasks, rows, sums, scales, acc, out):
    for task in prange(n_tasks):
        thread = get_thread_id()
        _dynamic_vnni_task(np.int64(task), words, negative_zeros, x_scale, packed, bits, w_scale, group_size, padded,
                           bias, has_bias, rows[thread], sums[thread], scales[thread], acc[thread], out)


@njit(cache=True)
def _dynamic_vnni_serial(words, negative_zeros, x_scale, packed, bits, w_scale, group_size, padded, bias, has_bias,
                         n_tasks, rows, sums, scales, acc, out):
    for task in range(n_tasks):
        _dynamic_vnni_task(task, words, negative_zeros, x_scale, packed, bits, w_scale, group_size, padded, bias,
                           has_bias, rows[0], sums[0], scales[0], acc[0], out)


# ----------------------------------------------------------------------------------------
# The dynamic product as plain loops (no VNNI, or NUMBA_DISABLE_JIT): the definition itself.


@njit(cache=True)
def _dynamic_loop_task(task, x_q, x_zero, x_scale, packed, bits, w_scale, group_size, bias, has_bias, rows, sums,
                       scales, out):
    n0 = task * _TASK_ROWS
    n1 = min(out.shape[1], n0 + _TASK_ROWS)
    _prepare_rows(packed, bits, w_scale, group_size, group_size, n0, n1, rows, sums, scales)
    for n in range(n0, n1):
        row = rows[n - n0]
        for m in range(x_q.shape[0]):
            z = np.int32(x_zero[m])
            acc = np.float64(0.0)
            for g in range(w_scale.shape[1]):
                isum = np.int32(0)
                for k in range(g * group_size, (g + 1) * group_size):
                    isum = np.int32(isum + (np.int32(x_q[m, k]) - z) * np.int32(row[k]))
                acc = acc + np.float64(isum) * scales[n - n0, g]
            y = np.float32(acc * np.float64(x_scale[m]))
            out[m, n] = np.float32(y + bias[n]) if has_bias else y


@njit(cache=True, parallel=True)
def _dynamic_loop_parallel(x_q, x_zero, x_scale, packed, bits, w_scale, group_size, bias, has_bias, n_tasks, rows,
                           sums, scales, out):
    for task in prange(n_tasks):
        thread = get_thread_id()
        _dynamic_loop_task(np.int64(task), x_q, x_zero, x_scale, packed, bits, w_scale, group_size, bias, has_bias,
                           rows[thread], sums[thread], scales[thread], out)


@njit(cache=True)
def _dynamic_loop_serial(x_q, x_zero, x_scale, packed, bits, w_scale, group_size, bias, has_bias, n_tasks, rows,
                         sums, scales, out):
    for task in range(n_tasks):
        _dynamic_loop_task(task, x_q, x_zero, x_scale, packed, bits, w_scale, group_size, bias, has_bias, rows[0],
                           sums[0], scales[0], out)


# ----------------------------------------------------------------------------------------
# The same order as plain loops, for any group size (and under NUMBA_DISABLE_JIT).


@njit(cache=True)
def _weight_only_pair(x, m, packed, n, bits, zeros, scales, group_size, partials, lane_sums):
    """The weight-only sum of (m, n) in the module docstring's order; partials and lane_sums,
    (8,) float64, are scratch."""
    per = 8 // bits
    lane_sums[:] = 0.0
    for g in range(scales.shape[1]):
        zero_point = np.float64(zeros[n, g])
        partials[:] = 0.0
        for i in range(group_size):
            k = g * group_size + i
            weight = np.float64(_weight(packed, n, k, bits)) - zero_point
            lane = (i // per) % LANES
            partials[lane] = partials[lane] + np.float64(x[m, k]) * weight
        scale = np.float64(scales[n, g])
        for lane in range(LANES):
            lane_sums[lane] = lane_sums[lane] + partials[lane] * scale
    for width in (4, 2, 1):
        for lane in range(width):
            lane_sums[lane] = lane_sums[lane] + lane_sums[lane + width]
    return lane_sums[0]


@njit(cache=True)
def _weight_only_task(task, x, x_split, packed, bits, has_zero, zeros, scales, group_size, vector, bias, has_bias,
                      partials, lane_sums, acc, out):
    """Weight rows [64 * task, 64 * task + 64), every activation row. The vector tiles cover
    TILE_ROWS (or 1) rows by TILE_COLS columns; the last tile of each kind is moved back to
    end at the last row or column (recomputing some, which gives the same numbers)."""
    rows, cols = out.shape
    n0 = task * _TASK_ROWS
    n1 = min(cols, n0 + _TASK_ROWS)
    if vector and cols >= TILE_COLS:
        chunks = group_size // (LANES * (8 // bits))
        height = TILE_ROWS if rows >= TILE_ROWS else 1
        for m in range(0, rows, height):
            m_first = min(m, rows - height)
            for c in range(n0, n1, TILE_COLS):
                c_first = min(c, cols - TILE_COLS)
                weight_only_block(x_split, m_first, height, packed, c_first, bits, has_zero, zeros, scales,
                                          chunks, acc)
                for i in range(m, min(rows, m_first + height)):
                    for j in range(c, min(n1, c_first + TILE_COLS)):
                        y = np.float32(acc[i - m_first, j - c_first])
                        out[i, j] = np.float32(y + bias[j]) if has_bias else y
        return
    for m in range(rows):
        for n in range(n0, n1):
            y = np.float32(_weight_only_pair(x, m, packed, n, bits, zeros, scales, group_size, partials, lane_sums))
            out[m, n] = np.float32(y + bias[n]) if has_bias else y


@njit(cache=True, parallel=True)
def _weight_only_parallel(x, x_split, packed, bits, has_zero, zeros, scales, group_size, vector, bias, has_bias,
                          n_tasks, partials, lane_sums, acc, out):
    for task in prange(n_tasks):
        thread = get_thread_id()
        _weight_only_task(np.int64(task), x, x_split, packed, bits, has_zero, zeros, scales, group_size, vector, bias,
                          has_bias, partials[thread], lane_sums[thread], acc[thread], out)


@njit(cache=True)
def _weight_only_serial(x, x_split, packed, bits, has_zero, zeros, scales, group_size, vector, bias, has_bias,
                        n_tasks, partials, lane_sums, acc, out):
    for task in range(n_tasks):
        _weight_only_task(task, x, x_split, packed, bits, has_zero, zeros, scales, group_size, vector, bias, has_bias,
                          partials[0], lane_sums[0], acc[0], out)


@njit(cache=True)
def _split_phases(x, bits, scaled, x_split):
    """x_split[m, f, j] = float64(x[m, per * j + f]), divided by 2^(bits * f) if ``scaled``
    (exact), the vector tiles' operand (all of x's columns: K = per * width here)."""
    per = 8 // bits
    for m in range(x.shape[0]):
        for j in range(x_split.shape[2]):
            for f in range(per):
                scale = 1.0 / (1 << (bits * f)) if scaled else 1.0
                x_split[m, f, j] = np.float64(x[m, per * j + f]) * scale


# ----------------------------------------------------------------------------------------
# Validation


def _check_array(a, name, what, dtype, shape, label):
    """a must be a C-contiguous ``dtype`` array of ``shape`` (None: any length); label is the
    shape as the message shows it."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise DTypeError(f"{name}: {what} must be a {np.dtype(dtype)} array, got {got}")
    if a.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
        raise ShapeError(f"{name}: {what} must have shape {label}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ShapeError(f"{name}: {what} must be C-contiguous (pass np.ascontiguousarray({what}))")


def _check_weights(name, depth, w_packed, bits, w_scale, group_size, bias):
    """(bits, N, G) after checking the weight arguments against K = depth."""
    bits = check_bits(bits, name)
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ConfigError(f"{name}: group_size must be a positive integer, got {group_size!r}")
    if depth % group_size:
        raise ConfigError(f"{name}: K = {depth} (columns of x) is not a multiple of group_size = {group_size}")
    if group_size > MAX_GROUP_SIZE:
        raise ConfigError(f"{name}: group_size = {group_size} exceeds MAX_GROUP_SIZE = {MAX_GROUP_SIZE}; beyond it a "
                          f"group's int32 sums could overflow")
    width = packed_width(depth, bits)
    _check_array(w_packed, name, "w_packed", np.uint8, (None, width), f"(N, {width}) for K = {depth} int{bits} weights")
    rows, groups = w_packed.shape[0], depth // group_size
    _check_array(w_scale, name, "w_scale", np.float32, (rows, groups), f"(N, K / group_size) = ({rows}, {groups})")
    if bias is not None:
        _check_array(bias, name, "bias", np.float32, (rows,), f"(N,) = ({rows},)")
    return bits, rows, groups


def _check_depth(name, depth):
    if depth == 0:
        raise ShapeError(f"{name}: x must have at least one column (K >= 1)")


def _task_count(rows):
    return -(-rows // _TASK_ROWS)


def _bias_arguments(bias):
    return (np.zeros(1, np.float32), False) if bias is None else (bias, True)


# ----------------------------------------------------------------------------------------
# Public functions


def dynamic_int8_lowbit_gemm(x_q, x_zero, x_scale, w_packed, bits, w_scale, group_size, bias=None):
    """y = x @ w.T with per-token int8 activations and grouped int4 / int2 weights (module docstring).

    Args:
        x_q: int8 (M, K), C-contiguous.
        x_zero: int32 (M,), each in [-128, 127].
        x_scale: float32 (M,).
        w_packed: uint8 (N, ceil(K * bits / 8)), ``lowbit_pack.pack_lowbit`` of w_q (N, K).
        bits: 4 or 2.
        w_scale: float32 (N, K / group_size).
        group_size: a divisor of K, at most ``MAX_GROUP_SIZE``.
        bias: float32 (N,) or None.

    Returns:
        A new float32 (M, N) array, the definition of the module docstring bit for bit.

    Raises:
        DTypeError, ShapeError (a wrong dtype, shape or a non-contiguous array, named),
        ConfigError (bits, group_size not dividing K, zero points out of range).
    """
    name = "dynamic_int8_lowbit_gemm"
    _check_array(x_q, name, "x_q", np.int8, (None, None), "(M, K)")
    rows, depth = x_q.shape
    _check_depth(name, depth)
    _check_array(x_zero, name, "x_zero", np.int32, (rows,), f"(M,) = ({rows},)")
    _check_array(x_scale, name, "x_scale", np.float32, (rows,), f"(M,) = ({rows},)")
    bits, cols, groups = _check_weights(name, depth, w_packed, bits, w_scale, group_size, bias)
    if rows and (x_zero.min() < -128 or x_zero.max() > 127):
        raise ConfigError(f"{name}: x_zero must lie in [-128, 127] (int8 activations), got values from "
                          f"{x_zero.min()} to {x_zero.max()}")
    out = np.empty((rows, cols), np.float32)
    if out.size == 0:
        return out
    bias, has_bias = _bias_arguments(bias)
    n_tasks = _task_count(cols)
    parallel = n_tasks > 1 and rows * cols * depth >= PARALLEL_MIN_MACS
    if USE_VNNI and group_size <= _FMA_MAX_GROUP_SIZE:
        padded = -(-group_size // 4) * 4
        blocks = -(-rows // 16)
        words = np.empty((blocks, groups * padded // 4, 16), np.uint32)
        x_words = x_q.view(np.uint32) if padded == group_size else np.empty((0, 0), np.uint32)
        _activation_words(x_q, x_words, group_size, padded, words)
        negative_zeros = np.zeros((blocks, 16), np.int32)
        negative_zeros.reshape(-1)[:rows] = -(x_zero + 128)
        driver = _dynamic_vnni_parallel if parallel else _dynamic_vnni_serial
        driver(words, negative_zeros, x_scale, w_packed, bits, w_scale, group_size, padded, bias, has_bias, n_tasks,
               scratch_for(parallel, (_TASK_ROWS, groups * padded), np.int8),
               scratch_for(parallel, (_TASK_ROWS, groups), np.int32),
               scratch_for(parallel, (_TASK_ROWS, groups), np.float64),
               scratch_for(parallel, (TILE_COLS, 16 * ROW_BLOCKS), np.float64), out)
        return out
    driver = _dynamic_loop_parallel if parallel else _dynamic_loop_serial
    with np.errstate(all="ignore"):  # plain Python: an inf or NaN scale goes through the IEEE arithmetic
        driver(x_q, x_zero, x_scale, w_packed, bits, w_scale, group_size, bias, has_bias, n_tasks,
               scratch_for(parallel, (_TASK_ROWS, depth), np.int8),
               scratch_for(parallel, (_TASK_ROWS, groups), np.int32),
               scratch_for(parallel, (_TASK_ROWS, groups), np.float64), out)
    return out


def weight_only_lowbit_gemm(x, w_packed, bits, w_scale, w_zero, group_size, bias=None):
    """y = x @ dequantize(w).T for float32 x and grouped int4 / int2 weights (module docstring).

    Args:
        x: float32 (M, K), C-contiguous.
        w_packed: uint8 (N, ceil(K * bits / 8)), ``lowbit_pack.pack_lowbit`` of w_q (N, K).
        bits: 4 or 2.
        w_scale: float32 (N, K / group_size).
        w_zero: int32 (N, K / group_size) or None (symmetric weights).
        group_size: a divisor of K, at most ``MAX_GROUP_SIZE``.
        bias: float32 (N,) or None.

    Returns:
        A new float32 (M, N) array: the float64 sums of the module docstring, in its order.

    Raises:
        DTypeError, ShapeError (a wrong dtype, shape or a non-contiguous array, named),
        ConfigError (bits, group_size not dividing K).
    """
    name = "weight_only_lowbit_gemm"
    _check_array(x, name, "x", np.float32, (None, None), "(M, K)")
    rows, depth = x.shape
    _check_depth(name, depth)
    bits, cols, groups = _check_weights(name, depth, w_packed, bits, w_scale, group_size, bias)
    if w_zero is None:
        zeros = np.broadcast_to(np.zeros(1, np.int32), (cols, groups))
    else:
        _check_array(w_zero, name, "w_zero", np.int32, (cols, groups), f"(N, K / group_size) = ({cols}, {groups})")
        zeros = w_zero
    out = np.empty((rows, cols), np.float32)
    if out.size == 0:
        return out
    bias, has_bias = _bias_arguments(bias)
    per = 8 // bits
    vector = USE_VECTOR_TILES and group_size % (LANES * per) == 0
    if vector:
        x_split = np.empty((rows, per, depth // per), np.float64)
        _split_phases(x, bits, not USE_LOOKUP, x_split)
    else:
        x_split = np.empty((0, per, 0), np.float64)
    n_tasks = _task_count(cols)
    parallel = n_tasks > 1 and rows * cols * depth >= PARALLEL_MIN_MACS
    driver = _weight_only_parallel if parallel else _weight_only_serial
    with np.errstate(all="ignore"):
        driver(x, x_split, w_packed, bits, w_zero is not None, zeros, w_scale, group_size, vector, bias, has_bias,
               n_tasks, scratch_for(parallel, (LANES,), np.float64), scratch_for(parallel, (LANES,), np.float64),
               scratch_for(parallel, (TILE_ROWS, TILE_COLS), np.float64), out)
    return out
