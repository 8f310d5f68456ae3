"""qatcore.kernels.requantize and int8_gemm against int64 NumPy oracles written from docs/numerics.md
("Integer-only requantization") and gemmlowp's fixedpoint.h, bit for bit, compiled and as plain Python."""


import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.errors import ConfigError, DTypeError, ShapeError
from qatcore.kernels import int8_gemm as gemm
from qatcore.kernels import requantize as rq

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# ----------------------------------------------------------------------------------------
# The oracle, in int64 NumPy (every intermediate below 2^63), one formula a line.


def oracle_high_mul(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul, elementwise on int64 arrays of int32 values."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    total = ab + nudge
    quotient = np.sign(total) * (np.abs(total) // 2**31)  # C division: toward zero
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, quotient)


def oracle_divide_by_pot(x, exponent):
    """gemmlowp RoundingDivideByPOT: the mask / threshold formulation, elementwise."""
    x, exponent = np.asarray(x, np.int64), np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + ((x & mask) > threshold)


def oracle_headroom(acc, shift):
    """The largest L <= 31 - shift with |acc| * 2^L < 2^31 (0 where shift < 0)."""
    magnitude = np.abs(acc)
    headroom = np.zeros(np.broadcast(acc, shift).shape, np.int64)
    for candidate in range(1, 32):
        fits = (magnitude * 2**candidate < 2**31) & (candidate <= 31 - shift) & (shift >= 0)
        headroom = np.where(fits, candidate, headroom)
    return headroom


def oracle_requantize(acc, multiplier, shift, zero_point, lo, hi):
    """docs/numerics.md, "Integer-only requantization" (with the headroom shift): saturate acc
    to int32; for shift < 0 shift left (saturating); else shift left by the headroom L and right
    by shift + L around sat_rounding_doubling_high_mul(., M0); add z, clamp."""
    acc = np.clip(np.asarray(acc, np.int64), INT32_MIN, INT32_MAX)
    shift = np.asarray(shift, np.int64)
    headroom = oracle_headroom(acc, shift)
    left = np.where(shift < 0, -shift, headroom)
    right = np.where(shift < 0, 0, shift + headroom)
    shifted = np.clip(acc << left, INT32_MIN, INT32_MAX)
    scaled = oracle_divide_by_pot(oracle_high_mul(shifted, multiplier), right)
    return np.clip(zero_point + scaled, lo, hi)


def test_headroom_rounds_correctly_where_gemmlowp_double_rounds():
    # acc * M = 9.4995...: gemmlowp's left = 0 gives 9728 / 2^10 = 9.5 -> 10; exact is 9
    acc, m0, shift = 13061, 1599392951, 10
    assert int(rq.requantize_value(acc, m0, shift, 0, 0, 255)) == 9
    exact = acc * m0 * 2.0**-31 * 2.0**-shift
    assert abs(exact - 9.4995) < 1e-3


def oracle_gemm_int32(x, x_zero_point, w):
    return (x.astype(np.int64) - x_zero_point) @ w.astype(np.int64).T


def oracle_linear(x, x_zero_point, w, bias, multiplier, shift, out_zero_point, clamp_min, clamp_max, out_dtype):
    acc = oracle_gemm_int32(x, x_zero_point, w) + (0 if bias is None else bias.astype(np.int64))
    return oracle_requantize(acc, multiplier, shift, out_zero_point, clamp_min, clamp_max).astype(out_dtype)


def assert_same(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape, (actual.dtype, actual.shape, expected.shape)
    np.testing.assert_array_equal(actual.astype(np.int64), expected.astype(np.int64))


# ----------------------------------------------------------------------------------------
# Fixed-point helpers


@pytest.mark.parametrize("x, exponent, expected", [
    (-3, 1, -2), (3, 1, 2),                 # gemmlowp's ties: -1.5 -> -2, 1.5 -> 2
    (1, 1, 1), (-1, 1, -1), (2, 1, 1), (-2, 1, -1),
    (5, 2, 1), (6, 2, 2), (-6, 2, -2), (-5, 2, -1), (7, 0, 7), (-7, 0, -7),
    (2**30, 31, 1), (-(2**30), 31, -1), (2**30 - 1, 31, 0), (-(2**30) + 1, 31, 0),
    (INT32_MAX, 31, 1), (INT32_MIN, 31, -1), (INT32_MIN, 0, INT32_MIN), (INT32_MAX, 30, 2),
])
def test_rounding_divide_by_pot_known_values(x, exponent, expected):
    assert int(rq.rounding_divide_by_pot(x, exponent)) == expected
    assert int(oracle_divide_by_pot(x, exponent)) == expected


@pytest.mark.parametrize("a, b, expected", [
    (INT32_MIN, INT32_MIN, INT32_MAX),          # the one overflow saturates
    (INT32_MAX, INT32_MAX, INT32_MAX - 1),
    (INT32_MIN, INT32_MAX, -INT32_MAX),
    (INT32_MAX, INT32_MIN, -INT32_MAX),
    (2**30, 2**30, 2**29),
    (1, 2**30, 1), (-1, 2**30, 0),              # +-0.5: ties round up (toward +inf), like SQRDMULH
    (3, 2**30, 2), (-3, 2**30, -1),             # +-1.5
    (-(2**30), 2**30, -(2**29)), (0, INT32_MIN, 0), (123456789, 0, 0),
    (1000, 1610612736, 750), (-1000, 1610612736, -750),
])
def test_saturating_rounding_doubling_high_mul_known_values(a, b, expected):
    assert int(rq.saturating_rounding_doubling_high_mul(a, b)) == expected
    assert int(oracle_high_mul(a, b)) == expected


int32s = st.integers(INT32_MIN, INT32_MAX)
edge_int32s = st.sampled_from([INT32_MIN, INT32_MIN + 1, -(2**30), -1, 0, 1, 2**30, INT32_MAX - 1, INT32_MAX])


@given(st.lists(st.tuples(int32s | edge_int32s, int32s | edge_int32s, st.integers(0, 31)), min_size=1,
                max_size=50))
def test_helpers_match_oracle(triples):
    for a, b, exponent in triples:
        assert int(rq.saturating_rounding_doubling_high_mul(a, b)) == int(oracle_high_mul(a, b))
        assert int(rq.rounding_divide_by_pot(a, exponent)) == int(oracle_divide_by_pot(a, exponent))


@given(st.lists(st.tuples(st.integers(-(2**40), 2**40) | edge_int32s, st.integers(2**30, INT32_MAX),
                          st.integers(rq.MIN_SHIFT, rq.MAX_SHIFT), st.integers(-128, 255)),
                min_size=1, max_size=30))
def test_requantize_value_matches_oracle(cases):
    for acc, m0, shift, zero_point in cases:
        expected = int(oracle_requantize(acc, m0, shift, zero_point, -128, 255))
        assert int(rq.requantize_value(acc, m0, shift, zero_point, -128, 255)) == expected


def check_multiply_by_quantized_multiplier(seed, shape):
    rng = np.random.default_rng(seed)
    values = rng.integers(-(2**34), 2**34, shape) >> rng.integers(0, 34, shape)  # all magnitudes
    multiplier = rng.integers(2**30, 2**31, shape[-1:]).astype(np.int32)  # per last axis
    shift = rng.integers(rq.MIN_SHIFT, rq.MAX_SHIFT, shape[-1:], endpoint=True).astype(np.int32)
    out = rq.multiply_by_quantized_multiplier(values, multiplier, shift)
    assert out.dtype == np.int64 and out.shape == shape
    np.testing.assert_array_equal(out, oracle_requantize(values, multiplier, shift, 0, INT32_MIN, INT32_MAX))
    with pytest.raises(ConfigError, match="multiplier"):
        rq.multiply_by_quantized_multiplier(values, multiplier // 2, shift)
    with pytest.raises(ConfigError, match="shift"):
        rq.multiply_by_quantized_multiplier(values, multiplier, np.full_like(shift, rq.MAX_SHIFT + 1))


@given(st.integers(0, 2**32 - 1), st.sampled_from([(7,), (3, 5), (2, 3, 4)]))
def test_multiply_by_quantized_multiplier_matches_oracle(seed, shape):
    check_multiply_by_quantized_multiplier(seed, shape)


def test_quantize_multiplier_known_values():
    m0, shift = rq.quantize_multiplier([0.5, 0.75, 1.0, 3.0, 2.0**-31, 2.0**-32, 1.5 * 2.0**30, 1 - 2.0**-40])
    assert m0.dtype == np.int32 and shift.dtype == np.int32
    assert m0.tolist() == [2**30, 3 * 2**29, 2**30, 3 * 2**29, 2**30, 2**30, 3 * 2**29, 2**30]
    assert shift.tolist() == [0, 0, -1, -2, 30, 31, -31, -1]  # the last one's M0 rounds up to 2^31


@given(st.lists(st.floats(-32, 30.99).map(lambda e: 2.0**e), min_size=1, max_size=20))
def test_quantize_multiplier_is_exact_up_to_rounding(reals):
    real = np.array(reals)
    m0, shift = rq.quantize_multiplier(real)
    assert np.all((m0 >= 2**30) & (m0.astype(np.int64) < 2**31))
    assert np.all((shift >= rq.MIN_SHIFT) & (shift <= rq.MAX_SHIFT))
    represented = np.ldexp(m0.astype(np.float64), -31 - shift.astype(np.int64))
    # M0 is real * 2^(31 + shift) rounded to an integer: at most half a unit off
    assert np.all(np.abs(represented - real) <= np.ldexp(0.5, -31 - shift.astype(np.int64)))
    assert np.array_equal(shift < 0, represented >= 1)


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan, np.inf, 2.0**-33, 2.0**31, 1e300, 2.0**31 * (1 - 2.0**-40)])
def test_quantize_multiplier_rejects_out_of_range(bad):
    with pytest.raises(ConfigError, match="2\\^31"):
        rq.quantize_multiplier([0.5, bad])


# ----------------------------------------------------------------------------------------
# GEMM and linear: generated cases


def random_operands(rng, rows, cols, depth, x_dtype, fill):
    """x (rows, depth), its zero point and w (cols, depth): uniform, or all at one extreme."""
    info = np.iinfo(x_dtype)
    if fill == "uniform":
        x = rng.integers(info.min, info.max, (rows, depth), endpoint=True).astype(x_dtype)
        w = rng.integers(-128, 127, (cols, depth), endpoint=True).astype(np.int8)
        zero_point = int(rng.choice([info.min, info.max, rng.integers(info.min, info.max, endpoint=True)]))
    else:  # the largest |x - z| * |w| everywhere: every product at the int32 bound
        low = fill == "x_min"
        x = np.full((rows, depth), info.min if low else info.max, x_dtype)
        w = np.full((cols, depth), -128, np.int8)
        zero_point = int(info.max if low else info.min)
    return x, zero_point, w


def random_requantization(rng, channels, multiplier_range):
    """Per-channel (M0, shift) from real multipliers log-uniform in the range, and a bias."""
    lo, hi = {"small": (-31, 0), "any": (-31, 8), "large": (0, 20)}[multiplier_range]
    real = 2.0 ** rng.uniform(lo, hi, channels)
    real = np.where(real >= 2.0**-32, real, 2.0**-32)
    multiplier, shift = rq.quantize_multiplier(real)
    bias = rng.integers(-(2**24), 2**24, channels).astype(np.int32)
    bias[rng.random(channels) < 0.1] = rng.choice([INT32_MIN, INT32_MAX])  # drives the int32 saturation
    return bias, multiplier, shift


def output_range(rng, out_dtype, relu):
    info = np.iinfo(out_dtype)
    zero_point = int(rng.choice([info.min, info.max, rng.integers(info.min, info.max, endpoint=True)]))
    return zero_point, (zero_point if relu else int(info.min)), int(info.max)


def check_gemm_and_linear(rows, cols, depth, x_dtype, out_dtype, fill, multiplier_range, relu, seed):
    rng = np.random.default_rng(seed)
    x, x_zero_point, w = random_operands(rng, rows, cols, depth, x_dtype, fill)
    expected_acc = oracle_gemm_int32(x, x_zero_point, w)
    assert np.all(np.abs(expected_acc) < 2**31)  # the documented bound holds in the oracle too
    assert_same(gemm.int8_gemm_int32(x, x_zero_point, w), expected_acc, np.int32)
    bias, multiplier, shift = random_requantization(rng, cols, multiplier_range)
    out_zero_point, clamp_min, clamp_max = output_range(rng, out_dtype, relu)
    args = (bias, multiplier, shift, out_zero_point, clamp_min, clamp_max, out_dtype)
    expected = oracle_linear(x, x_zero_point, w, *args)
    assert_same(gemm.int8_linear(x, x_zero_point, w, *args), expected, out_dtype)
    assert_same(gemm.int8_linear(x, x_zero_point, gemm.pack_weights(w), *args), expected, out_dtype)


@settings(max_examples=60)
@given(
    st.integers(1, 40) | st.sampled_from([1, 4, 5, 64]),
    st.integers(1, 40) | st.sampled_from([1, 4, 7, 130]),
    st.integers(1, 70) | st.sampled_from([1, 15, 16, 17, 63, 64, 65, 300]),
    st.sampled_from([np.uint8, np.int8]),
    st.sampled_from([np.uint8, np.int8]),
    st.sampled_from(["uniform", "uniform", "x_min", "x_max"]),
    st.sampled_from(["small", "any", "large"]),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_matches_oracle(rows, cols, depth, x_dtype, out_dtype, fill, multiplier_range, relu, seed):
    check_gemm_and_linear(rows, cols, depth, x_dtype, out_dtype, fill, multiplier_range, relu, seed)


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("fill", ["x_min", "x_max"])
def test_longest_reduction_is_exact_at_the_bound(x_dtype, fill):
    """K = MAX_DEPTH with every product at 255 * 128 in magnitude: |acc| = 2139095040 < 2^31."""
    rng = np.random.default_rng(7)
    x, x_zero_point, w = random_operands(rng, 2, 5, gemm.MAX_DEPTH, x_dtype, fill)
    acc = gemm.int8_gemm_int32(x, x_zero_point, w)
    assert np.all(np.abs(acc.astype(np.int64)) == 255 * 128 * gemm.MAX_DEPTH)
    assert_same(acc, oracle_gemm_int32(x, x_zero_point, w), np.int32)


def test_depth_beyond_the_bound_is_refused():
    x = np.zeros((1, gemm.MAX_DEPTH + 1), np.uint8)
    w = np.zeros((1, gemm.MAX_DEPTH + 1), np.int8)
    with pytest.raises(ValueError, match="MAX_DEPTH"):
        gemm.int8_gemm_int32(x, 0, w)
    with pytest.raises(ShapeError, match="MAX_DEPTH"):
        gemm.pack_weights(w)


def check_tile(tile, rows):
    """A rows x 4 tile at a_row 2, a_col 9, b_row 3, stored transposed at acc[5 + c, 1 + r]."""
    rng = np.random.default_rng(8)
    for depth in (0, 1, 63, 64, 65, 3 * 64 + 17, 1000):
        a = rng.integers(0, 256, (6, depth + 9), dtype=np.uint8)
        b = rng.integers(-128, 128, (7, depth), dtype=np.int8)
        acc = np.full((9, 6), -1, np.int32)
        tile(a, 2, 9, b, 3, depth, acc, 1, 5, True)
        expected = a[2:2 + rows, 9:9 + depth].astype(np.int64) @ b[3:7].astype(np.int64).T
        np.testing.assert_array_equal(acc[5:9, 1:1 + rows], expected.T)
        untouched = np.ones(acc.shape, bool)
        untouched[5:9, 1:1 + rows] = False
        assert (acc[untouched] == -1).all()


def test_tile_matches_oracle_on_both_paths(monkeypatch):
    """The 4x4 and 1x4 tiles as compiled here (the explicit vpdpbusd part on CPUs with AVX-512 VNNI),
    and, on such CPUs, a copy compiled afresh with the flag off (numba reads the global when
    it compiles), the vectorised loop other CPUs run; depths either side of multiples of 64."""
    check_tile(gemm._dot_4x4, 4)
    check_tile(gemm._dot_1x4, 1)
    if gemm.USE_VNNI:
        monkeypatch.setattr(gemm, "USE_VNNI", False)
        check_tile(numba.njit(gemm._dot_4x4.py_func), 4)
        check_tile(numba.njit(gemm._dot_1x4.py_func), 1)


def test_parallel_and_serial_drivers_agree(monkeypatch):
    rng = np.random.default_rng(3)
    rows, cols, depth = 300, 300, 70  # 2 row blocks x 3 column blocks
    x, x_zero_point, w = random_operands(rng, rows, cols, depth, np.uint8, "uniform")
    bias, multiplier, shift = random_requantization(rng, cols, "any")
    results = []
    for threshold in (0, 2**62):
        monkeypatch.setattr(gemm, "PARALLEL_MIN_MACS", threshold)
        results.append((gemm.int8_gemm_int32(x, x_zero_point, w),
                        gemm.int8_linear(x, x_zero_point, w, bias, multiplier, shift, 3, 0, 255, np.uint8)))
    for parallel, serial in zip(*results):
        np.testing.assert_array_equal(parallel, serial)
    assert_same(results[0][1], oracle_linear(x, x_zero_point, w, bias, multiplier, shift, 3, 0, 255, np.uint8),
                np.uint8)


# ----------------------------------------------------------------------------------------
# Known values, edge shapes, validation


def test_fused_relu_and_left_shift():
    x = np.array([[0, 10, 20]], np.uint8)  # z_x = 10: x - z_x = -10, 0, 10
    w = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 1]], np.int8)
    m0, shift = rq.quantize_multiplier(np.array([1.0, 3.0, 0.5]))
    y = gemm.int8_linear(x, 10, w, None, m0, shift, 5, 5, 255, np.uint8)  # lo = z_y: ReLU
    assert y.tolist() == [[5, 5, 10]]  # acc 0, -10 * 3 = -30 -> clamped to z_y, 10 * 0.5 = 5
    y = gemm.int8_linear(x, 10, w, None, m0, shift, -3, -128, 127, np.int8)
    assert y.dtype == np.int8 and y.tolist() == [[-3, -33, 2]]


