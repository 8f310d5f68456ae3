"""Per-token and per-group fake quantization with dynamic qparams, forward and straight-through backward.

The arithmetic is that of docs/numerics.md ("Per-group and per-token fake quantization"),
torchao 0.18's ``IntxFakeQuantizer``, bit for bit what the NumPy code of
``qatcore.quantization.group_token_fake_quantize`` computes (the tests' oracle). ``x`` is
viewed as ``rows`` of ``n`` contiguous elements, one *block* each: a token (per token,
``n`` = the last axis) or a group (per group, ``n = group_size``); for a C-contiguous ``x``,
``x.reshape(-1, n)`` is that view. Per row, with ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``
and every operation rounding to x's dtype:

    pass 1    lo = min(row), hi = max(row)                # both NaN if the row holds one (np.min's rule)
    qparams   symmetric       mn = min(lo, 0), mx = max(hi, 0)
                              s = max(max(-mn, mx) / ((qmax - qmin) / 2), tiny);  z = 0
              affine token    s = max((mx - mn) / (qmax - qmin), tiny)
                              z = clamp(qmin - rne(mn / s), qmin, qmax)
              affine group    s = max((hi - lo) / (2^b - 1), 1e-6)
                              z = int32(lo + s * 2^(b-1))      # truncated; -2^31 outside int32 or NaN
              inv = 1 / s
    pass 2    q = rne(x * inv) + z;   y = (clamp(q, qmin, qmax) - z) * s;   inside = qmin <= q <= qmax
    backward  dx = where(inside, dy * s, 0) * inv

The maxima and minima here propagate NaN, as ``np.maximum`` / ``np.minimum`` do, so a row
holding a NaN gets ``s = NaN`` (z = NaN, or -2^31 for an affine group), ``y = NaN`` and
``inside = False`` everywhere, and ``dx = 0 * NaN = NaN``: what the NumPy code gives. The
clamp is two selects, which let a NaN ``q`` through, like ``np.clip``.

Float types. The kernels compile one specialisation per dtype (float32 for training, float64
for the gradient checks); every constant (``qmin``, the divisor, ``tiny``, ...) comes in as an
argument of x's dtype, made by the Python wrapper, because under the jit a float32 times a
Python float is a float64: a literal in the arithmetic would silently change its rounding.

Pass 1 compares integers. Read as a signed integer ``b``, a float's bits are ordered as the
floats are once the magnitude bits of the negative ones are flipped, ``k = b ^ ((b >> 31) &
0x7fffffff)`` (float32; 63 and 2^63 - 1 for float64): -0.0 sorts just below +0.0, and a NaN
lies beyond the infinities (a positive NaN above +inf, a negative one below -inf), so the row's
smallest or largest key is a NaN's exactly when the row holds a NaN. LLVM vectorises this
integer min/max reduction; a float one it leaves scalar unless told to ignore NaN (fast-math),
which would lose np.min's rule. Signed zeros need no care: ``lo`` and ``hi`` enter every formula
through a subtraction, an addition of a positive value, or a max with a positive floor, where
the sign of a zero changes nothing. Pass 1 writes each row's (min, max) as bits into an integer
view of a float array, which pass 2 then reads as floats.

The forward is two sweeps over the rows (pass 1, then pass 2), serially. It writes ``inside``
(one byte an element) for the backward, which then reads the gradient, that mask and one
(s, inv) per row; recomputing q instead would read x (four bytes an element) and redo the
rounding, which measured slower over a forward and backward.

>>> import numpy as np
>>> x = np.array([[0.0, 0.1, -0.2, 0.75], [1.0, 2.0, 3.0, 4.0]], np.float32)
>>> y, inside, scale, inv_scale = block_fake_quantize_forward(x, 4, 4, True)   # s = 0.75 / 7.5 = 0.1
>>> y[0], inside[0]                          # 0.75 * 10 = 7.5 rounds to 8, beyond qmax = 7
(array([ 0. ,  0.1, -0.2,  0.7], dtype=float32), array([ True,  True,  True, False]))
>>> block_fake_quantize_backward(np.ones_like(x), inside, scale, inv_scale)[0]
array([1., 1., 1., 0.], dtype=float32)
"""

import numpy as np
from numba import njit

__all__ = ["block_fake_quantize_forward", "block_fake_quantize_backward"]

