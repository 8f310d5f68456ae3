"""Integer-only int8 matrix multiplication and linear layer (Jacob et al. 2018).

Activations x_q (M, K) are uint8 or int8 with one zero point z_x; weights w_q (N, K) are int8,
symmetric per output channel (zero point 0); the bias is int32 at scale s_x * s_w[j]. Then

    acc[i, j] = sum_k (x_q[i, k] - z_x) * w_q[j, k] + bias_q[j]                 (int32)
    y_q[i, j] = clamp(z_y + rounding_divide_by_pot(
                    saturating_rounding_doubling_high_mul(acc[i, j] << left_j, M0_j), right_j), lo, hi)

with the fixed-point multiplier and shift of ``kernels/requantize.py`` (``shift`` > 0 shifts
right; a negative shift is a left shift, for multipliers >= 1; docs/numerics.md, "Integer-only
requantization"). ``lo = z_y`` gives a fused ReLU.

Exactness. The kernels compute ``sum_k x_q * w_q`` and subtract ``z_x * sum_k w_q[j, k]`` (the
weight's row sum, precomputed by :func:`pack_weights`). Every partial sum of products is an
integer of magnitude at most 255 * 128 * K (|x_q - z_x| <= 255, |w_q| <= 128; the raw products
obey the same bound), so for K <= ``MAX_DEPTH`` = 2^16 nothing overflows int32 and the result is
exactly the int64 sum; larger K is refused. The bias is added in int64 and the total saturates
to int32 (only a bias within 2^31 of the rails could get there), which is the accumulator the
requantization reads. The oracle in ``tests/kernels/test_int8_gemm.py`` computes all of it in
int64 NumPy and the kernels match it bit for bit, compiled or as plain Python.

Layout and speed. Both operands are read as rows that are contiguous in K, so the weights need
no reordering: :func:`pack_weights` checks them, makes them C-contiguous and computes the row
sums; pass its :class:`PackedWeights` instead of ``w_q`` to do that once per layer. int8
activations are mapped to uint8 by flipping the sign bit (x + 128; the zero point moves by 128
with them, so x - z_x is unchanged), and an int8 output is computed as uint8 with z_y, lo and
hi moved by 128 and its sign bit flipped on store: one compiled loop serves all four dtype
combinations.

The product is cache-blocked. A task owns a block of activation rows (sized so that the block,
``rows x K`` bytes, stays in the 1 MiB L2) and a block of weight rows; inside it a 4x4 register
tile of dot products runs over all of K for 4 activation rows and 4 weight rows at once, the
4 weight rows staying in L1 while the tile walks down the activation block. The tile is 16
scalar int32 reductions over one loop, written so that numba widens each product to int32 and
truncates each sum (``np.int32(c + a * b)``); LLVM vectorises it 16 lanes wide (on AVX-512:
``vpmovzxbd``/``vpmovsxbd`` loads and one ``vpdpwssd`` per pair of 16-lane rows, i.e. the
VNNI word multiply-add acting on zero-extended lanes, 16 multiply-adds an instruction). LLVM 22
does not form ``vpdpbusd``, the byte form with 64 multiply-adds an instruction, from this or
any other loop we tried, so on CPUs with AVX-512 VNNI the tile calls it explicitly (a numba
intrinsic, ``_dot_4x4_vnni``) for the part of K that is a multiple of 64 and lets the loop
finish the rest, several times the loop's speed (docs/benchmarks.md, "int8 runtime" and
"Measurements behind the code"). Tasks run under ``prange`` from ``PARALLEL_MIN_MACS``
multiply-adds on; below that the same tasks run serially.

>>> import numpy as np
>>> from qatcore.kernels.requantize import quantize_multiplier
>>> x = np.array([[130, 128, 255]], np.uint8)                 # z_x = 128: x - z_x = 2, 0, 127
>>> w = np.array([[1, 2, 3], [-1, 0, 1]], np.int8)
>>> int8_gemm_int32(x, 128, w)
array([[383, 125]], dtype=int32)
>>> m0, shift = quantize_multiplier(np.array([0.5, 0.25]))
>>> int8_linear(x, 128, w, np.array([1, -1], np.int32), m0, shift, 10, 0, 255, np.uint8)
array([[202,  41]], dtype=uint8)
"""

from typing import NamedTuple

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba import config, get_num_threads, get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qatcore.errors import ConfigError, DTypeError, ShapeError

from .requantize import MAX_SHIFT, MIN_SHIFT, requantize_value
from .requantize_float32 import requantize_float32_value

__all__ = ["MAX_DEPTH", "PackedWeights", "pack_weights", "int8_gemm_int32", "int8_linear"]

