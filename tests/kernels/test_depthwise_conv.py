"""qatcore.kernels.depthwise_conv against NumPy oracles: forward, input gradient, weight gradient.

The oracles pad the input and read each tap (u, v) as one strided slice, in float64; a kernel
result must lie within the rounding bound of its summation order from the oracle's value. The
bound is taken from the same oracle applied to absolute values (the sum of |terms|).
"""

import doctest
import importlib.util
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.kernels import depthwise_conv as depthwise_kernels
from qatcore.kernels import layout
from qatcore.models.mobilenet_v2 import MOBILENET_V2_CIFAR_STAGES

_spec = importlib.util.spec_from_file_location("kernel_geometries", Path(__file__).with_name("geometries.py"))
geometries = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(geometries)

WindowGeometry = geometries.WindowGeometry
dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------- oracles


def _padded(x, g):
    return np.pad(x.astype(np.float64), ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw)))


def forward_oracle(x, weight, bias, geometry):
    """bias[c] + sum over taps of w[c, 0, u, v] * (the tap's slice of the padded x), in float64."""
    g = geometry
    padded = _padded(x, g)
    out = np.broadcast_to(bias.astype(np.float64)[None, :, None, None], g.output_shape).copy()
    for u in range(g.kh):
        for v in range(g.kw):
            rows, columns = geometries.tap_slices(g, u, v)
            out += weight[None, :, 0, u, v, None, None].astype(np.float64) * padded[:, :, rows, columns]
    return out


def input_grad_oracle(grad, weight, geometry):
    """Scatter-add each tap's weighted gradient into a zero-padded input, then crop, in float64."""
    g = geometry
    padded = np.zeros((g.batch, g.channels, g.height + 2 * g.ph, g.width + 2 * g.pw))
    for u in range(g.kh):
        for v in range(g.kw):
            rows, columns = geometries.tap_slices(g, u, v)
            # for a fixed tap the positions are distinct, so += is a true scatter-add
            padded[:, :, rows, columns] += weight[None, :, 0, u, v, None, None].astype(np.float64) * grad
    return padded[:, :, g.ph:g.ph + g.height, g.pw:g.pw + g.width]


def weight_grad_oracle(grad, x, geometry):
    """dw[c, 0, u, v] = sum over n, i, j of g * (the tap's slice of the padded x), in float64."""
    g = geometry
    padded = _padded(x, g)
    dw = np.empty((g.channels, 1, g.kh, g.kw))
    for u in range(g.kh):
        for v in range(g.kw):
            rows, columns = geometries.tap_slices(g, u, v)
            dw[:, 0, u, v] = np.einsum("nchw,nchw->c", grad.astype(np.float64), padded[:, :, rows, columns])
    return dw


# ----------------------------------------------------------------------------- checks


def random_case(geometry, dtype, seed):
    """(x, weight, bias, grad) of the geometry, standard normal, in dtype."""
    g = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.input_shape).astype(dtype)
    weight = rng.standard_normal((g.channels, 1, g.kh, g.kw)).astype(dtype)
    bias = rng.standard_normal(g.channels).astype(dtype)
    grad = rng.standard_normal(g.output_shape).astype(dtype)
    return x, weight, bias, grad


def assert_within_rounding(result, exact, magnitude, terms, dtype):
    """|result - exact| <= terms * eps * magnitude + half an ulp of exact: a recursive sum of
    ``terms`` terms in dtype (``magnitude`` = the sum of their absolute values), rounded once."""
    eps = np.finfo(dtype).eps
    bound = terms * eps * magnitude + eps / 2 * np.abs(exact) + np.finfo(dtype).tiny
    error = np.abs(result.astype(np.float64) - exact)
    assert result.dtype == dtype
    assert result.shape == exact.shape
    assert np.all(error <= bound), (error - bound).max()


def check_forward(geometry, dtype, seed):
    g = geometry
    x, weight, bias, _ = random_case(g, dtype, seed)
    out = depthwise_kernels.depthwise_conv2d_forward(x, weight, bias, *g.window[2:])
    magnitude = forward_oracle(np.abs(x), np.abs(weight), np.abs(bias), g)
    assert_within_rounding(out, forward_oracle(x, weight, bias, g), magnitude, g.kh * g.kw + 1, dtype)