def test_bias_saturates_instead_of_wrapping():
    x, w = np.full((1, 4), 255, np.uint8), np.full((1, 4), 127, np.int8)  # raw sum 129540
    m0, shift = rq.quantize_multiplier(np.array([2.0**-24]))
    bias = np.array([INT32_MAX], np.int32)
    y = gemm.int8_linear(x, 0, w, bias, m0, shift, 0, 0, 255, np.uint8)
    # saturated: round(INT32_MAX / 2^24) = 128; wrapped, the sum would be negative and clamp to 0
    assert int(y[0, 0]) == 128


@pytest.mark.parametrize("shape", [(0, 3, 5), (3, 0, 5), (3, 4, 0), (0, 0, 0)])
def test_empty_operands(shape):
    rows, cols, depth = shape
    x, w = np.zeros((rows, depth), np.uint8), np.ones((cols, depth), np.int8)
    acc = gemm.int8_gemm_int32(x, 7, w)
    assert acc.shape == (rows, cols) and acc.dtype == np.int32 and not acc.any()
    bias = np.arange(cols, dtype=np.int32)
    y = gemm.int8_linear(x, 7, w, bias, np.full(cols, 2**30, np.int32), np.zeros(cols, np.int32), 0, 0, 255,
                         np.uint8)
    assert y.shape == (rows, cols) and y.dtype == np.uint8
    if y.size:
        assert y.tolist() == [[(b + 1) // 2 for b in range(cols)]] * rows  # acc = bias, M = 0.5: ties up


def test_inputs_left_alone():
    rng = np.random.default_rng(4)
    x, x_zero_point, w = random_operands(rng, 9, 6, 33, np.int8, "uniform")
    bias, multiplier, shift = random_requantization(rng, 6, "any")
    before = [a.copy() for a in (x, w, bias, multiplier, shift)]
    gemm.int8_linear(x, x_zero_point, w, bias, multiplier, shift, 0, -128, 127, np.int8)
    gemm.int8_gemm_int32(x, x_zero_point, w)
    for a, b in zip((x, w, bias, multiplier, shift), before):
        np.testing.assert_array_equal(a, b)


def linear_call(**overrides):
    args = dict(x_q=np.zeros((2, 3), np.uint8), x_zero_point=0, w_q=np.zeros((4, 3), np.int8),
                bias_q=np.zeros(4, np.int32), multiplier=np.full(4, 2**30, np.int32), shift=np.zeros(4, np.int32),
                out_zero_point=0, clamp_min=0, clamp_max=255, out_dtype=np.uint8)
    args.update(overrides)
    return gemm.int8_linear(**args)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(x_q=np.zeros((2, 3), np.float32)), DTypeError, "uint8 or int8"),
    (dict(w_q=np.zeros((4, 3), np.uint8)), DTypeError, "int8"),
    (dict(x_q=np.zeros((2, 5), np.uint8)), ShapeError, "activations must be"),
    (dict(x_zero_point=256), ConfigError, "x_zero_point"),
    (dict(x_q=np.zeros((2, 3), np.int8), x_zero_point=128), ConfigError, "x_zero_point"),
    (dict(bias_q=np.zeros(4, np.int64)), DTypeError, "bias_q"),
    (dict(bias_q=np.zeros(3, np.int32)), ShapeError, "bias_q"),
    (dict(multiplier=np.full(4, 2**29, np.int32)), ConfigError, "2\\^30"),
    (dict(shift=np.full(4, 32, np.int32)), ConfigError, "shift"),
    (dict(out_dtype=np.int16), DTypeError, "out_dtype"),
    (dict(out_zero_point=-1), ConfigError, "out_zero_point"),
    (dict(clamp_min=10, clamp_max=9), ConfigError, "clamp_min"),
    (dict(w_q=np.zeros((4, 3, 1, 1), np.int8)), ShapeError, "2 dimensions"),
])
def test_invalid_arguments_are_refused(overrides, error, match):
    with pytest.raises(error, match=match):
        linear_call(**overrides)


