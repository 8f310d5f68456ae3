"""qatcore.kernels.im2col against NumPy oracles: im2col, and col2im as its adjoint."""

import doctest
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.kernels import im2col as im2col_kernels
from qatcore.kernels import layout
from qatcore.kernels import window as window_kernels

_spec = importlib.util.spec_from_file_location("kernel_geometries", Path(__file__).with_name("geometries.py"))
geometries = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(geometries)

dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------- oracles


def im2col_oracle(x, geometry, fill=0):
    g = geometry
    padded = np.pad(x, ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw)), constant_values=fill)
    cols = np.empty((g.batch, g.channels, g.kh, g.kw, g.out_height, g.out_width), x.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            rows, columns = geometries.tap_slices(g, i, j)
            cols[:, :, i, j] = padded[:, :, rows, columns]
    per_sample = cols.reshape(g.batch, g.channels * g.kh * g.kw, g.out_height * g.out_width)
    return np.ascontiguousarray(per_sample.transpose(1, 0, 2)).reshape(g.channels * g.kh * g.kw, -1)


def col2im_oracle(cols, geometry):
    """Scatter-add into a zero-padded input, then crop the padding away."""
    g = geometry
    padded = np.zeros((g.batch, g.channels, g.height + 2 * g.ph, g.width + 2 * g.pw), cols.dtype)
    per_sample = cols.reshape(g.channels * g.kh * g.kw, g.batch, g.out_height * g.out_width).transpose(1, 0, 2)
    blocks = per_sample.reshape(g.batch, g.channels, g.kh, g.kw, g.out_height, g.out_width)
    for i in range(g.kh):
        for j in range(g.kw):
            rows, columns = geometries.tap_slices(g, i, j)
            # For a fixed (i, j) the positions are distinct, so += is a true scatter-add.
            padded[:, :, rows, columns] += blocks[:, :, i, j]
    return padded[:, :, g.ph:g.ph + g.height, g.pw:g.pw + g.width].copy()


def random_input(geometry, dtype, seed):
    g = geometry
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "u":  # the int8 conv's uint8 activations
        return rng.integers(0, 256, g.input_shape).astype(dtype)
    return rng.standard_normal(g.input_shape).astype(dtype)


def random_columns(geometry, dtype, seed):
    g = geometry
    rng = np.random.default_rng(seed)
    shape = (g.channels * g.kh * g.kw, g.batch * g.out_height * g.out_width)
    return rng.standard_normal(shape).astype(dtype)


def channel_major(x):
    """The same (N, C, H, W) values stored in (C, N, H, W) order."""
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def run_im2col(x, geometry):
    return im2col_kernels.im2col(x, *geometry.window)


def run_col2im(cols, geometry):
    g = geometry
    return im2col_kernels.col2im(cols, g.channels, g.height, g.width, *g.window)


# Plain checks, shared by the hypothesis tests and the NUMBA_DISABLE_JIT subprocess.


def check_im2col(geometry, dtype, seed):
    x = random_input(geometry, dtype, seed)
    cols = run_im2col(x, geometry)
    assert cols.dtype == dtype and cols.flags.c_contiguous
    expected = im2col_oracle(x, geometry)
    np.testing.assert_array_equal(cols, expected)
    # Channel-major input gives the same columns, and so does a batch unfolded in parts.
    np.testing.assert_array_equal(run_im2col(channel_major(x), geometry), expected)
    positions = geometry.out_height * geometry.out_width
    part = None  # each sample's columns written over the previous sample's (im2col's out)
    for first in range(geometry.batch):
        part = im2col_kernels.im2col(channel_major(x), *geometry.window, first_sample=first, samples=1, out=part)
        np.testing.assert_array_equal(part, expected[:, first * positions:(first + 1) * positions])


def check_col2im(geometry, dtype, seed):
    cols = random_columns(geometry, dtype, seed)
    x_grad = run_col2im(cols, geometry)
    assert x_grad.dtype == dtype
    assert x_grad.shape == (geometry.batch, geometry.channels, geometry.height, geometry.width)
    assert layout.is_channel_major(x_grad) or geometry.batch == 1
    # Exact: kernel and oracle add each element's terms in the same ascending (i, j) order,
    # starting from zero, and drop the same padding terms.
    expected = col2im_oracle(cols, geometry)
    np.testing.assert_array_equal(x_grad, expected)
    # Added a sample at a time onto a zeroed gradient: the same sums.
    positions = geometry.out_height * geometry.out_width
    parts = channel_major(np.zeros(expected.shape, dtype))
    for first in range(geometry.batch):
        part = np.ascontiguousarray(cols[:, first * positions:(first + 1) * positions])
        im2col_kernels.col2im_add(part, parts, first, *geometry.window)
    np.testing.assert_array_equal(parts, expected)


def check_col2im_is_adjoint(geometry, seed):
    x = random_input(geometry, np.float64, seed)
    cols = random_columns(geometry, np.float64, seed + 1)
    forward = np.vdot(run_im2col(x, geometry), cols)
    adjoint = np.vdot(x, run_col2im(cols, geometry))
    # The two inner products add the same products in different orders.
    np.testing.assert_allclose(forward, adjoint, rtol=1e-12, atol=1e-12)


def _loop_geometry(geometry):
    g = geometry
    return window_kernels.window_geometry(g.height, g.width, *g.window)


def _loop_tables(geometry):
    """The two algorithms of the jitted loops: (name, table), an empty table selecting rows."""
    table = im2col_kernels._column_table(_loop_geometry(geometry))
    return [("table", table), ("rows", np.empty((0, 0), dtype=np.uintp))]


def check_im2col_algorithms(geometry, dtype, seed, fill=0):
    """Both loops, called directly whatever the output width, equal the oracle and each other
    bit for bit."""
    g = geometry
    x = random_input(g, dtype, seed)
    expected = im2col_oracle(x, g, fill)
    planes = g.batch * g.channels
    layout = (g.batch, g.channels, False, 0, g.batch)
    results = []
    for name, table in _loop_tables(g):
        # The table loop must write every element; the row loop expects the padding value in place.
        poison = np.nan if np.dtype(dtype).kind == "f" else 255 - fill
        cols = np.full(expected.shape, poison if name == "table" else fill, dtype=dtype)
        im2col_kernels._im2col_fill(
            x.reshape(planes, -1), cols, table, _loop_geometry(g), np.dtype(dtype).type(fill), layout
        )
        np.testing.assert_array_equal(cols, expected, err_msg=name)
        results.append(cols.view(f"u{cols.itemsize}"))
    np.testing.assert_array_equal(results[0], results[1])


def check_col2im_algorithms(geometry, dtype, seed):
    g = geometry
    cols = random_columns(g, dtype, seed)
    expected = col2im_oracle(cols, g)
    results = []
    for name, table in _loop_tables(g):
        x_grad = channel_major(np.zeros(expected.shape, dtype=dtype))
        x_grad3 = x_grad.transpose(1, 0, 2, 3).reshape(g.channels, g.batch, -1)
        im2col_kernels._col2im_accumulate(cols, x_grad3, table, _loop_geometry(g), 0)
        np.testing.assert_array_equal(x_grad, expected, err_msg=name)
        results.append(x_grad.view(f"u{x_grad.itemsize}"))
    np.testing.assert_array_equal(results[0], results[1])


FIXED_GEOMETRIES = [
    geometries.WindowGeometry(2, 3, 7, 6, 3, 3, 1, 1, 1, 1, 1, 1),
    geometries.WindowGeometry(1, 2, 9, 8, 4, 3, 2, 3, 2, 1, 2, 1),
    geometries.WindowGeometry(3, 1, 1, 5, 1, 2, 3, 1, 0, 1, 1, 2),
]


# ----------------------------------------------------------------------------- tests


@settings(deadline=None, max_examples=60)
@given(geometry=geometries.window_geometries(), dtype=dtypes, seed=seeds)
def test_im2col_matches_oracle(geometry, dtype, seed):
    check_im2col(geometry, dtype, seed)


@settings(deadline=None, max_examples=60)
@given(geometry=geometries.window_geometries(), dtype=dtypes, seed=seeds)
def test_col2im_matches_scatter_oracle(geometry, dtype, seed):
    check_col2im(geometry, dtype, seed)


@settings(deadline=None, max_examples=40)
@given(geometry=geometries.window_geometries(), seed=st.integers(0, 2**31))
def test_col2im_is_adjoint_of_im2col(geometry, seed):
    check_col2im_is_adjoint(geometry, seed)


@settings(deadline=None, max_examples=60)
@given(geometry=geometries.window_geometries(max_size=24), dtype=dtypes, seed=seeds)
def test_im2col_by_table_and_by_rows_agree(geometry, dtype, seed):
    check_im2col_algorithms(geometry, dtype, seed)


@settings(deadline=None, max_examples=40)
@given(geometry=geometries.window_geometries(max_size=24), fill=st.integers(0, 255), seed=seeds)
def test_uint8_im2col_pads_with_the_fill_value(geometry, fill, seed):
    """The int8 conv's short-depth path: uint8 planes, padding read as its zero point."""
    check_im2col_algorithms(geometry, np.uint8, seed, fill)
    x = random_input(geometry, np.uint8, seed)
    g = geometry
    cols = im2col_kernels.im2col(x, *g.window, fill=fill)
    assert cols.dtype == np.uint8
    np.testing.assert_array_equal(cols, im2col_oracle(x, g, fill))


@settings(deadline=None, max_examples=60)
@given(geometry=geometries.window_geometries(max_size=24), dtype=dtypes, seed=seeds)
def test_col2im_by_table_and_by_rows_agree(geometry, dtype, seed):
    check_col2im_algorithms(geometry, dtype, seed)


@settings(deadline=None, max_examples=30)
@given(geometry=geometries.window_geometries(max_size=40), dtype=dtypes, seed=seeds)
def test_public_functions_match_oracles_on_wide_inputs(geometry, dtype, seed):
    """Wide enough that the public functions also pick the row loops."""
    check_im2col(geometry, dtype, seed)
    check_col2im(geometry, dtype, seed)


def test_public_functions_use_both_algorithms():
    """Narrow outputs go by table, wide ones by rows (the thresholds are in the module)."""
    narrow = geometries.WindowGeometry(2, 3, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1)
    wide = geometries.WindowGeometry(2, 3, 6, 33, 3, 3, 1, 2, 1, 1, 1, 2)  # OW = 16, stride and dilation 2
    assert narrow.out_width < im2col_kernels._COL2IM_TABLE_BELOW_WIDTH
    assert wide.out_width >= im2col_kernels._IM2COL_TABLE_BELOW_WIDTH
    for geometry in (narrow, wide):
        for dtype in (np.float32, np.float64):
            check_im2col(geometry, dtype, 5)
            check_col2im(geometry, dtype, 6)


def test_im2col_follows_the_index_formula():
    """Checks the oracle too: every entry straight from the documented formula."""
    g = geometries.WindowGeometry(2, 2, 5, 6, 3, 2, 2, 1, 1, 1, 2, 3)
    x = random_input(g, np.float64, 7)
    cols = run_im2col(x, g)
    ow_count = g.out_width
    for n in range(g.batch):
        for c in range(g.channels):
            for i in range(g.kh):
                for j in range(g.kw):
                    for oh in range(g.out_height):
                        for ow in range(g.out_width):
                            h = oh * g.sh - g.ph + i * g.dh
                            w = ow * g.sw - g.pw + j * g.dw
                            inside = 0 <= h < g.height and 0 <= w < g.width
                            expected = x[n, c, h, w] if inside else 0.0
                            row = (c * g.kh + i) * g.kw + j
                            assert cols[row, (n * g.out_height + oh) * ow_count + ow] == expected


def test_conv2d_as_gemm_matches_direct_convolution():
    g = geometries.WindowGeometry(2, 3, 6, 5, 3, 2, 1, 2, 1, 1, 1, 2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(g.input_shape)
    weight = rng.standard_normal((4, g.channels, g.kh, g.kw))
    out = np.matmul(weight.reshape(4, -1), run_im2col(x, g))  # (K, N*P): channel-major output
    out = out.reshape(4, g.batch, g.out_height, g.out_width).transpose(1, 0, 2, 3)
    padded = np.pad(x, ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw)))
    direct = np.zeros((g.batch, 4, g.out_height, g.out_width))
    for i in range(g.kh):
        for j in range(g.kw):
            rows, columns = geometries.tap_slices(g, i, j)
            direct += np.einsum("kc,nchw->nkhw", weight[:, :, i, j], padded[:, :, rows, columns])
    np.testing.assert_allclose(out, direct, rtol=1e-12, atol=1e-12)


