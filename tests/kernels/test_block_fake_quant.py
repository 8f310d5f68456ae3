"""qatcore.kernels.block_fake_quant against its NumPy oracle, bit for bit: y, the inside mask,
each row's scale and inverse, and the straight-through dx; compiled (float32 and float64) and
as plain Python.

The oracle is the NumPy arithmetic of docs/numerics.md ("Per-group and per-token fake
quantization"): ``group_qparams`` / ``token_qparams`` of
``qatcore.quantization.group_token_fake_quantize`` (which the torchao tests in
tests/quantization check against torchao 0.18), then the forward and backward formulas, one
NumPy expression each. NaN is compared by position, not by bit pattern: LLVM and NumPy may
give a NaN different signs (``-mn`` of a NaN, ``x * NaN``), and no result depends on it."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.kernels import block_fake_quant as kernel
from qatcore.quantization.group_token_fake_quantize import group_qparams, token_qparams

_bits_spec = importlib.util.spec_from_file_location("kernel_bits", Path(__file__).with_name("bits.py"))
_bits = importlib.util.module_from_spec(_bits_spec)
_bits_spec.loader.exec_module(_bits)
assert_same_bits = _bits.assert_same_bits

forward, backward = kernel.block_fake_quantize_forward, kernel.block_fake_quantize_backward

# ----------------------------------------------------------------------------------------
# The oracle


def oracle_forward(x, group_size, bits, symmetric):
    """(y, inside, scale, inv_scale) as the kernel returns them, in NumPy."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    blocks = x.reshape(-1, x.shape[-1] if group_size is None else group_size)
    rule = token_qparams if group_size is None else group_qparams
    with np.errstate(all="ignore"):
        scale, zero_point = rule(blocks, bits, symmetric)
        s, z = scale[:, None], zero_point[:, None]
        inv = x.dtype.type(1) / s
        q = np.rint(blocks * inv) + z
        y = (np.clip(q, qmin, qmax) - z) * s
    return y.reshape(x.shape), (q >= qmin) & (q <= qmax), scale, inv[:, 0]


def oracle_backward(grad, inside, scale, inv_scale):
    with np.errstate(all="ignore"):
        dx = np.where(inside, grad.reshape(inside.shape) * scale[:, None], grad.dtype.type(0)) * inv_scale[:, None]
    return dx.reshape(grad.shape)




def check_against_oracle(x, grad, group_size, bits, symmetric):
    result = forward(x, group_size, bits, symmetric)
    expected = oracle_forward(x, group_size, bits, symmetric)
    for actual, wanted in zip(result, expected):
        assert_same_bits(actual, wanted)
    _, inside, scale, inv_scale = result
    assert_same_bits(backward(grad, inside, scale, inv_scale), oracle_backward(grad, inside, scale, inv_scale))


# ----------------------------------------------------------------------------------------
# Generated cases

KINDS = ("random", "zeros", "constant", "plus_minus_1e30", "1e30", "nan", "inf", "minus_inf", "signed_zeros",
         "subnormal", "ties", "shifted", "huge")