def test_per_tensor_parameters_broadcast():
    rng = np.random.default_rng(5)
    x, x_zero_point, w = random_operands(rng, 3, 6, 10, np.uint8, "uniform")
    m0, shift = rq.quantize_multiplier(np.array([0.01]))
    y = gemm.int8_linear(x, x_zero_point, w, None, m0, shift, 100, 0, 255, np.uint8)
    expected = oracle_linear(x, x_zero_point, w, None, np.repeat(m0, 6), np.repeat(shift, 6), 100, 0, 255, np.uint8)
    assert_same(y, expected, np.uint8)


# ----------------------------------------------------------------------------------------
# The same kernels as plain Python


def test_runs_as_plain_python(run_without_jit):
    run_without_jit(__file__, """
        assert_plain_python(tests.gemm._dot_4x4, tests.rq.requantize_value)
        tests.check_multiply_by_quantized_multiplier(5, (3, 5))
        for a, b, e in [(-3, 1 << 30, 1), (3, 1, 1), (tests.INT32_MIN, tests.INT32_MIN, 31), (12345, -999, 4)]:
            assert int(tests.rq.saturating_rounding_doubling_high_mul(a, b)) == int(tests.oracle_high_mul(a, b))
            assert int(tests.rq.rounding_divide_by_pot(a, e)) == int(tests.oracle_divide_by_pot(a, e))
        cases = [(1, 1, 1, np.uint8, np.uint8, "uniform", "small", False, 1),
                 (6, 5, 19, np.int8, np.uint8, "uniform", "any", True, 2),
                 (5, 6, 17, np.uint8, np.int8, "x_max", "large", False, 3),
                 (4, 9, 33, np.int8, np.int8, "x_min", "small", True, 4)]
        for case in cases:
            tests.check_gemm_and_linear(*case)
    """)