def check_input_grad(geometry, dtype, seed):
    g = geometry
    _, weight, _, grad = random_case(g, dtype, seed)
    x_grad = depthwise_kernels.depthwise_conv2d_input_grad(grad, weight, g.height, g.width, *g.window[2:])
    magnitude = input_grad_oracle(np.abs(grad), np.abs(weight), g)
    # an input element receives at most one term from each tap (u, v)
    assert_within_rounding(x_grad, input_grad_oracle(grad, weight, g), magnitude, g.kh * g.kw, dtype)


def check_weight_grad(geometry, dtype, seed):
    """Summed in float64: the only float64 error is far below the final rounding to dtype."""
    g = geometry
    x, _, _, grad = random_case(g, dtype, seed)
    weight_grad = depthwise_kernels.depthwise_conv2d_weight_grad(grad, x, *g.window)
    magnitude = weight_grad_oracle(np.abs(grad), np.abs(x), g)
    terms = g.batch * g.out_height * g.out_width
    exact = weight_grad_oracle(grad, x, g)
    eps64 = np.finfo(np.float64).eps
    error = np.abs(weight_grad.astype(np.float64) - exact)
    assert weight_grad.dtype == dtype and weight_grad.shape == exact.shape
    bound = 2 * terms * eps64 * magnitude + np.finfo(dtype).eps / 2 * np.abs(exact)
    assert np.all(error <= bound), (error - bound).max()


def check_adjoint(geometry, seed):
    """<forward(x) - bias, g> == <x, dx(g)> == <w, dw(g, x)>: the three are one trilinear sum."""
    g = geometry
    x, weight, bias, grad = random_case(g, np.float64, seed)
    out = depthwise_kernels.depthwise_conv2d_forward(x, weight, np.zeros_like(bias), *g.window[2:])
    x_grad = depthwise_kernels.depthwise_conv2d_input_grad(grad, weight, g.height, g.width, *g.window[2:])
    weight_grad = depthwise_kernels.depthwise_conv2d_weight_grad(grad, x, *g.window)
    forward = np.vdot(out, grad)
    np.testing.assert_allclose(np.vdot(x, x_grad), forward, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.vdot(weight, weight_grad), forward, rtol=1e-10, atol=1e-10)


def check_channel_major(geometry, dtype, seed):
    """Channel-major arrays (kernels.layout) give the same bits, in their own layout: every
    plane is computed alone, and dw sums each channel's samples in the same order."""
    g = geometry
    x, weight, bias, grad = random_case(g, dtype, seed)
    swapped = [np.ascontiguousarray(a.swapaxes(0, 1)).swapaxes(0, 1) for a in (x, grad)]
    for (xs, gs) in [swapped, (swapped[0], grad), (x, swapped[1])]:
        out = depthwise_kernels.depthwise_conv2d_forward(xs, weight, bias, *g.window[2:])
        x_grad = depthwise_kernels.depthwise_conv2d_input_grad(gs, weight, g.height, g.width, *g.window[2:])
        np.testing.assert_array_equal(out, depthwise_kernels.depthwise_conv2d_forward(x, weight, bias, *g.window[2:]))
        np.testing.assert_array_equal(x_grad, depthwise_kernels.depthwise_conv2d_input_grad(
            grad, weight, g.height, g.width, *g.window[2:]))
        np.testing.assert_array_equal(depthwise_kernels.depthwise_conv2d_weight_grad(gs, xs, *g.window),
                                      depthwise_kernels.depthwise_conv2d_weight_grad(grad, x, *g.window))
        if g.batch > 1:
            assert layout.is_channel_major(out) == layout.is_channel_major(xs)
            assert layout.is_channel_major(x_grad) == layout.is_channel_major(gs)


def check_all(geometry, dtype, seed):
    check_forward(geometry, dtype, seed)
    check_input_grad(geometry, dtype, seed)
    check_weight_grad(geometry, dtype, seed)
    check_channel_major(geometry, dtype, seed)


def run_public(geometry, dtype, seed):
    """(out, dx, dw) of the three public functions on random_case."""
    g = geometry
    x, weight, bias, grad = random_case(g, dtype, seed)
    return (depthwise_kernels.depthwise_conv2d_forward(x, weight, bias, *g.window[2:]),
            depthwise_kernels.depthwise_conv2d_input_grad(grad, weight, g.height, g.width, *g.window[2:]),
            depthwise_kernels.depthwise_conv2d_weight_grad(grad, x, *g.window))


