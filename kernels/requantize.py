"""Fixed-point requantization: an int32 accumulator to the output's int8 grid, integers only.

Integer-only inference (Jacob et al. 2018; docs/numerics.md, "Integer-only requantization")
rescales an accumulator that holds ``acc * s_x * s_w`` in real units to the output scale s_y
with the real multiplier ``M = s_x * s_w / s_y``, written as an int32 fixed-point number and a
power of two:

    M = M0 * 2^-31 * 2^-shift,     M0 (int32) in [2^30, 2^31)   (M0 * 2^-31 lies in [0.5, 1))

``shift`` is the number of bits to shift RIGHT: shift >= 0 for M < 1 (the usual case), and a
negative shift means a left shift by -shift, for M >= 1. :func:`quantize_multiplier` finds
(M0, shift) for M in [2^-32, 2^31), i.e. shift in [-31, 31], and refuses anything else. Then

    y = clamp(z_y + rounding_divide_by_pot(
                saturating_rounding_doubling_high_mul(sat32(acc << left), M0), right), lo, hi)

with ``sat32`` saturating to int32 and, for M >= 1 (shift < 0), ``left = -shift``,
``right = 0``; for M < 1 (shift >= 0), ``right = shift + left`` with the *headroom* shift

    left = the largest L <= 31 - shift with |acc| * 2^L < 2^31   (31 - shift when acc == 0)

The headroom shift is qatcore's deliberate departure from gemmlowp/TFLite (which use
left = 0): without it the high multiply keeps only ``shift`` fractional bits of the result
and rounds them, and the final shift rounds again, so about one output in 2^(shift+1) lands
on the wrong side of a half (e.g. acc * M = 9.4995 gives 10: high-mul 9727.51 -> 9728, then
9728 / 2^10 = 9.5 -> 10). Those one-step errors compound through a network. Shifting the
accumulator into the unused top bits of int32 first keeps ``shift + left`` fractional bits,
so the result is the correctly rounded (half away from zero) value of acc * M except within
2^-(shift+left) of a half. Still integer-only, deterministic, and the same for every caller.
The two helpers are gemmlowp's (fixedpoint.h), bit for bit:

* ``saturating_rounding_doubling_high_mul(a, b)`` = the high 32 bits of ``2 * a * b``, rounded:
  ``(a*b + (2^30 if a*b >= 0 else 1 - 2^30)) / 2^31`` with C's division (truncating toward
  zero), which is ``floor((a*b + 2^30) / 2^31)``: ties round up, toward +inf (0.5 -> 1,
  -0.5 -> 0, -1.5 -> -1), as ARM's SQRDMULH does. The only overflow, ``a == b == INT32_MIN``,
  saturates to INT32_MAX.
* ``rounding_divide_by_pot(x, e)`` = ``x / 2^e`` rounded half away from zero, computed with
  gemmlowp's mask and threshold: ``(x >> e) + ((x & mask) > (mask >> 1) + (x < 0))`` with
  ``mask = 2^e - 1``; e in [0, 31].

This is TFLite's ``MultiplyByQuantizedMultiplier`` except for the left shift, which TFLite
performs as an int32 multiplication that may wrap; here it saturates (as gemmlowp's
``SaturatingRoundingMultiplyByPOT`` does), so a huge accumulator with M >= 1 clamps instead of
changing sign. Both agree whenever the shifted accumulator fits in int32.

:func:`requantize_value` is the whole formula for one value (the int8 kernels' epilogue);
:func:`scale_value` is the part before ``z_y +`` and the clamp, and
:func:`multiply_by_quantized_multiplier` applies it to an array (per-tensor or broadcast
per-channel parameters), for the element-wise rescalings of an int8 network (residual adds).

All arithmetic is done on int64 values that always hold int32-range numbers between steps, so
the helpers give the same bits compiled and as plain Python (``NUMBA_DISABLE_JIT=1``), where
NumPy 2 would otherwise keep int32 * int32 in int32 and overflow.

>>> import numpy as np
>>> m0, shift = quantize_multiplier(np.array([0.75, 2.0**-20, 3.0]))
>>> m0.tolist(), shift.tolist()
([1610612736, 1073741824, 1610612736], [0, 19, -2])
>>> int(rounding_divide_by_pot(-3, 1)), int(rounding_divide_by_pot(3, 1))
(-2, 2)
>>> int(saturating_rounding_doubling_high_mul(-2**31, -2**31))
2147483647
>>> int(requantize_value(201, int(m0[0]), int(shift[0]), 3, 0, 255))  # 3 + round(0.75 * 201)
154
"""

