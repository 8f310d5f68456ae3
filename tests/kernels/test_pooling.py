"""qatcore.kernels.pooling against NumPy oracles: max and average pooling, forward and backward."""

import doctest
import importlib.util
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.kernels import pooling
from qatcore.kernels import window as window_kernels

_spec = importlib.util.spec_from_file_location("kernel_geometries", Path(__file__).with_name("geometries.py"))
geometries = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(geometries)

dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)
# "ties": small integers, so most windows hold equal maxima; "special": NaN, +-inf and ties.
value_kinds = st.sampled_from(["normal", "ties", "special"])


def random_values(shape, dtype, seed, kind="normal"):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        values = rng.standard_normal(shape)
    elif kind == "ties":
        values = rng.integers(-2, 3, size=shape).astype(np.float64)
    else:
        choices = np.array([np.nan, -np.inf, np.inf, -1.0, 0.0, 1.0])
        values = rng.choice(choices, size=shape, p=[0.1, 0.2, 0.05, 0.25, 0.2, 0.2])
    return values.astype(dtype)


# ----------------------------------------------------------------------------- oracles


def max_pool_oracle(x, g):
    """Window by window: the valid positions in row-major order, then PyTorch's choice rule."""
    flat_input = x.reshape(g.batch, g.channels, g.height * g.width)
    out = np.empty(g.output_shape, x.dtype)
    argmax = np.empty(g.output_shape, np.int64)
    for oh in range(g.out_height):
        for ow in range(g.out_width):
            rows = [oh * g.sh - g.ph + i * g.dh for i in range(g.kh)]
            cols = [ow * g.sw - g.pw + j * g.dw for j in range(g.kw)]
            flat = np.array(
                [h * g.width + w for h in rows for w in cols if 0 <= h < g.height and 0 <= w < g.width],
                dtype=np.int64,
            )
            if flat.size == 0:  # the window lies wholly in the padding
                out[:, :, oh, ow] = -np.inf
                argmax[:, :, oh, ow] = -1
                continue
            values = flat_input[:, :, flat]
            is_nan = np.isnan(values)
            last_nan = flat.size - 1 - np.argmax(is_nan[..., ::-1], axis=-1)
            first_max = np.argmax(values, axis=-1)  # the first of equal maxima
            choice = np.where(is_nan.any(axis=-1), last_nan, first_max)
            argmax[:, :, oh, ow] = flat[choice]
            out[:, :, oh, ow] = np.take_along_axis(values, choice[..., None], axis=-1)[..., 0]
    return out, argmax


def max_pool_backward_oracle(grad_out, argmax, g):
    plane_count = g.batch * g.channels
    grad_x = np.zeros((plane_count, g.height * g.width), grad_out.dtype)
    indices = argmax.reshape(plane_count, -1)
    planes = np.broadcast_to(np.arange(plane_count)[:, None], indices.shape)
    keep = indices >= 0
    # np.add.at adds unbuffered in row-major order, the order the kernel uses.
    np.add.at(grad_x, (planes[keep], indices[keep]), grad_out.reshape(plane_count, -1)[keep])
    return grad_x.reshape(g.input_shape)


def _avg_divisors(g, count_include_pad):
    """With ceil_mode=False and padding <= kernel/2 a window never passes the padding, so
    PyTorch's pool_size is always kh*kw; otherwise count the real elements in each window."""
    if count_include_pad:
        return np.full((g.out_height, g.out_width), g.kh * g.kw, dtype=np.int64)
    mask = np.pad(np.ones((g.height, g.width), np.int64), ((g.ph, g.ph), (g.pw, g.pw)))
    counts = np.zeros((g.out_height, g.out_width), np.int64)
    for i in range(g.kh):
        for j in range(g.kw):
            counts += mask[geometries.tap_slices(g, i, j)]
    return counts