def make_rows(rng, rows, n, kind, exponent, dtype):
    """Random rows scaled by 10**exponent, row 0 replaced by a special case of ``kind``."""
    x = (rng.standard_normal((rows, n)) * 10.0**exponent).astype(dtype)
    first = x[0]
    if kind == "zeros":
        first[:] = 0
    elif kind == "constant":
        first[:] = first[0]
    elif kind == "plus_minus_1e30":
        first[::2], first[1::2] = 1e30, -1e30
    elif kind == "1e30":
        first[:] = 1e30
    elif kind in ("nan", "inf", "minus_inf"):
        first[rng.integers(n, size=rng.integers(1, 3))] = {"nan": np.nan, "inf": np.inf, "minus_inf": -np.inf}[kind]
    elif kind == "signed_zeros":
        first[:] = rng.choice(np.array([0.0, -0.0], dtype), size=n)
    elif kind == "subnormal":
        first[:] = rng.integers(-3, 4, size=n) * np.finfo(dtype).smallest_subnormal
    elif kind == "ties":  # halves on a grid whose scale is a power of two: x * inv lands on .5
        first[:] = rng.integers(-20, 21, size=n) / 2 * 2.0**exponent
        first[0] = 7.5 * 2.0**exponent
    elif kind == "shifted":  # a group far from 0: the affine group zero point beyond the grid
        first += dtype(1000)
        first[: max(1, n // 4)] = -1e30
    elif kind == "huge":  # near the top of the dtype: max - min overflows to inf
        first[:] = rng.choice(np.array([-1, 1], dtype), size=n) * np.finfo(dtype).max
    return x


@st.composite
def cases(draw):
    """(x, grad, group_size, bits, symmetric): leading axes of any size (0 included), per
    token (group_size None) or per group with a group size dividing the last axis."""
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64]))
    leading = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
    group_size = draw(st.none() | st.sampled_from([1, 2, 3, 8, 16, 32]))
    groups = draw(st.integers(1, 4))
    n = draw(st.sampled_from([1, 2, 5, 16, 33, 100, 512])) if group_size is None else group_size * groups
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rows = max(1, int(np.prod(leading, dtype=np.int64)))
    x = make_rows(rng, rows, n, kind, draw(st.integers(-6, 6)), dtype)
    x = x[: int(np.prod(leading, dtype=np.int64))].reshape(*leading, n)  # a 0 in leading empties x
    grad = rng.standard_normal(x.shape).astype(dtype)
    if draw(st.booleans()):
        grad.reshape(-1)[::7] = draw(st.sampled_from([0.0, -0.0, np.inf, np.nan, 1e38]))
    return x, grad, group_size, draw(st.integers(2, 8)), draw(st.booleans())


@settings(max_examples=300)
@given(cases())
def test_matches_the_oracle_bit_for_bit(case):
    check_against_oracle(*case)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("group_size, symmetric", [(None, False), (None, True), (4, False), (4, True)])
@pytest.mark.parametrize("kind", KINDS)
def test_every_special_row_in_every_scheme(dtype, group_size, symmetric, kind):
    rng = np.random.default_rng(7)
    x = make_rows(rng, 3, 8, kind, 0, dtype)
    grad = rng.standard_normal(x.shape).astype(dtype)
    for bits in (2, 4, 8):
        check_against_oracle(x, grad, group_size, bits, symmetric)


# ----------------------------------------------------------------------------------------
# By hand


def test_a_nan_makes_its_whole_block_nan_and_clipped_and_leaves_the_others():
    x = np.array([[0.5, np.nan, -1.0, 2.0], [0.5, 0.25, -1.0, 2.0]], np.float32)
    for group_size, symmetric in [(None, False), (None, True), (4, False), (2, True), (2, False)]:
        y, inside, scale, inv_scale = forward(x, group_size, 4, symmetric)
        n = inside.shape[1]  # the NaN is in block 0, the first n elements of x
        assert np.isnan(scale[0]) and np.isnan(inv_scale[0]) and not inside[0].any()
        assert not np.isnan(scale[1:]).any() and inside[1:].any()
        assert np.isnan(y.reshape(-1)[:n]).all() and not np.isnan(y.reshape(-1)[n:]).any()
        dx = backward(np.ones_like(x), inside, scale, inv_scale).reshape(-1)
        assert np.isnan(dx[:n]).all() and not np.isnan(dx[n:]).any()  # 0 * inv with inv = NaN


def test_symmetric_int4_by_hand():
    # s = 0.75 / 7.5 = 0.1: 0.75 * 10 = 7.5 rounds (to even) to 8, beyond qmax = 7, and is clipped
    x = np.array([[0.0, 0.1, -0.2, 0.75]], np.float32)
    y, inside, scale, inv_scale = forward(x, None, 4, True)
    s = np.float32(0.75) / np.float32(7.5)
    assert scale.tolist() == [s] and inv_scale.tolist() == [np.float32(1) / s]
    assert inside.tolist() == [[True, True, True, False]]
    assert y.tolist() == [[0.0, np.float32(1) * s, np.float32(-2) * s, np.float32(7) * s]]
    grad = np.array([[1.0, -2.0, 3.0, 4.0]], np.float32)
    assert backward(grad, inside, scale, inv_scale).tolist() == [[1.0, -2.0, 3.0, 0.0]]