def test_kernels_leave_their_inputs_alone():
    g = FIXED_GEOMETRIES[0]
    x = random_input(g, np.float32, 0)
    cols = random_columns(g, np.float32, 1)
    x_before, cols_before = x.copy(), cols.copy()
    run_im2col(x, g)
    run_col2im(cols, g)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(cols, cols_before)


def test_docstring_examples():
    assert doctest.testmod(im2col_kernels).failed == 0


def test_kernels_run_as_plain_python_without_jit(run_without_jit):
    run_without_jit(__file__, """
        kernels = tests.im2col_kernels
        assert_plain_python(
            kernels._im2col_fill,
            kernels._col2im_accumulate,
            kernels._column_table,
            kernels._tap_rows,
            kernels._im2col_by_table,
            kernels._im2col_by_rows,
            kernels._col2im_by_table,
            kernels._col2im_by_rows,
        )
        for geometry in tests.FIXED_GEOMETRIES:
            for dtype in (np.float32, np.float64):
                tests.check_im2col(geometry, dtype, 11)
                tests.check_col2im(geometry, dtype, 12)
                tests.check_im2col_algorithms(geometry, dtype, 14)
                tests.check_col2im_algorithms(geometry, dtype, 15)
            tests.check_col2im_is_adjoint(geometry, 13)
    """)