def avg_pool_oracle(x, g, count_include_pad):
    padded = np.pad(x, ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw)))
    total = np.zeros(g.output_shape, x.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            rows, cols = geometries.tap_slices(g, i, j)
            total += padded[:, :, rows, cols]
    return (total / _avg_divisors(g, count_include_pad)).astype(x.dtype)


def avg_pool_backward_oracle(grad_out, g, count_include_pad):
    divisors = _avg_divisors(g, count_include_pad)
    padded = np.zeros((g.batch, g.channels, g.height + 2 * g.ph, g.width + 2 * g.pw), grad_out.dtype)
    for oh in range(g.out_height):
        for ow in range(g.out_width):
            share = (grad_out[:, :, oh, ow] / divisors[oh, ow]).astype(grad_out.dtype)
            rows = slice(oh * g.sh, oh * g.sh + g.kh)
            cols = slice(ow * g.sw, ow * g.sw + g.kw)
            padded[:, :, rows, cols] += share[:, :, None, None]
    return padded[:, :, g.ph:g.ph + g.height, g.pw:g.pw + g.width].copy()


def avg_tolerance(dtype):
    # Kernel and oracle add the same terms in the same order (the oracle's extra terms are the
    # zeros of the padding), so they agree to the last bit in practice; the tolerance only
    # leaves room for a compiler that contracts or reorders float arithmetic.
    eps = np.finfo(dtype).eps
    return {"rtol": 8 * eps, "atol": 8 * eps}


# Plain checks, shared by the hypothesis tests and the NUMBA_DISABLE_JIT subprocess.


def run_max_pool(x, g):
    return pooling.max_pool2d_forward(x, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw)


def check_max_pool(g, dtype, seed, kind):
    x = random_values(g.input_shape, dtype, seed, kind)
    out, argmax = run_max_pool(x, g)
    expected_out, expected_argmax = max_pool_oracle(x, g)
    assert out.dtype == dtype and argmax.dtype == np.int64
    np.testing.assert_array_equal(out, expected_out)  # NaN matches NaN here
    np.testing.assert_array_equal(argmax, expected_argmax)

    grad_out = random_values(g.output_shape, dtype, seed + 1)
    grad_x = pooling.max_pool2d_backward(grad_out, argmax, g.height, g.width)
    assert grad_x.dtype == dtype
    np.testing.assert_array_equal(grad_x, max_pool_backward_oracle(grad_out, argmax, g))


def _as_bits(values):
    return values.view(f"u{values.itemsize}")


def run_max_pool_loop(x, g, fast_path):
    """The jitted forward loop called directly; empty offsets turn its fast path off."""
    geometry = window_kernels.window_geometry(g.height, g.width, *g.window)
    if fast_path:
        offsets = pooling._window_offsets(g.width, g.kh, g.kw, g.dh, g.dw)
    else:
        offsets = np.empty(0, dtype=np.uintp)
    planes = g.batch * g.channels
    out = np.full((planes, g.out_height * g.out_width), 7.0, x.dtype)
    argmax = np.full(out.shape, -7, np.int64)
    pooling._max_pool2d_forward_fill(x.reshape(planes, -1), out, argmax, offsets, geometry)
    return out.reshape(g.output_shape), argmax.reshape(g.output_shape)


def check_max_pool_fast_path(g, dtype, seed, kind):
    """The fast path for windows inside the input equals the general path bit for bit, and
    every output is the very input element its argmax points at (NaN payloads included)."""
    x = random_values(g.input_shape, dtype, seed, kind)
    fast_out, fast_argmax = run_max_pool_loop(x, g, fast_path=True)
    general_out, general_argmax = run_max_pool_loop(x, g, fast_path=False)
    np.testing.assert_array_equal(_as_bits(fast_out), _as_bits(general_out))
    np.testing.assert_array_equal(fast_argmax, general_argmax)
    planes = x.reshape(g.batch * g.channels, -1)
    chosen = fast_argmax.reshape(g.batch * g.channels, -1)
    inside = chosen >= 0
    picked = np.take_along_axis(planes, np.where(inside, chosen, 0), axis=1)
    np.testing.assert_array_equal(
        _as_bits(fast_out.reshape(chosen.shape))[inside], _as_bits(picked)[inside]
    )


def check_avg_pool(g, dtype, seed, count_include_pad):
    x = random_values(g.input_shape, dtype, seed)
    window = (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, count_include_pad)
    out = pooling.avg_pool2d_forward(x, *window)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, avg_pool_oracle(x, g, count_include_pad), **avg_tolerance(dtype))

    grad_out = random_values(g.output_shape, dtype, seed + 1)
    grad_x = pooling.avg_pool2d_backward(grad_out, g.height, g.width, *window)
    assert grad_x.dtype == dtype
    expected = avg_pool_backward_oracle(grad_out, g, count_include_pad)
    np.testing.assert_allclose(grad_x, expected, **avg_tolerance(dtype))


def check_avg_pool_backward_is_adjoint(g, seed, count_include_pad):
    window = (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, count_include_pad)
    x = random_values(g.input_shape, np.float64, seed)
    grad_out = random_values(g.output_shape, np.float64, seed + 1)
    forward = np.vdot(pooling.avg_pool2d_forward(x, *window), grad_out)
    adjoint = np.vdot(x, pooling.avg_pool2d_backward(grad_out, g.height, g.width, *window))
    np.testing.assert_allclose(forward, adjoint, rtol=1e-12, atol=1e-12)


