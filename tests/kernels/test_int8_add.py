"""qatcore.kernels.int8_add against the NumPy residual add it replaces, bit for bit, compiled
and as plain Python.

The oracles are ``Int8Add``'s NumPy formulas: fixed point with
``requantize.multiply_by_quantized_multiplier`` on int64 arrays, float32 with
``requantization.add_float32`` (ONNX Runtime's QLinearAdd, its FMAs emulated in float64), then
``rint`` and the clamp."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.kernels import int8_add
from qatcore.kernels import requantize_float32 as rq32
from qatcore.kernels.requantize import multiply_by_quantized_multiplier, quantize_multiplier
from qatcore.quantization.int8_layers import ADD_LEFT_SHIFT
from qatcore.quantization.requantization import add_float32, add_float32_constants

DTYPES = (np.uint8, np.int8)


# ----------------------------------------------------------------------------- oracles


def oracle_fixed_point(a, z_a, b, z_b, multiplier, shift, z_y, lo, hi, out_dtype):
    total = np.int64(0)
    for i, (x, z) in enumerate(((a, z_a), (b, z_b))):
        shifted = (x.astype(np.int64) - z) << ADD_LEFT_SHIFT
        total = total + multiply_by_quantized_multiplier(shifted, multiplier[i:i + 1], shift[i:i + 1])
    y = multiply_by_quantized_multiplier(total, multiplier[2:3], shift[2:3]) + z_y
    return np.clip(y, lo, hi).astype(out_dtype)


def oracle_float32(a, z_a, b, z_b, scales, y_scale, z_y, lo, hi, out_dtype):
    v = add_float32(a, b, scales, [z_a, z_b], y_scale, z_y)
    return np.clip(np.rint(v), lo, hi).astype(out_dtype)


# ----------------------------------------------------------------------------- cases


def _range(dtype):
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def random_case(seed, size, dtypes, extremes=False):
    """Inputs of ``size`` elements (random, or only their dtype's extremes and zero points),
    zero points and an output grid with or without a fused ReLU."""
    rng = np.random.default_rng(seed)
    a_dtype, b_dtype, out_dtype = dtypes
    inputs = []
    for dtype in (a_dtype, b_dtype):
        low, high = _range(dtype)
        z = int(rng.integers(low, high + 1))
        values = rng.integers(low, high + 1, size)
        if extremes:
            values = rng.choice([low, high, z], size)
        inputs.append((values.astype(dtype), z))
    low, high = _range(out_dtype)
    z_y = int(rng.integers(low, high + 1))
    lo = z_y if rng.random() < 0.5 else low  # a fused ReLU clamps at z_y
    return inputs, z_y, lo, high, out_dtype


def fixed_point_multipliers(seed, wide):
    """(M0, shift) of M_a, M_b, M_y: from scales as Int8Add makes them, or (``wide``) any
    multipliers quantize_multiplier accepts, saturating sums included."""
    rng = np.random.default_rng(seed)
    if wide:
        real = 2.0 ** rng.uniform(-32, 30.9, 3)
    else:
        s_a, s_b, s_y = 2.0 ** rng.uniform(-12, 2, 3)
        twice_max = 2.0 * max(s_a, s_b)
        real = np.array([s_a / twice_max, s_b / twice_max, twice_max / (2.0**ADD_LEFT_SHIFT * s_y)])
    multiplier, shift = quantize_multiplier(real)
    return multiplier.astype(np.int64), shift.astype(np.int64)


def float32_scales(seed):
    """float32 (s_a, s_b) and s_y; powers of two half of the time, which make exact halves."""
    rng = np.random.default_rng(seed)
    exponents = rng.integers(-10, 3, 3) if rng.random() < 0.5 else rng.uniform(-10, 3, 3)
    scales = (2.0 ** exponents).astype(np.float32)
    return scales[:2], scales[2]


# Plain checks, shared by the hypothesis tests and the NUMBA_DISABLE_JIT subprocess.


def check_fixed_point(seed, size, dtypes, extremes=False, wide=False):
    inputs, z_y, lo, hi, out_dtype = random_case(seed, size, dtypes, extremes)
    (a, z_a), (b, z_b) = inputs
    multiplier, shift = fixed_point_multipliers(seed + 1, wide)
    # (multiply_by_quantized_multiplier warns on empty arrays: numba reads a broadcast view's flags)
    expected = (oracle_fixed_point(a, z_a, b, z_b, multiplier, shift, z_y, lo, hi, out_dtype) if a.size
                else np.empty(a.shape, out_dtype))
    got = int8_add.add_fixed_point(a, z_a, b, z_b, multiplier, shift, z_y, lo, hi, out_dtype)
    assert got.dtype == np.dtype(out_dtype) and got.shape == a.shape
    np.testing.assert_array_equal(got, expected)


def check_float32(seed, size, dtypes, extremes=False):
    inputs, z_y, lo, hi, out_dtype = random_case(seed, size, dtypes, extremes)
    (a, z_a), (b, z_b) = inputs
    scales, y_scale = float32_scales(seed + 1)
    expected = oracle_float32(a, z_a, b, z_b, scales, y_scale, z_y, lo, hi, out_dtype)
    r_a, r_b, constant = add_float32_constants(scales, [z_a, z_b], y_scale, z_y)
    got = int8_add.add_float32(a, z_a, b, z_b, r_a, r_b, constant, lo, hi, out_dtype)
    assert got.dtype == np.dtype(out_dtype) and got.shape == a.shape
    np.testing.assert_array_equal(got, expected)


def check_table(seed, size, dtypes, arithmetic):
    """add_by_table of pair_table equals the oracle of the add the table was made of."""
    inputs, z_y, lo, hi, out_dtype = random_case(seed, size, dtypes, extremes=seed % 2 == 0)
    (a, z_a), (b, z_b) = inputs
    if arithmetic == "fixed_point":
        multiplier, shift = fixed_point_multipliers(seed + 1, wide=seed % 3 == 0)
        add, arguments = int8_add.add_fixed_point, (z_a, z_b, multiplier, shift, z_y, lo, hi, out_dtype)
        expected = oracle_fixed_point(a, z_a, b, z_b, multiplier, shift, z_y, lo, hi, out_dtype)
    else:
        scales, y_scale = float32_scales(seed + 1)
        add = int8_add.add_float32
        arguments = (z_a, z_b, *add_float32_constants(scales, [z_a, z_b], y_scale, z_y), lo, hi, out_dtype)
        expected = oracle_float32(a, z_a, b, z_b, scales, y_scale, z_y, lo, hi, out_dtype)
    table = int8_add.pair_table(add, a.dtype, b.dtype, *arguments)
    assert table.shape == (65536,) and table.dtype == np.dtype(out_dtype)
    got = int8_add.add_by_table(a.reshape(1, -1), b.reshape(1, -1), table)
    assert got.shape == (1, size)
    np.testing.assert_array_equal(got.reshape(-1), expected)


def check_fma_value(seed):
    """The scalar FMA equals the NumPy one, near ties included (c a power of two apart)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 256, 200).astype(np.float32)
    b = (2.0 ** rng.integers(-12, 0, 200)).astype(np.float32)
    b = np.where(rng.random(200) < 0.5, np.nextafter(b, np.float32(1)), b).astype(np.float32)
    c = (rng.standard_normal(200) * 2.0 ** rng.integers(-20, 8, 200)).astype(np.float32)
    got = np.array([rq32.fma_float32_value(x, y, z) for x, y, z in zip(a, b, c)], np.float32)
    np.testing.assert_array_equal(got, rq32.fma_float32(a, b, c))