# The three qparams rules, one code each (compile-time constants in the kernels).
SYMMETRIC, AFFINE_TOKEN, AFFINE_GROUP = 0, 1, 2
# torchao's get_groupwise_affine_qparams: the minimum scale of an affine group
_GROUP_AFFINE_EPS = 1e-6


# ----------------------------------------------------------------------------------------
# Per value: NaN-propagating max/min (np.maximum / np.minimum) and the NaN-passing clamp.


@njit(cache=True)
def _maximum(a, b):
    return a if (a > b) | (a != a) else b


@njit(cache=True)
def _minimum(a, b):
    return a if (a < b) | (a != a) else b


@njit(cache=True)
def _clamp(q, qmin, qmax):
    q = qmin if q < qmin else q
    return qmax if q > qmax else q


# ----------------------------------------------------------------------------------------
# Pass 1, on the bits: the range of each row.


@njit(cache=True)
def _order_key(bits, sign_shift, magnitude):
    """The float's bits ``b`` (a signed integer) to a key ordered as the floats are: a
    positive float's bits already are; a negative one's magnitude bits are flipped. The map
    is its own inverse."""
    return bits ^ ((bits >> sign_shift) & magnitude)


@njit(cache=True)
def _row_range_bits(row_bits, sign_shift, magnitude):
    """The bits of the elements with the smallest and the largest key of one row."""
    key_min = key_max = _order_key(row_bits[0], sign_shift, magnitude)
    for i in range(row_bits.size):
        key = _order_key(row_bits[i], sign_shift, magnitude)
        key_min = key if key < key_min else key_min
        key_max = key if key > key_max else key_max
    return _order_key(key_min, sign_shift, magnitude), _order_key(key_max, sign_shift, magnitude)


@njit(cache=True)
def _ranges(rows_bits, ranges_bits, sign_shift, magnitude):
    for r in range(rows_bits.shape[0]):
        ranges_bits[r, 0], ranges_bits[r, 1] = _row_range_bits(rows_bits[r], sign_shift, magnitude)


# ----------------------------------------------------------------------------------------
# Pass 2: the qparams of each row from its range, then y and the mask.


@njit(cache=True)
def _row_qparams(lo, hi, scheme, constants):
    """(s, z, inv) of one row from its range, by the module docstring's table."""
    qmin, qmax, divisor, floor, offset, int32_min, int32_end, zero, one = constants
    if scheme == AFFINE_GROUP:
        scale = _maximum((hi - lo) / divisor, floor)
        v = lo + scale * offset
        # PyTorch's float -> int32 on x86: truncation, and -2^31 for NaN and out of range
        zero_point = np.trunc(v) if (v >= int32_min) & (v < int32_end) else int32_min
    else:
        mn, mx = _minimum(lo, zero), _maximum(hi, zero)
        if scheme == SYMMETRIC:
            scale = _maximum(_maximum(-mn, mx) / divisor, floor)
            zero_point = zero
        else:
            scale = _maximum((mx - mn) / divisor, floor)
            zero_point = _clamp(qmin - np.rint(mn / scale), qmin, qmax)
    return scale, zero_point, one / scale


@njit(cache=True)
def _forward_row(row, y, inside, scale, zero_point, inv_scale, qmin, qmax):
    for i in range(row.size):
        q = np.rint(row[i] * inv_scale) + zero_point
        inside[i] = (q >= qmin) & (q <= qmax)
        y[i] = (_clamp(q, qmin, qmax) - zero_point) * scale


@njit(cache=True)
def _range_qparams(ranges, r, scheme, constants):
    """(s, z, inv) of row ``r`` from its ``_ranges`` entry; a row holding a NaN gets NaN
    qparams, as np.min and np.max both give NaN there."""
    lo, hi = ranges[r, 0], ranges[r, 1]
    if (lo != lo) | (hi != hi):
        lo = hi = lo if lo != lo else hi
    return _row_qparams(lo, hi, scheme, constants)


@njit(cache=True)
def _forward(rows, ranges, y, inside, scale, inv_scale, scheme, constants):
    qmin, qmax = constants[0], constants[1]
    for r in range(rows.shape[0]):
        s, z, inv = _range_qparams(ranges, r, scheme, constants)
        scale[r], inv_scale[r] = s, inv
        _forward_row(rows[r], y[r], inside[r], s, z, inv, qmin, qmax)