def check_drivers_agree(geometry, dtype, seed):
    """The serial driver and the parallel one with a few numbers of tasks give the same bits."""
    saved = depthwise_kernels.PARALLEL_MIN_MACS, depthwise_kernels._TASKS_PER_THREAD
    results = []
    try:
        for threshold, tasks_per_thread in ((1 << 62, 1), (0, 1), (0, 3)):
            depthwise_kernels.PARALLEL_MIN_MACS, depthwise_kernels._TASKS_PER_THREAD = threshold, tasks_per_thread
            results.append([a.view(f"u{a.itemsize}") for a in run_public(geometry, dtype, seed)])
    finally:
        depthwise_kernels.PARALLEL_MIN_MACS, depthwise_kernels._TASKS_PER_THREAD = saved
    for other in results[1:]:
        for serial, parallel in zip(results[0], other):
            np.testing.assert_array_equal(serial, parallel)


def mobilenet_v2_depthwise_geometries(batch=2):
    """The 3x3 depthwise layers of qatcore.models.MobileNetV2 on 32x32 inputs, from its stage table."""
    layers, channels, size = [], 32, 32
    for expansion, out_channels, blocks, first_stride in MOBILENET_V2_CIFAR_STAGES:
        for block in range(blocks):
            stride = first_stride if block == 0 else 1
            layers.append(WindowGeometry(batch, channels * expansion, size, size, 3, 3, stride, stride, 1, 1))
            size = geometries.output_size(size, 3, stride, 1, 1)
            channels = out_channels
    return sorted(set(layers))


MOBILENET_V2_GEOMETRIES = mobilenet_v2_depthwise_geometries()

ODD_GEOMETRIES = [
    WindowGeometry(2, 3, 1, 1, 3, 3, 1, 1, 1, 1),  # 1x1 input: only the centre tap reads inside
    WindowGeometry(1, 2, 2, 3, 5, 5, 1, 1, 2, 2),  # kernel larger than the input, padding 2
    WindowGeometry(2, 3, 9, 8, 3, 3, 1, 1, 2, 2, 2, 2),  # dilation 2
    WindowGeometry(1, 4, 9, 7, 3, 3, 2, 2, 2, 2, 2, 2),  # dilation 2, stride 2
    WindowGeometry(2, 2, 6, 5, 3, 2, 2, 3, 1, 0, 1, 2),  # different strides, paddings, dilations per axis
    WindowGeometry(3, 5, 4, 4, 1, 1, 1, 1, 0, 0),  # 1x1 kernel
]


# ----------------------------------------------------------------------------- tests


@settings(deadline=None, max_examples=60)
@given(geometry=st.one_of(
    geometries.window_geometries(),
    # MobileNetV2's layers with 1-3 samples and 1-8 of their channels
    st.builds(lambda g, batch, channels: g._replace(batch=batch, channels=channels),
              st.sampled_from(MOBILENET_V2_GEOMETRIES), st.integers(1, 3), st.integers(1, 8)),
), dtype=dtypes, seed=seeds)
def test_kernels_match_oracles(geometry, dtype, seed):
    check_all(geometry, dtype, seed)


@settings(deadline=None, max_examples=30)
@given(geometry=geometries.window_geometries(max_size=40), dtype=dtypes, seed=seeds)
def test_kernels_match_oracles_on_wide_inputs(geometry, dtype, seed):
    check_all(geometry, dtype, seed)


@settings(deadline=None, max_examples=30)
@given(geometry=geometries.window_geometries(), seed=st.integers(0, 2**31))
def test_gradients_are_adjoints_of_the_forward(geometry, seed):
    check_adjoint(geometry, seed)


def test_mobilenet_v2_table_gives_its_depthwise_layers():
    shapes = {(g.channels, g.height, g.sh) for g in MOBILENET_V2_GEOMETRIES}
    assert (32, 32, 1) in shapes and (144, 32, 2) in shapes and (960, 4, 1) in shapes
    assert len(shapes) == 10