FIXED_CASES = [(3, 1000, (np.uint8, np.uint8, np.uint8)), (4, 257, (np.int8, np.uint8, np.int8)),
               (5, 0, (np.uint8, np.int8, np.uint8)), (6, 33, (np.int8, np.int8, np.int8))]

dtype_triples = st.tuples(st.sampled_from(DTYPES), st.sampled_from(DTYPES), st.sampled_from(DTYPES))
seeds = st.integers(0, 2**31)


# ----------------------------------------------------------------------------- tests


@settings(deadline=None, max_examples=80)
@given(seed=seeds, size=st.integers(0, 3000), dtypes=dtype_triples, extremes=st.booleans(), wide=st.booleans())
def test_fixed_point_add_matches_the_numpy_add(seed, size, dtypes, extremes, wide):
    check_fixed_point(seed, size, dtypes, extremes, wide)


@settings(deadline=None, max_examples=80)
@given(seed=seeds, size=st.integers(0, 3000), dtypes=dtype_triples, extremes=st.booleans())
def test_float32_add_matches_the_numpy_add(seed, size, dtypes, extremes):
    check_float32(seed, size, dtypes, extremes)


@settings(deadline=None, max_examples=30)
@given(seed=seeds, size=st.integers(1, 3000), dtypes=dtype_triples,
       arithmetic=st.sampled_from(["fixed_point", "float32"]))