# ----------------------------------------------------------------------------------------
# Backward.


@njit(cache=True)
def _backward_row(grad, inside, dx, scale, inv_scale, zero):
    for i in range(grad.size):
        dx[i] = (grad[i] * scale if inside[i] else zero) * inv_scale


@njit(cache=True)
def _backward(grad, inside, dx, scale, inv_scale, zero):
    for r in range(grad.shape[0]):
        _backward_row(grad[r], inside[r], dx[r], scale[r], inv_scale[r], zero)


# ----------------------------------------------------------------------------------------
# Python wrappers.


def _scheme(group_size, symmetric):
    """The qparams rule: SYMMETRIC (per group or per token), else AFFINE_TOKEN for
    ``group_size`` None, AFFINE_GROUP otherwise."""
    if symmetric:
        return SYMMETRIC
    return AFFINE_TOKEN if group_size is None else AFFINE_GROUP


def _constants(dtype, bits, scheme):
    """The kernels' constants, each of ``dtype`` (module docstring, "Float types"), in the
    order ``_row_qparams`` unpacks them."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    divisor = {SYMMETRIC: (qmax - qmin) / 2, AFFINE_TOKEN: qmax - qmin, AFFINE_GROUP: 2**bits - 1}[scheme]
    floor = _GROUP_AFFINE_EPS if scheme == AFFINE_GROUP else np.finfo(dtype).tiny
    values = (qmin, qmax, divisor, floor, 2 ** (bits - 1), -(2.0**31), 2.0**31, 0, 1)
    return tuple(dtype.type(v) for v in values)


def block_fake_quantize_forward(x, group_size, bits, symmetric):
    """Fake-quantize each block of ``x`` with qparams from its own values (module docstring).

    Args:
        x: C-contiguous float32 or float64 array, a non-empty last axis (divisible by
            ``group_size``).
        group_size: elements per block, or None for one block per row over the last axis
            (per token).
        bits: 2 to 8; the grid is ``[-2^(bits-1), 2^(bits-1) - 1]``.
        symmetric: the symmetric rule, else the affine one of the block kind.

    Returns:
        (y, inside, scale, inv_scale): y like x; inside, bool, ``qmin <= q <= qmax`` on the
        unclamped q, shaped (rows, n); scale and inv_scale, x's dtype, one per row (rows,).
    """
    n = x.shape[-1] if group_size is None else group_size
    rows = x.reshape(-1, n)
    scheme = _scheme(group_size, symmetric)
    y = np.empty(rows.shape, x.dtype)
    inside = np.empty(rows.shape, np.bool_)
    scale = np.empty(rows.shape[0], x.dtype)
    inv_scale = np.empty(rows.shape[0], x.dtype)
    # pass 1 writes each row's (min, max) as bits; `ranges` reads the same memory as floats
    ranges = np.empty((rows.shape[0], 2), x.dtype)
    integer = np.dtype(f"int{8 * x.dtype.itemsize}")
    sign_shift, magnitude = integer.type(8 * x.dtype.itemsize - 1), integer.type(np.iinfo(integer).max)
    _ranges(rows.view(integer), ranges.view(integer), sign_shift, magnitude)
    with np.errstate(all="ignore"):  # +-inf and NaN go through the IEEE arithmetic, also in plain Python
        _forward(rows, ranges, y, inside, scale, inv_scale, scheme, _constants(x.dtype, bits, scheme))
    return y.reshape(x.shape), inside, scale, inv_scale


def block_fake_quantize_backward(grad_y, inside, scale, inv_scale):
    """The straight-through gradient ``dx = where(inside, dy * s, 0) * inv`` per row.

    Args:
        grad_y: C-contiguous array of x's dtype and shape, the gradient of y.
        inside, scale, inv_scale: as returned by :func:`block_fake_quantize_forward`.

    Returns:
        dx, shaped like grad_y.
    """
    grad = grad_y.reshape(inside.shape)
    dx = np.empty(inside.shape, grad_y.dtype)
    with np.errstate(all="ignore"):
        _backward(grad, inside, dx, scale, inv_scale, grad_y.dtype.type(0))
    return dx.reshape(grad_y.shape)