# Longest reduction (K, or C/groups * kh * kw for a convolution) the int32 accumulator holds
# exactly: 2^16 * 255 * 128 = 2139095040 < 2^31.
MAX_DEPTH = 1 << 16
# Activation rows per task: the block (rows x K bytes) is re-read from L2 for every 4 weight
# rows, so it should fill a good part of the 1 MiB L2 and no more.
_L2_BLOCK_BYTES = 256 * 1024
_MAX_ROW_BLOCK = 256
# Weight rows per task: enough to amortise the task, few enough to give 2 threads work.
_COL_BLOCK = 128
# Below this many multiply-adds the tasks run serially. On an idle machine the parallel
# driver already pays off at 2^24, but a parallel region started shortly after a
# multithreaded BLAS call waits for OpenBLAS's spinning threads to yield the cores, a delay
# of the same size at any problem size (kernels/fake_quant.py measured the same). An
# integer-only network calls no BLAS between its layers, so the threshold is set for that
# case, with a margin; the benchmark reports the int8 GEMM both alone and right after a float
# matmul (figures in docs/benchmarks.md, "Measurements behind the code").
PARALLEL_MIN_MACS = 1 << 26


class PackedWeights(NamedTuple):
    """int8 weights ready for the kernels (see :func:`pack_weights`).

    Attributes:
        matrix: int8, C-contiguous, (N, depth): one row per output channel.
        row_sums: int64 (N,), ``matrix.sum(axis=1)``: the zero-point correction.
        shape: the weight's original shape ((N, K) or (K, C/groups, kh, kw)).
    """

    matrix: np.ndarray
    row_sums: np.ndarray
    shape: tuple


def pack_weights(w_q):
    """Prepare int8 weights once for :func:`int8_linear` / ``int8_conv2d``.

    Args:
        w_q: int8 array, (N, K) for a linear layer or (K, C/groups, kh, kw) for a convolution.

    Returns:
        A :class:`PackedWeights`. A convolution's taps are reordered to (kh, kw, C/groups),
        the order in which ``int8_conv2d`` gathers its input (channels last), so
        ``matrix = w_q.transpose(0, 2, 3, 1).reshape(K, -1)``.

    Raises:
        DTypeError: w_q is not int8. ShapeError: not 2-d or 4-d, or a row longer than
        ``MAX_DEPTH``.

    >>> packed = pack_weights(np.arange(8, dtype=np.int8).reshape(1, 2, 2, 2))
    >>> packed.matrix, packed.row_sums, packed.shape
    (array([[0, 4, 1, 5, 2, 6, 3, 7]], dtype=int8), array([28]), (1, 2, 2, 2))
    """
    w_q = np.asarray(w_q)
    if w_q.dtype != np.int8:
        raise DTypeError(f"pack_weights: weights must be int8, got {w_q.dtype}")
    if w_q.ndim == 2:
        matrix = np.ascontiguousarray(w_q)
    elif w_q.ndim == 4:
        matrix = np.ascontiguousarray(w_q.transpose(0, 2, 3, 1)).reshape(w_q.shape[0], -1)
    else:
        raise ShapeError(f"pack_weights: weights must be (N, K) or (K, C/groups, kh, kw), got shape {w_q.shape}")
    check_depth(matrix.shape[1], "pack_weights")
    return PackedWeights(matrix, matrix.sum(axis=1, dtype=np.int64), tuple(w_q.shape))


# ----------------------------------------------------------------------------------------
# The VNNI tile. LLVM does not form AVX-512 VNNI's byte multiply-add, vpdpbusd (64 uint8 x
# int8 products summed in fours into 16 int32 lanes, no saturation), from any loop we wrote,
# so on CPUs that have it the 4x4 and 1x4 tiles call it explicitly for the part of K that is
# a multiple of 64: 16 vpdpbusd per 64 k, against 16 vpdpwssd per 16 k for the vectorised
# loops below (which finish the remainder, and do all of K elsewhere). Integer sums are exact,
# so both paths give the same bits. The flag is a global that numba freezes into the compiled
# code; numba's on-disk cache is keyed to the host CPU's name and features. Under
# NUMBA_DISABLE_JIT the portable loop runs.

USE_VNNI = not config.DISABLE_JIT and bool(llvmlite.binding.get_host_cpu_features().get("avx512vnni", False))


def _fold_masks(half):
    """shufflevector masks that fold two 16-lane vectors x, y into one: in each block of
    2 * half lanes, the first half gets x's lane pairs (i, i + half), the second y's."""
    low, high = [], []
    for lane in range(16):
        base, position = lane - lane % (2 * half), lane % (2 * half)
        source = base + position if position < half else 16 + base + position - half
        low.append(source)
        high.append(source + half)
    return low, high