def test_the_table_of_every_input_pair_matches_the_numpy_add(seed, size, dtypes, arithmetic):
    check_table(seed, size, dtypes, arithmetic)


@pytest.mark.parametrize("seed", range(3))
def test_fma_value_matches_numpy_fma(seed):
    check_fma_value(seed)


@pytest.mark.parametrize("dtypes", [(np.uint8, np.uint8, np.uint8), (np.int8, np.uint8, np.int8)])
def test_parallel_drivers_match_the_numpy_add(dtypes):
    """Above PARALLEL_MIN_ELEMENTS (a ResNet-20 stage-1 add at batch 64 is 2^20 elements)."""
    size = int8_add.PARALLEL_MIN_ELEMENTS + 12345
    check_fixed_point(7, size, dtypes)
    check_float32(8, size, dtypes)


def test_writes_into_out_and_keeps_the_shape():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 3, 4)).astype(np.uint8), rng.integers(0, 256, (2, 3, 4)).astype(np.uint8)
    multiplier, shift = fixed_point_multipliers(1, False)
    out = np.empty((2, 3, 4), np.uint8)
    got = int8_add.add_fixed_point(a, 3, b, 7, multiplier, shift, 5, 5, 255, np.uint8, out=out)
    assert got is out
    np.testing.assert_array_equal(out, oracle_fixed_point(a, 3, b, 7, multiplier, shift, 5, 5, 255, np.uint8))


def test_left_shift_is_the_runtime_s():
    assert int8_add.ADD_LEFT_SHIFT == ADD_LEFT_SHIFT


def test_kernels_run_as_plain_python_without_jit(run_without_jit):
    run_without_jit(__file__, """
        kernels = tests.int8_add
        assert_plain_python(kernels._fixed_point_range, kernels._float32_range, kernels._fixed_point_parallel,
                            kernels._float32_parallel, tests.rq32.fma_float32_value)
        for seed, size, dtypes in tests.FIXED_CASES:
            for extremes in (False, True):
                tests.check_fixed_point(seed, size, dtypes, extremes, wide=extremes)
                tests.check_float32(seed, size, dtypes, extremes)
        tests.check_fma_value(0)
        assert_plain_python(kernels._gather_pairs)
        tests.check_table(4, 500, (np.int8, np.uint8, np.uint8), "fixed_point")
        small = kernels.PARALLEL_MIN_ELEMENTS
        kernels.PARALLEL_MIN_ELEMENTS = 100  # the parallel drivers, as plain loops
        tests.check_fixed_point(9, 1000, (np.uint8, np.int8, np.uint8))
        tests.check_float32(9, 1000, (np.uint8, np.int8, np.uint8))
        kernels.PARALLEL_MIN_ELEMENTS = small
    """)
