"""qatcore.kernels.requantize_float32 and the float32 epilogue of int8_linear / int8_conv2d
against a Python oracle, bit for bit, compiled and as plain Python.

The oracle does not use float32 arithmetic: the product of two float32 values is exact in
float64 (24 + 24 significand bits), so rounding it to float32 once is the correctly rounded
float32 product; Python's ``round`` rounds half to even."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qatcore.errors import ConfigError
from qatcore.kernels import int8_conv as conv
from qatcore.kernels import int8_gemm as gemm
from qatcore.kernels import requantize_float32 as rq32

_spec = importlib.util.spec_from_file_location("int8_conv_oracle", Path(__file__).with_name("test_int8_conv.py"))
conv_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv_tests)
gemm_tests = conv_tests.gemm_tests


def oracle_one(acc: int, scale: float, zero_point: int, lo: int, hi: int) -> int:
    product = float(np.float32(float(np.float32(acc)) * float(np.float32(scale))))  # exact, then one rounding
    return min(max(round(product) + zero_point, lo), hi)


def oracle(acc, scale, zero_point, lo, hi):
    acc, scale = np.broadcast_arrays(np.asarray(acc, np.int64), np.asarray(scale, np.float32))
    flat = [oracle_one(int(a), float(s), zero_point, lo, hi) for a, s in zip(acc.ravel(), scale.ravel())]
    return np.array(flat, np.int64).reshape(acc.shape)


def near_ties(rng, count):
    """Accumulators and float32 scales whose products land on or next to x.5 (and large ones)."""
    scale = (2.0 ** rng.integers(-12, -1, count)).astype(np.float32)  # powers of two: exact halves
    acc = (rng.integers(-2000, 2000, count) * 2 + 1) * (1 / (2 * scale)).astype(np.int64) // 1
    odd = rng.random(count) < 0.5
    scale = np.where(odd, np.nextafter(scale, np.float32(1)), scale).astype(np.float32)  # just past the half
    wide = rng.random(count) < 0.2
    acc = np.where(wide, rng.integers(-(2**31), 2**31, count), acc)  # beyond 2^24: float32(acc) rounds
    return acc.astype(np.int64), scale


@pytest.mark.parametrize("seed", range(4))
def test_value_and_array_match_the_oracle_at_near_ties(seed):
    rng = np.random.default_rng(seed)
    acc, scale = near_ties(rng, 400)
    zero_point, lo, hi = int(rng.integers(0, 256)), 0, 255
    expected = oracle(acc, scale, zero_point, lo, hi)
    got = np.array([rq32.requantize_float32_value(a, s, zero_point, lo, hi) for a, s in zip(acc, scale)])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(rq32.requantize_float32(acc, scale, zero_point, lo, hi), expected)


def test_ties_round_to_even_and_huge_products_saturate():
    acc = np.array([1, 3, 5, -1, -3, 2**31 - 1, -(2**31)])
    np.testing.assert_array_equal(rq32.requantize_float32(acc, np.float32(0.5), 0, -128, 127),
                                  [0, 2, 2, 0, -2, 127, -128])
    assert rq32.requantize_float32_value(2**31 - 1, np.float32(3e38), 0, 0, 255) == 255


def float_case(rng, channels):
    bias = rng.integers(-(2**12), 2**12, channels).astype(np.int32)
    return bias, (2.0 ** rng.uniform(-14, -4, channels)).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_int8_linear_with_a_float32_multiplier_matches_the_oracle(seed):
    rng = np.random.default_rng(seed)
    rows, cols, depth = int(rng.integers(1, 40)), int(rng.integers(1, 40)), int(rng.integers(1, 300))
    x_dtype = [np.uint8, np.int8][seed % 2]
    x, z_x, w = gemm_tests.random_operands(rng, rows, cols, depth, x_dtype, "uniform")
    bias, scale = float_case(rng, cols)
    zero_point, lo, hi = gemm_tests.output_range(rng, np.uint8, seed % 3 == 0)
    acc = gemm_tests.oracle_gemm_int32(x, z_x, w) + bias.astype(np.int64)
    expected = oracle(acc, scale, zero_point, lo, hi)
    y = gemm.int8_linear(x, z_x, w, bias, scale, None, zero_point, lo, hi, np.uint8)
    gemm_tests.assert_same(y, expected, np.uint8)


@pytest.mark.parametrize("seed, groups, kernel, padding", [(0, 1, 3, 1), (1, 4, 3, 1), (2, 1, 1, 0), (3, 2, 2, 0)])
def test_int8_conv2d_with_a_float32_multiplier_matches_the_oracle(seed, groups, kernel, padding):
    rng = np.random.default_rng(seed)
    batch, channels, out_channels, size = 2, 4, 8, 6
    x = rng.integers(0, 256, (batch, channels, size, size)).astype(np.uint8)
    w = rng.integers(-127, 128, (out_channels, channels // groups, kernel, kernel)).astype(np.int8)
    bias, scale = float_case(rng, out_channels)
    z_x = int(rng.integers(0, 256))
    acc = conv_tests.oracle_conv_int32(x, z_x, w, (1, 1), (padding, padding), (1, 1), groups)
    acc += bias.astype(np.int64)[None, :, None, None]
    expected = oracle(acc, scale[None, :, None, None], 7, 7, 255)
    y = conv.int8_conv2d(x, z_x, w, bias, scale, None, 7, 7, 255, np.uint8, padding=padding, groups=groups)
    gemm_tests.assert_same(y, expected, np.uint8)


@pytest.mark.parametrize("multiplier, shift, match", [
    (np.array([0.5], np.float32), np.array([1], np.int32), "shift=None"),
    (np.array([0.0], np.float32), None, "positive and finite"),
    (np.array([np.inf], np.float32), None, "positive and finite"),
    (np.ones(3, np.float32), None, "shape"),
])
def test_bad_float32_multipliers_are_refused(multiplier, shift, match):
    x, w = np.zeros((2, 4), np.uint8), np.ones((5, 4), np.int8)
    with pytest.raises((ConfigError, ValueError), match=match):
        gemm.int8_linear(x, 0, w, None, multiplier, shift, 0, 0, 255, np.uint8)


def test_runs_as_plain_python(run_without_jit):
    run_without_jit(__file__, """
        assert_plain_python(tests.rq32.requantize_float32_value)
        tests.test_value_and_array_match_the_oracle_at_near_ties(0)
        tests.test_int8_linear_with_a_float32_multiplier_matches_the_oracle(1)
        tests.test_int8_conv2d_with_a_float32_multiplier_matches_the_oracle(1, 4, 3, 1)
    """)


def oracle_fma(a: float, b: float, c: float) -> np.float32:
    """float32(a * b + c) rounded once, with exact rationals: the float32 neighbours of the exact
    value, the nearer one (the even one at a tie)."""
    from fractions import Fraction
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    guess = np.float32(float(exact))  # within one float32 step of the answer
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    distances = [abs(Fraction(float(v)) - exact) for v in candidates]
    best = min(distances)
    nearest = [v for v, d in zip(candidates, distances) if d == best]
    if len(nearest) == 1:
        return nearest[0]
    return next(v for v in nearest if int(np.float32(v).view(np.uint32)) % 2 == 0)


@pytest.mark.parametrize("seed", range(3))
def test_fma_float32_rounds_once(seed):
    rng = np.random.default_rng(seed)
    count = 3000
    a = rng.integers(0, 256, count).astype(np.float32)
    b = rng.uniform(0.01, 4, count).astype(np.float32)
    # c placed so that a * b + c lands on or next to float32 midpoints
    c = (-(a.astype(np.float64) * b) + rng.integers(0, 600, count) * 0.5
         + rng.choice([0.0, 2.0**-30, -(2.0**-30)], count)).astype(np.float32)
    c[::7] = rng.uniform(-1e6, 1e6, count)[::7].astype(np.float32)
    got = rq32.fma_float32(a, b, c)
    expected = np.array([oracle_fma(x, y, z) for x, y, z in zip(a, b, c)], np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    plain = (a * b + c).astype(np.float32)  # two roundings: differs somewhere, or the test is weak
    assert np.any(plain.view(np.uint32) != expected.view(np.uint32)) or seed > 0