def _fold_order(count):
    """Which input vector's total each lane of the folded vector holds (lane -> vector),
    found by folding sets of (vector, lane) labels exactly as the code below folds sums."""
    vectors = [[frozenset({(v, lane)}) for lane in range(16)] for v in range(count)]
    for half in (8, 4, 2, 1):
        low, high = _fold_masks(half)
        pairs = [(vectors[i], vectors[min(i + 1, len(vectors) - 1)]) for i in range(0, len(vectors), 2)]
        vectors = [[(x + y)[i] | (x + y)[j] for i, j in zip(low, high)] for x, y in pairs]
    return [next(iter({v for v, _ in labels})) for labels in vectors[0]]


def _vnni_tile(rows):
    """An intrinsic: the (rows x 4) dot products over 64 * chunks bytes, with vpdpbusd."""
    order = _fold_order(4 * rows)
    lanes_of = [order.index(v) for v in range(4 * rows)]

    @intrinsic
    def tile(typingctx, a, a_row, a_col, b, b_row, chunks):
        """(sum_k a[a_row + r, a_col + k] * b[b_row + c, k] for k < 64 * chunks) as int32,
        r-major (r * 4 + c); a uint8, b int8, both 2-d and contiguous along K."""
        result = types.UniTuple(types.int32, 4 * rows)

        def codegen(context, builder, signature, args):
            a_type, _, _, b_type, _, _ = signature.args
            a_value, row, col, b_value, b_first, n_chunks = args
            int32, int64 = ir.IntType(32), ir.IntType(64)
            lanes, bytes64 = ir.VectorType(int32, 16), ir.VectorType(ir.IntType(8), 64)
            a_array = context.make_array(a_type)(context, builder, a_value)
            b_array = context.make_array(b_type)(context, builder, b_value)
            a_stride = cgutils.unpack_tuple(builder, a_array.strides, 2)[0]
            b_stride = cgutils.unpack_tuple(builder, b_array.strides, 2)[0]
            a_rows = [builder.gep(a_array.data, [builder.add(builder.mul(builder.add(row, int64(r)), a_stride), col)])
                      for r in range(rows)]
            b_rows = [builder.gep(b_array.data, [builder.mul(builder.add(b_first, int64(c)), b_stride)])
                      for c in range(4)]
            dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                                    "llvm.x86.avx512.vpdpbusd.512")
            sums = [cgutils.alloca_once_value(builder, ir.Constant(lanes, None)) for _ in range(4 * rows)]

            def load64(row_start, offset):  # 64 bytes, unaligned, as 16 int32 lanes of 4 bytes
                pointer = builder.bitcast(builder.gep(row_start, [offset]), bytes64.as_pointer())
                return builder.bitcast(builder.load(pointer, align=1), lanes)

            with cgutils.for_range(builder, n_chunks) as loop:
                offset = builder.mul(loop.index, int64(64))
                x = [load64(p, offset) for p in a_rows]
                w = [load64(p, offset) for p in b_rows]
                for r in range(rows):
                    for c in range(4):
                        total = builder.call(dpbusd, [builder.load(sums[4 * r + c]), x[r], w[c]])
                        builder.store(total, sums[4 * r + c])
            # Sum each vector's 16 lanes: fold pairs of vectors into one (two shuffles and an
            # add a pair, 4 levels) instead of reducing each vector on its own (8 instructions
            # apiece), then read each total from its lane.
            vectors = [builder.load(s) for s in sums]
            for half in (8, 4, 2, 1):
                low, high = (ir.Constant(lanes, [int32(i) for i in m]) for m in _fold_masks(half))
                pairs = [(vectors[i], vectors[min(i + 1, len(vectors) - 1)]) for i in range(0, len(vectors), 2)]
                vectors = [builder.add(builder.shuffle_vector(x, y, low), builder.shuffle_vector(x, y, high))
                           for x, y in pairs]
            totals = [builder.extract_element(vectors[0], int32(lane)) for lane in lanes_of]
            return context.make_tuple(builder, result, totals)

        return result(a, types.intp, types.intp, b, types.intp, types.intp), codegen

    return tile


_dot_4x4_vnni = _vnni_tile(4)
_dot_1x4_vnni = _vnni_tile(1)


# ----------------------------------------------------------------------------------------
# Register tiles: dot products of rows of a (activations, uint8) with rows of b (weights,
# int8) over ``depth`` elements, a read from column ``a_col`` on. Widths are explicit: numba
# would widen every product and sum to int64, and NumPy (plain Python) keeps int32 * int32 in
# int32; np.int32(c + x * w) makes both compute int32 sums, which never overflow (module
# docstring), and is the form LLVM vectorises. The loops index the 2-d arrays directly with
# unsigned offsets: a row view costs an atomic reference-count update in numba (a call, in
# code loaded from the on-disk cache), which at 8 views a tile cost a large share of a
# convolution (docs/benchmarks.md, "Measurements behind the code"), and a signed index would
# be tested for Python's negative wraparound.


@njit(cache=True)
def _store(acc, transposed, row, col, value):
    if transposed:
        acc[col, row] = value
    else:
        acc[row, col] = value