def test_importing_the_kernel_package_does_not_import_numba():
    code = "import qatcore.kernels, sys; assert 'numba' not in sys.modules; print('clean')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"



def test_im2col_refuses_an_out_array_of_another_shape():
    g = FIXED_GEOMETRIES[0]
    x = random_input(g, np.float32, 0)
    with pytest.raises(ValueError, match="out must be"):
        im2col_kernels.im2col(x, *g.window, out=np.zeros((1, 1), np.float32))


# The convolutions of the CIFAR networks (ResNet-20/56's stem, 3x3 layers, stride-2 and 1x1
# shortcuts; MobileNetV2's stem and 1x1 convs), at batch 2.
NETWORK_GEOMETRIES = [
    geometries.WindowGeometry(2, 3, 32, 32, 3, 3, 1, 1, 1, 1),
    geometries.WindowGeometry(2, 16, 32, 32, 3, 3, 1, 1, 1, 1),
    geometries.WindowGeometry(2, 16, 32, 32, 3, 3, 2, 2, 1, 1),
    geometries.WindowGeometry(2, 16, 32, 32, 1, 1, 2, 2, 0, 0),
    geometries.WindowGeometry(2, 32, 16, 16, 3, 3, 1, 1, 1, 1),
    geometries.WindowGeometry(2, 64, 8, 8, 3, 3, 1, 1, 1, 1),
    geometries.WindowGeometry(2, 24, 16, 16, 1, 1, 1, 1, 0, 0),
    geometries.WindowGeometry(2, 320, 4, 4, 1, 1, 1, 1, 0, 0),
]


@pytest.mark.parametrize("geometry", NETWORK_GEOMETRIES, ids=str)
def test_kernels_match_oracles_on_the_networks_layers(geometry):
    for dtype in (np.float32, np.float64):
        check_im2col(geometry, dtype, 21)
        check_col2im(geometry, dtype, 22)
    check_col2im_is_adjoint(geometry, 23)
