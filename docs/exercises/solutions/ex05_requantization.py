"""Exercise 05: integer-only requantization, and the headroom shift.

Read first: docs/concepts.md, "7. Integer-only inference"; docs/numerics.md,
"Integer-only requantization" and "Deriving the headroom shift"; the module docstring of
kernels/requantize.py.

Learning goal: multiply an int32 accumulator by a real number using integers only, and see
where double rounding comes from and how a left shift removes it.

An int8 layer sums products of integers into an int32 *accumulator* acc, which stands for
acc * s_x * s_w in real units. To write the output on its own grid (scale s_y) it must be
multiplied by the real *multiplier* M = s_x * s_w / s_y (Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"). Integer-only
hardware writes M as a 31-bit fixed-point number M0 and a power of two:

    M = M0 * 2^-31 * 2^-n,   M0 in [2^30, 2^31)      (n >= 0 for M < 1, the usual case)

np.frexp writes M = f * 2^e with f in [0.5, 1); then M0 = floor(f * 2^31 + 1/2) and n = -e;
if M0 rounds up to 2^31, use M0 = 2^30 and n one smaller. The product is then two integer
steps, gemmlowp's helpers (given below, bit for bit as qatcore's kernels compute them):

    h = SRDHM(a, M0) = floor((a * M0 + 2^30) / 2^31)     a * M0 / 2^31, rounded (ties up)
    r = RDPOT(h, e)  = round_away(h / 2^e)               rounded half away from zero

gemmlowp and TFLite compute RDPOT(SRDHM(acc, M0), n): two roundings, and the first can land
exactly on a half that the second then rounds the wrong way. Example: M = 0.000949952 (n = 10)
and acc = 10000: acc * M = 9.49952 should give 9, but SRDHM gives 9728 = 9.5 * 2^10, which
RDPOT rounds to 10. qatcore first shifts the accumulator left into the unused top bits of int32,
by the *headroom* L, so that h keeps n + L fractional bits instead of n:

    a = sat32(acc * 2^L),   r = RDPOT(SRDHM(a, M0), n + L)
    L = min(max(31 - bit_length(|acc|), 0), 31 - n)      the largest L with |acc| * 2^L < 2^31
                                                          and n + L <= 31 (RDPOT's limit)

bit_length(v) is the number of binary digits of v (0 for 0; Python's int.bit_length).
sat32 clamps to [-2^31, 2^31 - 1].

What to implement: ``quantize_multiplier``, ``headroom_shift`` and ``fixed_point_multiply``.
Hints: np.frexp; do all integer arithmetic in int64 (a * M0 < 2^62 fits); for the bit length
of an int64 array, np.frexp(v.astype(np.float64))[1] is exact here (|v| <= 2^31).
What to observe (``main()``): the right answer is round_away(acc * M0 * 2^-(31 + n)), the
product by the multiplier as represented, rounded once (``exact_product``). With L = 0 about
one accumulator in 2^(n+1) gives its neighbour instead; with the headroom shift none does, on
these accumulators. None is not never: a value within 2^-(n+L+1) of a half can still round the
other way. Try M = 0.0371 and acc = 5000: acc * M0 * 2^-35 = 185.49999993.
Check: pytest docs/exercises -k ex05 (your multiplier and your product with the headroom shift
against qatcore.kernels.requantize, bit for bit; the mismatch counts).
"""

import numpy as np

EXERCISE_FUNCTIONS = ("quantize_multiplier", "headroom_shift", "fixed_point_multiply")

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# multipliers of the shape M = s_x * s_w / s_y: all below 1
MULTIPLIERS = (0.000949952, 0.0016, 0.0387291, 0.2871853)


def quantize_multiplier(real_multiplier) -> tuple[np.ndarray, np.ndarray]:
    """(M0, n) as int64 arrays with M = M0 * 2^-31 * 2^-n, M0 in [2^30, 2^31), per element.

    Args:
        real_multiplier: values in [2^-32, 2^31) (float64).
    """
    fraction, exponent = np.frexp(np.asarray(real_multiplier, dtype=np.float64))
    m0 = np.floor(fraction * 2.0**31 + 0.5)       # exact in float64: half up (f > 0, so away from zero)
    carry = m0 == 2.0**31                          # f just below 1 rounded up: 2^31 does not fit int32
    m0 = np.where(carry, 2.0**30, m0)
    return m0.astype(np.int64), (-(exponent + carry)).astype(np.int64)