@pytest.mark.parametrize("geometry", MOBILENET_V2_GEOMETRIES, ids=lambda g: f"C{g.channels}-{g.height}-s{g.sh}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mobilenet_v2_layers_match_oracles(geometry, dtype):
    check_all(geometry, dtype, 3)


@pytest.mark.parametrize("geometry", ODD_GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_odd_geometries_match_oracles(geometry, dtype):
    check_all(geometry, dtype, 4)
    check_adjoint(geometry, 5)


@pytest.mark.parametrize("geometry", [MOBILENET_V2_GEOMETRIES[0], ODD_GEOMETRIES[3]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_and_parallel_drivers_agree(geometry, dtype):
    check_drivers_agree(geometry, dtype, 6)


def test_public_functions_choose_the_parallel_driver_by_work():
    assert depthwise_kernels._tasks(10**6, depthwise_kernels.PARALLEL_MIN_MACS - 1) == 1
    parallel_tasks = depthwise_kernels._TASKS_PER_THREAD * numba.get_num_threads()
    assert depthwise_kernels._tasks(10**6, depthwise_kernels.PARALLEL_MIN_MACS) == parallel_tasks
    assert depthwise_kernels._tasks(2, depthwise_kernels.PARALLEL_MIN_MACS) == min(2, parallel_tasks)


@pytest.mark.parametrize("geometry", MOBILENET_V2_GEOMETRIES[:2] + ODD_GEOMETRIES)
def test_layout_reads_each_valid_tap_from_its_place_in_the_phase_buffer(geometry):
    """Grid point (i, j < OW) of tap (u, v) reads the buffer where _pad_plane put padded element
    (i*sh + u*dh, j*sw + v*dw), and no grid point reads past the buffer."""
    g = geometry
    layout = depthwise_kernels._Layout(g.height, g.width, *g.window)
    loop = layout.loop
    assert loop[8:10] == (g.out_height, g.out_width)
    phase_width = loop[7]
    assert layout.grid_length + int(layout.offsets.max()) <= layout.buffer_length
    # a plane holding its own padded (row, column) codes, padding included, laid out by the kernel
    padded_width = g.width + 2 * g.pw
    codes = np.arange((g.height + 2 * g.ph) * padded_width, dtype=np.float64).reshape(-1, padded_width) + 1
    buffer = np.zeros((1, layout.buffer_length))
    depthwise_kernels._pad_plane(codes[g.ph:g.ph + g.height, g.pw:g.pw + g.width].reshape(1, -1).copy(),
                                 0, buffer, 0, loop)
    for u in range(g.kh):
        for v in range(g.kw):
            for i in range(g.out_height):
                for j in range(g.out_width):
                    row, column = i * g.sh + u * g.dh, j * g.sw + v * g.dw
                    inside = g.ph <= row < g.ph + g.height and g.pw <= column < g.pw + g.width
                    expected = codes[row, column] if inside else 0.0
                    assert buffer[0, i * phase_width + j + int(layout.offsets[u * g.kw + v])] == expected


def test_kernels_leave_their_inputs_alone():
    g = ODD_GEOMETRIES[3]
    arrays = random_case(g, np.float32, 7)
    before = [a.copy() for a in arrays]
    x, weight, bias, grad = arrays
    depthwise_kernels.depthwise_conv2d_forward(x, weight, bias, *g.window[2:])
    depthwise_kernels.depthwise_conv2d_input_grad(grad, weight, g.height, g.width, *g.window[2:])
    depthwise_kernels.depthwise_conv2d_weight_grad(grad, x, *g.window)
    for after, original in zip(arrays, before):
        np.testing.assert_array_equal(after, original)


def test_docstring_examples():
    assert doctest.testmod(depthwise_kernels).failed == 0


def test_kernels_run_as_plain_python_without_jit(run_without_jit):
    run_without_jit(__file__, """
        kernels = tests.depthwise_kernels
        assert_plain_python(
            kernels._phase_runs,
            kernels._pad_plane,
            kernels._unpad_plane,
            kernels._grid_plane,
            kernels._forward_plane,
            kernels._input_grad_plane,
            kernels._weight_grad_channel,
            kernels._forward_serial,
            kernels._input_grad_serial,
            kernels._weight_grad_serial,
            kernels._forward_parallel,
            kernels._input_grad_parallel,
            kernels._weight_grad_parallel,
        )
        for geometry in tests.ODD_GEOMETRIES:
            for dtype in (np.float32, np.float64):
                tests.check_all(geometry, dtype, 11)
                tests.check_drivers_agree(geometry, dtype, 12)
            tests.check_adjoint(geometry, 13)
        small = tests.WindowGeometry(1, 3, 6, 6, 3, 3, 2, 2, 1, 1)  # a MobileNetV2 layer, fewer channels
        tests.check_all(small, np.float32, 14)
    """)