FIXED_GEOMETRIES = [
    geometries.WindowGeometry(2, 3, 7, 6, 3, 3, 2, 2, 1, 1),
    geometries.WindowGeometry(1, 2, 9, 8, 4, 3, 1, 3, 2, 1, 2, 1),
    geometries.WindowGeometry(1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 2, 2),  # max pool: a window wholly in padding
]


# ----------------------------------------------------------------------------- max pooling


@settings(deadline=None, max_examples=80)
@given(geometry=geometries.window_geometries(), dtype=dtypes, seed=seeds, kind=value_kinds)
def test_max_pool_matches_oracle(geometry, dtype, seed, kind):
    check_max_pool(geometry, dtype, seed, kind)


@settings(deadline=None, max_examples=80)
@given(geometry=geometries.window_geometries(), dtype=dtypes, seed=seeds, kind=value_kinds)
def test_max_pool_fast_path_matches_general_path(geometry, dtype, seed, kind):
    check_max_pool_fast_path(geometry, dtype, seed, kind)


def test_max_pool_keeps_the_bits_of_the_last_nan():
    nan_a = np.array([0x7FC00001], np.uint32).view(np.float32)[0]
    nan_b = np.array([0xFFC00002], np.uint32).view(np.float32)[0]  # negative, other payload
    x = np.array([[[[nan_a, 5.0], [nan_b, np.inf]]]], dtype=np.float32)
    # Output (0, 0) sees all four elements: through the fast path (a 2x2 window inside the
    # input), then through the clipped path (a 3x3 window reaching into the padding).
    for k, padding in ((2, 0), (3, 1)):
        out, argmax = pooling.max_pool2d_forward(x, k, k, 1, 1, padding, padding, 1, 1)
        assert argmax[0, 0, 0, 0] == 2
        assert _as_bits(out)[0, 0, 0, 0] == 0xFFC00002


def test_max_pool_larger_inputs_match_oracle():
    """Beyond the hypothesis sizes: many interior windows, 3x3 and dilated ones included."""
    larger = [
        geometries.WindowGeometry(2, 3, 23, 17, 3, 3, 2, 2, 1, 1),
        geometries.WindowGeometry(1, 2, 20, 21, 2, 2, 2, 2, 0, 0),
        geometries.WindowGeometry(1, 2, 19, 16, 3, 2, 1, 2, 1, 0, 2, 3),
    ]
    for g in larger:
        for dtype in (np.float32, np.float64):
            for kind in ("normal", "ties", "special"):
                check_max_pool(g, dtype, 3, kind)
                check_max_pool_fast_path(g, dtype, 4, kind)


def test_max_pool_ties_pick_the_first_element_in_window_order():
    x = np.zeros((1, 1, 3, 3))
    out, argmax = pooling.max_pool2d_forward(x, 3, 3, 1, 1, 1, 1, 1, 1)
    np.testing.assert_array_equal(out, np.zeros((1, 1, 3, 3)))
    # The first valid element of each window: row max(oh - 1, 0), column max(ow - 1, 0).
    np.testing.assert_array_equal(argmax[0, 0], [[0, 0, 1], [0, 0, 1], [3, 3, 4]])

    x = np.array([[[[1.0, 5.0, 5.0], [5.0, 2.0, 5.0]]]])
    out, argmax = pooling.max_pool2d_forward(x, 2, 3, 1, 1, 0, 0, 1, 1)
    assert out[0, 0, 0, 0] == 5.0 and argmax[0, 0, 0, 0] == 1