def headroom_shift(acc, shift) -> np.ndarray:
    """L = min(max(31 - bit_length(|sat32(acc)|), 0), 31 - shift) per element, int64 (shift >= 0)."""
    magnitude = np.abs(saturate_int32(acc))
    bit_length = np.frexp(magnitude.astype(np.float64))[1]     # |v| = f * 2^e, f in [0.5, 1): e bits
    return np.minimum(np.maximum(31 - bit_length, 0), 31 - np.asarray(shift, np.int64)).astype(np.int64)


def fixed_point_multiply(acc, m0, shift, headroom) -> np.ndarray:
    """RDPOT(SRDHM(sat32(sat32(acc) * 2^headroom), M0), shift + headroom): acc * M, int64.

    ``headroom`` is an int or an int array (0 gives gemmlowp's and TFLite's formula)."""
    shifted = saturate_int32(saturate_int32(acc) << np.asarray(headroom, np.int64))
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, m0), shift + headroom)


# ---- given: gemmlowp's helpers in NumPy int64, and the exact answer --------------------------


def saturate_int32(values) -> np.ndarray:
    """sat32: clamp to [-2^31, 2^31 - 1], as int64."""
    return np.clip(np.asarray(values, np.int64), INT32_MIN, INT32_MAX)


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """SRDHM(a, b) = floor((a * b + 2^30) / 2^31) for int32-range a, b > 0 (int64)."""
    return (np.asarray(a, np.int64) * np.asarray(b, np.int64) + (1 << 30)) >> 31


def rounding_divide_by_pot(values, exponent) -> np.ndarray:
    """RDPOT(v, e) = v / 2^e rounded half away from zero, e in [0, 31] (gemmlowp's mask form)."""
    values, exponent = np.asarray(values, np.int64), np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    threshold = (mask >> 1) + (values < 0)
    return (values >> exponent) + ((values & mask) > threshold)


def exact_product(acc, m0, shift) -> np.ndarray:
    """round_away(acc * M0 * 2^-(31 + shift)) exactly, in integers (the right answer)."""
    acc = np.asarray(acc, np.int64)
    magnitude = (np.abs(acc) * np.int64(m0) + (np.int64(1) << (30 + shift))) >> (31 + shift)
    return np.sign(acc) * magnitude


def accumulators(real_multiplier: float, seed: int = 5, size: int = 20000) -> np.ndarray:
    """int32 accumulators of a layer with multiplier M (given): uniform over |acc * M| < 256,
    the outputs an int8 or uint8 grid holds, with a margin; and the worked example 10000."""
    rng = np.random.default_rng(seed)
    bound = int(256 / real_multiplier)
    return np.concatenate([[10000], rng.integers(-bound, bound + 1, size)]).astype(np.int64)


def mismatches(acc, real_multiplier: float, use_headroom: bool) -> int:
    """How many products differ from ``exact_product`` (given)."""
    m0, shift = (int(v[0]) for v in quantize_multiplier([real_multiplier]))
    headroom = headroom_shift(acc, shift) if use_headroom else 0
    return int(np.sum(fixed_point_multiply(acc, m0, shift, headroom) != exact_product(acc, m0, shift)))


def main() -> None:
    """Print what the module docstring asks you to observe."""
    for multiplier in MULTIPLIERS:
        acc = accumulators(multiplier)
        m0, shift = (int(v[0]) for v in quantize_multiplier([multiplier]))
        print(f"M = {multiplier}: M0 = {m0}, n = {shift}; wrong results of {acc.size}: "
              f"L = 0: {mismatches(acc, multiplier, False)} (about {acc.size / 2 ** (shift + 1):.0f} expected), "
              f"headroom: {mismatches(acc, multiplier, True)}")


if __name__ == "__main__":
    main()