import numpy as np
from numba import config, njit, types
from numba.extending import intrinsic

from qatcore.errors import ConfigError

__all__ = [
    "INT32_MIN",
    "INT32_MAX",
    "MIN_SHIFT",
    "MAX_SHIFT",
    "quantize_multiplier",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "scale_value",
    "requantize_value",
    "multiply_by_quantized_multiplier",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
# shift = -31 is M in [2^30, 2^31), shift = 31 is M in [2^-32, 2^-31): rounding_divide_by_pot
# takes exponents up to 31, and a left shift by 31 already moves any nonzero int32 to a rail.
MIN_SHIFT = -31
MAX_SHIFT = 31


def quantize_multiplier(real_multiplier):
    """(M0, shift) with ``real = M0 * 2^-31 * 2^-shift``, M0 in [2^30, 2^31), per element.

    Args:
        real_multiplier: float64 array (or anything ``np.asarray`` makes one of), each value
            in [2^-32, 2^31): typically ``s_x * s_w / s_y`` per output channel.

    Returns:
        (multiplier, shift), two int32 arrays shaped like the input. ``shift`` counts right
        shifts; it is negative (a left shift) exactly when the real multiplier is >= 1.
        M0 is ``real * 2^(31 + shift)`` rounded half away from zero (as TFLite's
        ``QuantizeMultiplier``), so the only error is that rounding, below 2^-31 relative;
        a fraction that rounds up to 2^31 becomes 2^30 with the shift one smaller.

    Raises:
        ConfigError (a ValueError): a value that is not finite, is <= 0, or lies outside
            [2^-32, 2^31).

    >>> quantize_multiplier([0.5, 1.0, 2.0**-31])
    (array([1073741824, 1073741824, 1073741824], dtype=int32), array([ 0, -1, 30], dtype=int32))
    """
    real = np.asarray(real_multiplier, dtype=np.float64)
    bad = ~(np.isfinite(real) & (real >= 2.0**-32) & (real < 2.0**31))
    if np.any(bad):
        raise ConfigError(
            f"quantize_multiplier: real multipliers must be finite and in [2^-32, 2^31) "
            f"(shift in [{MIN_SHIFT}, {MAX_SHIFT}]); got {real[bad].ravel()[:5].tolist()}"
        )
    fraction, exponent = np.frexp(real)  # real = fraction * 2^exponent, fraction in [0.5, 1)
    # fraction * 2^31 is exact; adding 0.5 is exact below 2^31 and floor() then rounds half up
    m0 = np.floor(fraction * 2.0**31 + 0.5)
    carry = m0 == 2.0**31
    m0 = np.where(carry, 2.0**30, m0)
    shift = -(exponent + carry)
    if np.any(shift < MIN_SHIFT):  # a value just below 2^31 that rounded up to it
        raise ConfigError(f"quantize_multiplier: a multiplier rounds to 2^31 or more: {real[shift < MIN_SHIFT]}")
    return m0.astype(np.int32), shift.astype(np.int32)


@intrinsic
def _count_leading_zeros(typingctx, value):
    """LLVM's ctlz on an int64: one lzcnt instruction (vplzcntq when vectorised)."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        wide = context.cast(builder, args[0], signature.args[0], types.int64)
        return builder.ctlz(wide, context.get_constant(types.boolean, False))

    return types.int64(value), codegen


if config.DISABLE_JIT:  # plain Python (NUMBA_DISABLE_JIT=1): no intrinsics there

    def _bit_length(magnitude):
        return np.int64(int(magnitude).bit_length())

else:

    @njit(cache=True)
    def _bit_length(magnitude):
        """Bits needed for a non-negative int64 (0 for 0): 64 - count_leading_zeros."""
        return np.int64(64) - _count_leading_zeros(np.int64(magnitude))


@njit(cache=True)
def saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp's SaturatingRoundingDoublingHighMul of two int32 values; returns an int32.

    ``floor((a * b + 2^30) / 2^31)`` (a * b / 2^31 with ties toward +inf), and INT32_MAX for
    ``a == b == INT32_MIN`` (the one product whose doubled high half does not fit).
    """
    a64 = np.int64(a)
    b64 = np.int64(b)
    ab = a64 * b64  # |a * b| <= 2^62
    nudge = np.int64(1 << 30) if ab >= 0 else np.int64(1 - (1 << 30))
    total = ab + nudge
    # C's int64 division truncates toward zero, an arithmetic shift floors: correct negatives
    quotient = (total >> np.int64(31)) + np.int64(1 if (total < 0) and ((total & np.int64(0x7FFFFFFF)) != 0) else 0)
    overflow = (a64 == INT32_MIN) and (b64 == INT32_MIN)
    return np.int32(np.int64(INT32_MAX) if overflow else quotient)


@njit(cache=True)
def rounding_divide_by_pot(x, exponent):
    """gemmlowp's RoundingDivideByPOT: int32 ``x / 2^exponent`` rounded half away from zero.

    exponent in [0, 31]; computed as ``(x >> e) + (remainder > threshold)`` with
    ``mask = 2^e - 1``, ``remainder = x & mask``, ``threshold = (mask >> 1) + (x < 0)``.
    """
    x64 = np.int64(x)
    e = np.int64(exponent)
    mask = (np.int64(1) << e) - np.int64(1)
    remainder = x64 & mask
    threshold = (mask >> np.int64(1)) + np.int64(1 if x64 < 0 else 0)
    return np.int32((x64 >> e) + np.int64(1 if remainder > threshold else 0))


@njit(cache=True)
def scale_value(acc, multiplier, shift):
    """``acc * M`` in fixed point: the module docstring's formula without z_y and the clamp.

    acc (any integer) saturates to int32 first; multiplier, shift as from
    :func:`quantize_multiplier` (so M0 > 0). Returns an int64 holding an int32 value.

    The two helpers are written out here in the form that vectorises in the kernels' epilogues,
    with the same results: for M0 > 0 the product is never INT32_MIN * INT32_MIN, so the high
    multiply is ``floor((a * M0 + 2^30) / 2^31)``, one add and one arithmetic shift (its
    docstring shows the equality); the division by 2^right is ``rounding_divide_by_pot``'s
    mask-and-threshold formula.
    """
    total = min(max(np.int64(acc), np.int64(INT32_MIN)), np.int64(INT32_MAX))
    shift64 = np.int64(shift)
    if shift64 < 0:
        left = -shift64
        right = np.int64(0)
    else:
        # headroom (module docstring): shift |total| into the unused top bits of int32.
        # |total| < 2^bits exactly for bits = its bit length, so left = 31 - bits is the largest
        # shift that stays below 2^31.
        magnitude = total if total >= 0 else -total
        bits = _bit_length(magnitude)
        left = min(max(np.int64(31) - bits, np.int64(0)), np.int64(31) - shift64)
        right = shift64 + left
    # |total| <= 2^31 and left <= 31, so the shift cannot leave int64; then saturate to int32
    shifted = min(max(total << left, np.int64(INT32_MIN)), np.int64(INT32_MAX))
    high = (shifted * np.int64(multiplier) + np.int64(1 << 30)) >> np.int64(31)  # |product| < 2^62
    mask = (np.int64(1) << right) - np.int64(1)
    threshold = (mask >> np.int64(1)) + np.int64(1 if high < 0 else 0)
    return (high >> right) + np.int64(1 if (high & mask) > threshold else 0)


@njit(cache=True)
def requantize_value(acc, multiplier, shift, out_zero_point, clamp_min, clamp_max):
    """One output value from an accumulator: the module docstring's formula.

    Args:
        acc: the accumulator, any integer; saturated to int32 first (the caller's int32
            accumulator, with the bias added in int64, saturates rather than wraps).
        multiplier, shift: M0 in [2^30, 2^31) and shift in [-31, 31] from
            :func:`quantize_multiplier`.
        out_zero_point, clamp_min, clamp_max: z_y and the clamp [lo, hi].

    Returns:
        The clamped value as an int64 (the caller stores it in the output's dtype).
    """
    y = np.int64(out_zero_point) + scale_value(acc, multiplier, shift)
    return min(max(y, np.int64(clamp_min)), np.int64(clamp_max))


@njit(cache=True)
def _scale_values(values, multiplier, shift, out):
    for i in range(values.size):
        out[i] = scale_value(values[i], multiplier[i], shift[i])


def multiply_by_quantized_multiplier(values, multiplier, shift):
    """``values * M`` in fixed point, elementwise (TFLite's MultiplyByQuantizedMultiplier, with
    this module's shift sign: shift > 0 shifts right).

    Args:
        values: integers (any shape; int64 or narrower), each saturated to int32 first.
        multiplier, shift: int arrays broadcasting against values, M0 in [2^30, 2^31) and
            shift in [-31, 31], as from :func:`quantize_multiplier` (e.g. shape (1,), or per
            channel reshaped to broadcast).

    Returns:
        A new int64 array of the broadcast shape: ``rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(sat32(values << left), M0), right)`` with the
        module docstring's left (headroom) and right shifts.

    Raises:
        ConfigError (a ValueError): a multiplier or shift outside its range.

    >>> m0, shift = quantize_multiplier([0.5, 0.25])   # M0 = 2^30 for both, shifts 0 and 1
    >>> multiply_by_quantized_multiplier(np.array([-3, -1, 1, 3, 2**40]), m0[0], shift[0])
    array([        -2,         -1,          1,          2, 1073741824])
    >>> multiply_by_quantized_multiplier(np.array([[-6], [-2], [6]]), m0, shift)  # broadcast: 0.5 and 0.25
    array([[-3, -2],
           [-1, -1],
           [ 3,  2]])

    The headroom shift (module docstring) leaves the final rounding to the right shift, so
    ties round away from zero: -1.5 -> -2, -0.5 -> -1, 1.5 -> 2 (gemmlowp, without it,
    rounds -1.5 -> -1 and -0.5 -> 0 in the high multiply when shift is 0).
    """
    values, multiplier, shift = np.broadcast_arrays(np.asarray(values).astype(np.int64, copy=False),
                                                    np.asarray(multiplier, np.int64), np.asarray(shift, np.int64))
    if np.any((multiplier < 2**30) | (multiplier > INT32_MAX)):
        raise ConfigError("multiply_by_quantized_multiplier: multiplier (M0) must lie in [2^30, 2^31)")
    if np.any((shift < MIN_SHIFT) | (shift > MAX_SHIFT)):
        raise ConfigError(f"multiply_by_quantized_multiplier: shift must lie in [{MIN_SHIFT}, {MAX_SHIFT}]")
    out = np.empty(values.shape, np.int64)
    _scale_values(np.ascontiguousarray(values).reshape(-1), np.ascontiguousarray(multiplier).reshape(-1),
                  np.ascontiguousarray(shift).reshape(-1), out.reshape(-1))
    return out