def test_affine_group_zero_point_is_truncated_and_saturates():
    # [1, 2, 3, 4], int4: s = 3 / 15, z = int32(1 + s * 8) = int32(2.6) = 2; a group of +-1e30 gets -2^31
    x = np.array([[1.0, 2.0, 3.0, 4.0, 1e30, -1e30, 1e30, -1e30]], np.float32)
    y, inside, scale, _ = forward(x, 4, 4, False)
    assert scale[0] == np.float32(3) / np.float32(15)
    assert_same_bits(y, oracle_forward(x, 4, 4, False)[0])
    assert group_qparams(x.reshape(2, 4), 4, False)[1].tolist() == [2.0, -(2.0**31)]
    # the int32 range is [-2^31, 2^31): constant groups (s = 1e-6, z = int32(c + 8e-6), = int32(c) in float32)
    # at its two ends and just below its top
    x = np.array([[2.0**31] * 2, [-(2.0**31)] * 2, [2.0**31 - 128] * 2], np.float32)
    assert group_qparams(x, 4, False)[1].tolist() == [-(2.0**31), -(2.0**31), 2.0**31 - 128]
    for wide in (x, x.astype(np.float64)):
        for actual, expected in zip(forward(wide, 2, 4, False), oracle_forward(wide, 2, 4, False)):
            assert_same_bits(actual, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_order_key_orders_bits_as_the_floats_with_nan_beyond_the_infinities(dtype):
    info = np.finfo(dtype)
    values = np.array([-np.inf, -info.max, -1.5, -info.tiny, -info.smallest_subnormal, -0.0, 0.0,
                       info.smallest_subnormal, info.tiny, 1.0, info.max, np.inf], dtype)
    integer = np.dtype(f"int{info.bits}")
    shift, magnitude = integer.type(info.bits - 1), integer.type(np.iinfo(integer).max)
    keys = [kernel._order_key(b, shift, magnitude) for b in values.view(integer)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    positive_nan, negative_nan = np.array([np.nan, -np.nan], dtype).view(integer)
    assert kernel._order_key(positive_nan, shift, magnitude) > keys[-1]
    assert kernel._order_key(negative_nan, shift, magnitude) < keys[0]
    # the map is its own inverse, so the kernel writes back the bits of the extreme elements
    assert [kernel._order_key(k, shift, magnitude) for k in keys] == values.view(integer).tolist()


def test_rows_are_views_of_x_and_results_are_new_arrays():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    before = x.copy()
    y, inside, scale, inv_scale = forward(x, 2, 3, False)
    assert y.shape == x.shape and inside.shape == (12, 2) and scale.shape == inv_scale.shape == (12,)
    assert np.array_equal(x, before) and not np.shares_memory(y, x)
    y, inside, scale, _ = forward(x, None, 8, True)
    assert inside.shape == (6, 4) and scale.shape == (6,)


# ----------------------------------------------------------------------------------------
# The same kernels as plain Python


def test_runs_as_plain_python(run_without_jit):
    run_without_jit(__file__, """
        from qatcore.kernels import block_fake_quant as kernel
        assert_plain_python(kernel._ranges, kernel._forward, kernel._backward, kernel._row_qparams)
        rng = np.random.default_rng(3)
        for i, kind in enumerate(tests.KINDS):
            dtype = np.float64 if i % 3 == 0 else np.float32
            x = tests.make_rows(rng, 3, 16, kind, i % 5 - 2, dtype)
            grad = rng.standard_normal(x.shape).astype(dtype)
            for group_size, symmetric in [(None, False), (None, True), (8, False), (4, True)]:
                tests.check_against_oracle(x, grad, group_size, 2 + i % 7, symmetric)
    """)