@njit(cache=True)
def _dot_4x4(a, a_row, a_col, b, b_row, depth, acc, acc_row, acc_col, transposed):
    """acc[acc_row + r, acc_col + c] = sum_k a[a_row + r, a_col + k] * b[b_row + c, k], r, c < 4."""
    i0, i1, i2, i3 = np.uintp(a_row), np.uintp(a_row + 1), np.uintp(a_row + 2), np.uintp(a_row + 3)
    j0, j1, j2, j3 = np.uintp(b_row), np.uintp(b_row + 1), np.uintp(b_row + 2), np.uintp(b_row + 3)
    col = np.uintp(a_col)
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.int32(0)
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = np.int32(0)
    start = 0
    if USE_VNNI and depth >= 64:
        start = depth - depth % 64
        (c00, c01, c02, c03, c10, c11, c12, c13,
         c20, c21, c22, c23, c30, c31, c32, c33) = _dot_4x4_vnni(a, a_row, a_col, b, b_row, start // 64)
    for k in range(np.uintp(start), np.uintp(depth)):
        x0, x1 = np.int32(a[i0, col + k]), np.int32(a[i1, col + k])
        x2, x3 = np.int32(a[i2, col + k]), np.int32(a[i3, col + k])
        w0, w1, w2, w3 = np.int32(b[j0, k]), np.int32(b[j1, k]), np.int32(b[j2, k]), np.int32(b[j3, k])
        c00 = np.int32(c00 + x0 * w0)
        c01 = np.int32(c01 + x0 * w1)
        c02 = np.int32(c02 + x0 * w2)
        c03 = np.int32(c03 + x0 * w3)
        c10 = np.int32(c10 + x1 * w0)
        c11 = np.int32(c11 + x1 * w1)
        c12 = np.int32(c12 + x1 * w2)
        c13 = np.int32(c13 + x1 * w3)
        c20 = np.int32(c20 + x2 * w0)
        c21 = np.int32(c21 + x2 * w1)
        c22 = np.int32(c22 + x2 * w2)
        c23 = np.int32(c23 + x2 * w3)
        c30 = np.int32(c30 + x3 * w0)
        c31 = np.int32(c31 + x3 * w1)
        c32 = np.int32(c32 + x3 * w2)
        c33 = np.int32(c33 + x3 * w3)
    for c, (v0, v1, v2, v3) in enumerate(((c00, c10, c20, c30), (c01, c11, c21, c31),
                                          (c02, c12, c22, c32), (c03, c13, c23, c33))):
        _store(acc, transposed, acc_row, acc_col + c, v0)
        _store(acc, transposed, acc_row + 1, acc_col + c, v1)
        _store(acc, transposed, acc_row + 2, acc_col + c, v2)
        _store(acc, transposed, acc_row + 3, acc_col + c, v3)


@njit(cache=True)
def _dot_1x4(a, a_row, a_col, b, b_row, depth, acc, acc_row, acc_col, transposed):
    """One activation row against 4 weight rows (the rows left over below a multiple of 4)."""
    i0, col = np.uintp(a_row), np.uintp(a_col)
    j0, j1, j2, j3 = np.uintp(b_row), np.uintp(b_row + 1), np.uintp(b_row + 2), np.uintp(b_row + 3)
    c0 = c1 = c2 = c3 = np.int32(0)
    start = 0
    if USE_VNNI and depth >= 64:
        start = depth - depth % 64
        c0, c1, c2, c3 = _dot_1x4_vnni(a, a_row, a_col, b, b_row, start // 64)
    for k in range(np.uintp(start), np.uintp(depth)):
        x0 = np.int32(a[i0, col + k])
        c0 = np.int32(c0 + x0 * np.int32(b[j0, k]))
        c1 = np.int32(c1 + x0 * np.int32(b[j1, k]))
        c2 = np.int32(c2 + x0 * np.int32(b[j2, k]))
        c3 = np.int32(c3 + x0 * np.int32(b[j3, k]))
    _store(acc, transposed, acc_row, acc_col, c0)
    _store(acc, transposed, acc_row, acc_col + 1, c1)
    _store(acc, transposed, acc_row, acc_col + 2, c2)
    _store(acc, transposed, acc_row, acc_col + 3, c3)


@njit(cache=True)
def _dot_4x1(a, a_row, a_col, b, b_row, depth, acc, acc_row, acc_col, transposed):
    """4 activation rows against one weight row (the weight rows left over)."""
    i0, i1, i2, i3 = np.uintp(a_row), np.uintp(a_row + 1), np.uintp(a_row + 2), np.uintp(a_row + 3)
    j0, col = np.uintp(b_row), np.uintp(a_col)
    c0 = c1 = c2 = c3 = np.int32(0)
    for k in range(np.uintp(depth)):
        w0 = np.int32(b[j0, k])
        c0 = np.int32(c0 + np.int32(a[i0, col + k]) * w0)
        c1 = np.int32(c1 + np.int32(a[i1, col + k]) * w0)
        c2 = np.int32(c2 + np.int32(a[i2, col + k]) * w0)
        c3 = np.int32(c3 + np.int32(a[i3, col + k]) * w0)
    _store(acc, transposed, acc_row, acc_col, c0)
    _store(acc, transposed, acc_row + 1, acc_col, c1)
    _store(acc, transposed, acc_row + 2, acc_col, c2)
    _store(acc, transposed, acc_row + 3, acc_col, c3)


@njit(cache=True)
def _dot_1x1(a, a_row, a_col, b, b_row, depth, acc, acc_row, acc_col, transposed):
    i0, j0, col = np.uintp(a_row), np.uintp(b_row), np.uintp(a_col)
    c = np.int32(0)
    for k in range(np.uintp(depth)):
        c = np.int32(c + np.int32(a[i0, col + k]) * np.int32(b[j0, k]))
    _store(acc, transposed, acc_row, acc_col, c)


@njit(cache=True)
def gemm_block(a, a_lo, a_hi, a_col, b, b_lo, b_hi, depth, acc, transposed):
    """acc[r, c] = sum_k a[a_lo + r, a_col + k] * b[b_lo + c, k] (raw products, no zero point),
    or acc[c, r] = ... if transposed (channel-major, for a convolution's output planes).

    ``a`` is the activation operand (uint8 rows), ``b`` the weights (int8 rows, each ``depth``
    long); acc is int32 with at least (a_hi - a_lo, b_hi - b_lo) elements. The 4 weight rows
    of a tile stay in L1 while the tile walks down the activation block, which the caller
    keeps small enough for L2. Also used by ``int8_conv2d``.
    """
    rows, cols = a_hi - a_lo, b_hi - b_lo
    full_rows, full_cols = rows - rows % 4, cols - cols % 4
    for c in range(0, full_cols, 4):
        for r in range(0, full_rows, 4):
            _dot_4x4(a, a_lo + r, a_col, b, b_lo + c, depth, acc, r, c, transposed)
        for r in range(full_rows, rows):
            _dot_1x4(a, a_lo + r, a_col, b, b_lo + c, depth, acc, r, c, transposed)
    for c in range(full_cols, cols):
        for r in range(0, full_rows, 4):
            _dot_4x1(a, a_lo + r, a_col, b, b_lo + c, depth, acc, r, c, transposed)
        for r in range(full_rows, rows):
            _dot_1x1(a, a_lo + r, a_col, b, b_lo + c, depth, acc, r, c, transposed)


# ----------------------------------------------------------------------------------------
# Epilogues: a block of raw sums to the output. ``offset[j] = bias[j] - z_x * row_sums[j]``
# (int64) turns a raw sum into the accumulator. Rows of acc are activation rows, columns are
# output channels; ``transposed`` stores channel-major (a convolution's (K, OH*OW) plane).
# The inner loops run along the output's contiguous axis and vectorise.


@njit(cache=True)
def requantize_block(acc, rows, cols, out, out_row, out_col, transposed, channel0, offset, multiplier,
                     shift, scale, out_zero_point, clamp_min, clamp_max, flip):
    """out[out_row + r, out_col + c] = requantize_value(acc[r, c] + offset[channel0 + c], ...) ^ flip
    for r < rows, c < cols; if transposed, out[out_row + c, out_col + r] from acc[c, r].
    A non-empty ``scale`` (float32, per channel) selects ``requantize_float32_value`` instead."""
    o_col, n_rows, n_cols = np.uintp(out_col), np.uintp(rows), np.uintp(cols)
    use_float = scale.size > 0
    if transposed:
        for c in range(n_cols):
            j, o_row = np.uintp(channel0) + c, np.uintp(out_row) + c
            bias, m0, n = offset[j], multiplier[j], shift[j]
            if use_float:
                m = scale[j]
                for r in range(n_rows):
                    y = requantize_float32_value(np.int64(acc[c, r]) + bias, m, out_zero_point, clamp_min, clamp_max)
                    out[o_row, o_col + r] = y ^ flip
            else:
                for r in range(n_rows):
                    y = requantize_value(np.int64(acc[c, r]) + bias, m0, n, out_zero_point, clamp_min, clamp_max)
                    out[o_row, o_col + r] = y ^ flip
    else:
        channel = np.uintp(channel0)
        for r in range(n_rows):
            o_row = np.uintp(out_row) + r
            if use_float:
                for c in range(n_cols):
                    j = channel + c
                    y = requantize_float32_value(np.int64(acc[r, c]) + offset[j], scale[j], out_zero_point,
                                                 clamp_min, clamp_max)
                    out[o_row, o_col + c] = y ^ flip
            else:
                for c in range(n_cols):
                    j = channel + c
                    y = requantize_value(np.int64(acc[r, c]) + offset[j], multiplier[j], shift[j], out_zero_point,
                                         clamp_min, clamp_max)
                    out[o_row, o_col + c] = y ^ flip


@njit(cache=True)
def _store_int32_block(acc, rows, cols, out, out_row, out_col, offset):
    """out[out_row + r, out_col + c] = acc[r, c] + offset[out_col + c] (fits int32 exactly)."""
    o_col = np.uintp(out_col)
    for r in range(np.uintp(rows)):
        o_row = np.uintp(out_row) + r
        for c in range(np.uintp(cols)):
            out[o_row, o_col + c] = np.int32(np.int64(acc[r, c]) + offset[o_col + c])


# ----------------------------------------------------------------------------------------
# Tasks and drivers. Task t covers activation rows [rb * row_block, ...) and weight rows
# [cb * col_block, ...) with (rb, cb) = divmod(t, column blocks), and accumulates into its
# thread's slice of ``scratch``, allocated once per call by NumPy: numba's own allocations of
# ~100 KiB blocks per task come back as fresh pages from the system every time, and their
# page faults cost a noticeable share of a convolution (docs/benchmarks.md, "Measurements
# behind the code"). The parallel and serial drivers are separate
# functions so that their compilations are cached separately (prange hands out uint64 indices;
# mixed with int64, numba would promote the arithmetic to float64).


@njit(cache=True)
def _task_bounds(task, rows, cols, row_block, col_block):
    col_blocks = -(-cols // col_block)
    rb, cb = task // col_blocks, task % col_blocks
    r0, c0 = rb * row_block, cb * col_block
    return r0, min(rows, r0 + row_block), c0, min(cols, c0 + col_block)


@njit(cache=True)
def _gemm_task(task, x, w, offset, row_block, col_block, acc, out):
    r0, r1, c0, c1 = _task_bounds(task, x.shape[0], w.shape[0], row_block, col_block)
    gemm_block(x, r0, r1, 0, w, c0, c1, w.shape[1], acc, False)
    _store_int32_block(acc, r1 - r0, c1 - c0, out, r0, c0, offset)


@njit(cache=True)
def _linear_task(task, x, w, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, row_block,
                 col_block, acc, out):
    r0, r1, c0, c1 = _task_bounds(task, x.shape[0], w.shape[0], row_block, col_block)
    gemm_block(x, r0, r1, 0, w, c0, c1, w.shape[1], acc, False)
    requantize_block(acc, r1 - r0, c1 - c0, out, r0, c0, False, c0, offset, multiplier, shift, scale, out_zero_point,
                     clamp_min, clamp_max, flip)


@njit(cache=True, parallel=True)
def _gemm_parallel(x, w, offset, row_block, col_block, n_tasks, scratch, out):
    for task in prange(n_tasks):
        _gemm_task(np.int64(task), x, w, offset, row_block, col_block, scratch[get_thread_id()], out)


@njit(cache=True)
def _gemm_serial(x, w, offset, row_block, col_block, n_tasks, scratch, out):
    for task in range(n_tasks):
        _gemm_task(task, x, w, offset, row_block, col_block, scratch[0], out)


@njit(cache=True, parallel=True)
def _linear_parallel(x, w, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, row_block,
                     col_block, n_tasks, scratch, out):
    for task in prange(n_tasks):
        _linear_task(np.int64(task), x, w, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip,
                     row_block, col_block, scratch[get_thread_id()], out)


@njit(cache=True)
def _linear_serial(x, w, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, row_block,
                   col_block, n_tasks, scratch, out):
    for task in range(n_tasks):
        _linear_task(task, x, w, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip,
                     row_block, col_block, scratch[0], out)


def scratch_for(parallel, shape, dtype):
    """One work buffer per thread that may run tasks (numba's thread ids are 0 .. threads - 1)."""
    return np.empty((get_num_threads() if parallel else 1,) + tuple(shape), dtype)


# ----------------------------------------------------------------------------------------
# Validation and argument preparation, shared with int8_conv.py.


def check_depth(depth, name):
    if depth > MAX_DEPTH:
        raise ShapeError(
            f"{name}: reduction length {depth} exceeds MAX_DEPTH = {MAX_DEPTH}; beyond it the int32 "
            f"accumulator can overflow (|x - z_x| * |w| <= 255 * 128 per product). Split the "
            f"reduction and add the int32 partial results in int64."
        )


def activations_as_uint8(x_q, x_zero_point, name):
    """(x as uint8, z_x as uint8-grid int): int8 activations get their sign bit flipped (+128)."""
    if not isinstance(x_q, np.ndarray) or x_q.dtype not in (np.uint8, np.int8):
        raise DTypeError(f"{name}: activations must be a uint8 or int8 array, got "
                         f"{getattr(x_q, 'dtype', type(x_q).__name__)}")
    info = np.iinfo(x_q.dtype)
    if not isinstance(x_zero_point, (int, np.integer)) or not info.min <= x_zero_point <= info.max:
        raise ConfigError(f"{name}: x_zero_point must be an integer in [{info.min}, {info.max}] for "
                          f"{x_q.dtype} activations, got {x_zero_point!r}")
    if x_q.dtype == np.int8:
        return np.bitwise_xor(x_q.view(np.uint8), np.uint8(0x80)), int(x_zero_point) + 128
    return np.ascontiguousarray(x_q), int(x_zero_point)


def as_packed(w_q, ndim, name):
    packed = w_q if isinstance(w_q, PackedWeights) else pack_weights(w_q)
    if len(packed.shape) != ndim:
        raise ShapeError(f"{name}: weights must have {ndim} dimensions, got shape {packed.shape}")
    return packed


def channel_parameters(packed, x_zero_point, bias_q, multiplier, shift, name):
    """(offset int64, multiplier int64, shift int64, scale float32), one per output channel,
    validated. A float32 ``multiplier`` (with ``shift`` None) is the float32 requantization:
    it comes back as ``scale`` (multiplier and shift zeros); otherwise ``scale`` is empty."""
    channels = packed.matrix.shape[0]

    def per_channel(values, what, dtype):
        values = np.asarray(values)
        if values.dtype != dtype:
            raise DTypeError(f"{name}: {what} must be {np.dtype(dtype)}, got {values.dtype}")
        if values.shape not in ((channels,), (1,)):
            raise ShapeError(f"{name}: {what} must have shape ({channels},) (one per output channel) or (1,), "
                             f"got {values.shape}")
        return np.broadcast_to(values, (channels,)).astype(np.int64)

    bias = np.zeros(channels, np.int64) if bias_q is None else per_channel(bias_q, "bias_q", np.int32)
    offset = bias - x_zero_point * packed.row_sums
    if np.asarray(multiplier).dtype == np.float32:
        if shift is not None:
            raise ConfigError(f"{name}: a float32 multiplier (float32 requantization) takes shift=None, "
                              f"got a shift")
        scale = np.broadcast_to(np.asarray(multiplier), (channels,)) if np.asarray(multiplier).shape in (
            (channels,), (1,)) else None
        if scale is None:
            raise ShapeError(f"{name}: multiplier must have shape ({channels},) (one per output channel) or (1,), "
                             f"got {np.asarray(multiplier).shape}")
        if not np.all(np.isfinite(scale) & (scale > 0)):
            raise ConfigError(f"{name}: a float32 multiplier must be positive and finite, got "
                              f"{scale[~(np.isfinite(scale) & (scale > 0))][:5].tolist()}")
        zeros = np.zeros(channels, np.int64)
        return offset, zeros, zeros, np.ascontiguousarray(scale, dtype=np.float32)
    multiplier = per_channel(multiplier, "multiplier", np.int32)
    shift = per_channel(shift, "shift", np.int32)
    if np.any(multiplier < 2**30):
        raise ConfigError(f"{name}: multiplier (M0) must lie in [2^30, 2^31), as quantize_multiplier returns it; "
                          f"got {multiplier[multiplier < 2**30][:5].tolist()}")
    if np.any((shift < MIN_SHIFT) | (shift > MAX_SHIFT)):
        raise ConfigError(f"{name}: shift must lie in [{MIN_SHIFT}, {MAX_SHIFT}] (negative = left shift, "
                          f"for multipliers >= 1); got {shift[(shift < MIN_SHIFT) | (shift > MAX_SHIFT)][:5].tolist()}")
    return offset, multiplier, shift, np.empty(0, np.float32)


def output_parameters(out_zero_point, clamp_min, clamp_max, out_dtype, name):
    """(z_y, lo, hi, flip) on the uint8 grid the kernels store, and the output dtype."""
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (np.uint8, np.int8):
        raise DTypeError(f"{name}: out_dtype must be uint8 or int8, got {out_dtype}")
    info = np.iinfo(out_dtype)
    for what, value in (("out_zero_point", out_zero_point), ("clamp_min", clamp_min), ("clamp_max", clamp_max)):
        if not isinstance(value, (int, np.integer)) or not info.min <= value <= info.max:
            raise ConfigError(f"{name}: {what} must be an integer in [{info.min}, {info.max}] for {out_dtype} "
                              f"output, got {value!r}")
    if clamp_min > clamp_max:
        raise ConfigError(f"{name}: clamp_min {clamp_min} > clamp_max {clamp_max}")
    move = 128 if out_dtype == np.int8 else 0
    return int(out_zero_point) + move, int(clamp_min) + move, int(clamp_max) + move, move, out_dtype


def row_block_for(depth):
    """Activation rows per block: about _L2_BLOCK_BYTES of them, a multiple of 4."""
    return max(4, min(_MAX_ROW_BLOCK, _L2_BLOCK_BYTES // max(depth, 1)) // 4 * 4)


# ----------------------------------------------------------------------------------------
# Public functions


def _check_operands(x_u8, packed, name):
    if x_u8.ndim != 2 or x_u8.shape[1] != packed.matrix.shape[1]:
        raise ShapeError(f"{name}: activations must be (M, {packed.matrix.shape[1]}) for weights of shape "
                         f"{packed.shape}, got {x_u8.shape}")
    check_depth(x_u8.shape[1], name)


def int8_gemm_int32(x_q, x_zero_point, w_q):
    """acc[i, j] = sum_k (x_q[i, k] - x_zero_point) * w_q[j, k], exactly, as int32.

    Args:
        x_q: (M, K) uint8 or int8 activations.
        x_zero_point: an integer in x_q's dtype range.
        w_q: (N, K) int8 weights, or :func:`pack_weights` of them. K <= ``MAX_DEPTH``.

    Returns:
        A new (M, N) int32 array.

    Raises:
        DTypeError, ShapeError, ConfigError (ValueErrors but DTypeError): wrong dtypes, shapes,
        K > MAX_DEPTH, a zero point outside the dtype's range.
    """
    packed = as_packed(w_q, 2, "int8_gemm_int32")
    x_u8, zero_point = activations_as_uint8(x_q, x_zero_point, "int8_gemm_int32")
    _check_operands(x_u8, packed, "int8_gemm_int32")
    (rows, depth), cols = x_u8.shape, packed.matrix.shape[0]
    out = np.empty((rows, cols), np.int32)
    if out.size == 0:
        return out
    offset = -zero_point * packed.row_sums
    row_block, col_block = row_block_for(depth), _COL_BLOCK
    n_tasks = -(-rows // row_block) * -(-cols // col_block)
    parallel = n_tasks > 1 and rows * cols * depth >= PARALLEL_MIN_MACS
    driver = _gemm_parallel if parallel else _gemm_serial
    scratch = scratch_for(parallel, (row_block, col_block), np.int32)
    driver(x_u8, packed.matrix, offset, row_block, col_block, n_tasks, scratch, out)
    return out


def int8_linear(x_q, x_zero_point, w_q, bias_q, multiplier, shift, out_zero_point, clamp_min, clamp_max, out_dtype):
    """Integer-only linear layer: y_q = requantize(int8_gemm_int32(x_q, z_x, w_q) + bias_q).

    Args:
        x_q: (M, K) uint8 or int8 activations; x_zero_point: z_x, in their dtype's range.
        w_q: (N, K) int8 weights (symmetric, zero point 0), or :func:`pack_weights` of them.
        bias_q: (N,) int32 at scale s_x * s_w[j], or None.
        multiplier, shift: (N,) int32 (or (1,)) from ``requantize.quantize_multiplier`` of
            s_x * s_w[j] / s_y: M0 in [2^30, 2^31), shift in [-31, 31] (negative = left);
            or a float32 multiplier (N,) or (1,) and shift None: the float32 requantization
            of ``requantize_float32``.
        out_zero_point, clamp_min, clamp_max: z_y and the clamp, in out_dtype's range
            (clamp_min = z_y fuses a ReLU).
        out_dtype: np.uint8 or np.int8.

    Returns:
        A new (M, N) array of out_dtype, the formula of the module docstring.

    Raises:
        DTypeError, ShapeError, ConfigError as for :func:`int8_gemm_int32`, and for a
        multiplier or shift out of range or parameters of the wrong shape or dtype.
    """
    name = "int8_linear"
    packed = as_packed(w_q, 2, name)
    x_u8, zero_point = activations_as_uint8(x_q, x_zero_point, name)
    _check_operands(x_u8, packed, name)
    offset, multiplier, shift, scale = channel_parameters(packed, zero_point, bias_q, multiplier, shift, name)
    out_zero_point, clamp_min, clamp_max, flip, out_dtype = output_parameters(out_zero_point, clamp_min, clamp_max,
                                                                           out_dtype, name)
    (rows, depth), cols = x_u8.shape, packed.matrix.shape[0]
    out = np.empty((rows, cols), np.uint8)
    if out.size:
        row_block, col_block = row_block_for(depth), _COL_BLOCK
        n_tasks = -(-rows // row_block) * -(-cols // col_block)
        parallel = n_tasks > 1 and rows * cols * depth >= PARALLEL_MIN_MACS
        driver = _linear_parallel if parallel else _linear_serial
        scratch = scratch_for(parallel, (row_block, col_block), np.int32)
        driver(x_u8, packed.matrix, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip,
               row_block,
               col_block, n_tasks, scratch, out)
    return out.view(out_dtype)