def test_max_pool_nan_wins_and_argmax_points_at_the_last_nan():
    nan = np.nan
    x = np.array([[[[1.0, nan, 9.0], [nan, 0.0, 2.0]]]], dtype=np.float32)
    out, argmax = pooling.max_pool2d_forward(x, 2, 2, 1, 1, 0, 0, 1, 1)
    assert np.isnan(out[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == 3  # NaNs at 1 and 3: the last
    assert np.isnan(out[0, 0, 0, 1]) and argmax[0, 0, 0, 1] == 1  # a NaN beats the larger 9
    grad_x = pooling.max_pool2d_backward(np.ones((1, 1, 1, 2), np.float32), argmax, 2, 3)
    np.testing.assert_array_equal(grad_x[0, 0], [[0, 1, 0], [1, 0, 0]])


def test_max_pool_window_of_minus_infinity_picks_its_first_element():
    x = np.full((1, 1, 2, 2), -np.inf)
    out, argmax = pooling.max_pool2d_forward(x, 2, 2, 1, 1, 1, 1, 1, 1)
    assert np.all(out == -np.inf)
    np.testing.assert_array_equal(argmax[0, 0], [[0, 0, 1], [0, 0, 1], [2, 2, 3]])


def test_max_pool_window_wholly_in_padding_gives_minus_infinity_and_no_gradient():
    x = np.array([[[[7.0]]]])
    out, argmax = pooling.max_pool2d_forward(x, 2, 2, 1, 1, 1, 1, 2, 2)  # taps at -1 and 1
    assert out.shape == (1, 1, 1, 1) and out[0, 0, 0, 0] == -np.inf and argmax[0, 0, 0, 0] == -1
    grad_x = pooling.max_pool2d_backward(np.ones_like(out), argmax, 1, 1)
    np.testing.assert_array_equal(grad_x, np.zeros((1, 1, 1, 1)))


def test_max_pool_backward_adds_gradients_of_overlapping_windows():
    x = np.array([[[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]])
    out, argmax = pooling.max_pool2d_forward(x, 2, 2, 1, 1, 0, 0, 1, 1)
    np.testing.assert_array_equal(argmax[0, 0], [[1, 1]])
    grad_x = pooling.max_pool2d_backward(np.array([[[[2.0, 3.0]]]]), argmax, 2, 3)
    np.testing.assert_array_equal(grad_x[0, 0], [[0, 5, 0], [0, 0, 0]])


# ----------------------------------------------------------------------------- average pooling


@settings(deadline=None, max_examples=60)
@given(geometry=geometries.window_geometries(dilated=False), dtype=dtypes, seed=seeds,
       count_include_pad=st.booleans())
def test_avg_pool_matches_oracle(geometry, dtype, seed, count_include_pad):
    check_avg_pool(geometry, dtype, seed, count_include_pad)


@settings(deadline=None, max_examples=40)
@given(geometry=geometries.window_geometries(dilated=False), seed=st.integers(0, 2**31),
       count_include_pad=st.booleans())
def test_avg_pool_backward_is_adjoint_of_forward(geometry, seed, count_include_pad):
    check_avg_pool_backward_is_adjoint(geometry, seed, count_include_pad)


def test_avg_pool_divisor_with_and_without_padding():
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    with_pad = pooling.avg_pool2d_forward(x, 2, 2, 2, 2, 1, 1, True)
    without_pad = pooling.avg_pool2d_forward(x, 2, 2, 2, 2, 1, 1, False)
    # Windows: {1}, {2, 3}, {4, 7}, {5, 6, 8, 9}.
    np.testing.assert_array_equal(with_pad[0, 0], [[1 / 4, 5 / 4], [11 / 4, 28 / 4]])
    np.testing.assert_array_equal(without_pad[0, 0], [[1.0, 5 / 2], [11 / 2, 28 / 4]])


def test_avg_pool_sums_in_the_input_dtype():
    # float32 accumulation as in PyTorch's CPU kernel: 2**24 + 1 rounds back to 2**24.
    x = np.array([[[[2.0**24, 1.0, 1.0, -(2.0**24)]]]], dtype=np.float32)
    out = pooling.avg_pool2d_forward(x, 1, 4, 1, 1, 0, 0, True)
    assert out.dtype == np.float32 and out[0, 0, 0, 0] == 0.0


# ----------------------------------------------------------------------------- all kernels


def test_kernels_leave_their_inputs_alone():
    g = FIXED_GEOMETRIES[0]
    x = random_values(g.input_shape, np.float32, 0)
    grad_out = random_values(g.output_shape, np.float32, 1)
    x_before, grad_before = x.copy(), grad_out.copy()
    _, argmax = run_max_pool(x, g)
    argmax_before = argmax.copy()
    pooling.max_pool2d_backward(grad_out, argmax, g.height, g.width)
    pooling.avg_pool2d_forward(x, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, True)
    pooling.avg_pool2d_backward(grad_out, g.height, g.width, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, True)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(grad_out, grad_before)
    np.testing.assert_array_equal(argmax, argmax_before)


def test_docstring_examples():
    assert doctest.testmod(pooling).failed == 0


def test_kernels_run_as_plain_python_without_jit(run_without_jit):
    run_without_jit(__file__, """
        kernels = tests.pooling
        assert_plain_python(
            kernels._max_pool2d_forward_fill,
            kernels._max_pool2d_backward_scatter,
            kernels._avg_pool2d_forward_fill,
            kernels._avg_pool2d_backward_scatter,
            kernels._window_offsets,
            kernels._average_divisor,
        )
        for geometry in tests.FIXED_GEOMETRIES:
            for dtype in (np.float32, np.float64):
                tests.check_max_pool(geometry, dtype, 21, "special")
                tests.check_max_pool_fast_path(geometry, dtype, 25, "special")
        for geometry in tests.FIXED_GEOMETRIES[:1]:
            for dtype in (np.float32, np.float64):
                tests.check_avg_pool(geometry, dtype, 22, True)
                tests.check_avg_pool(geometry, dtype, 23, False)
            tests.check_avg_pool_backward_is_adjoint(geometry, 24, False)
    """)
