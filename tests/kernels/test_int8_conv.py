"""qatcore.kernels.int8_conv against a direct int64 NumPy oracle (padding read as the input's
zero point), bit for bit, compiled and as plain Python. The requantization oracle is the one
of test_int8_gemm.py."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.errors import ConfigError, DTypeError, ShapeError
from qatcore.kernels import int8_conv as conv
from qatcore.kernels import int8_conv_lanes as conv_lanes
from qatcore.kernels import int8_gemm as gemm
from qatcore.kernels import requantize as rq

_spec = importlib.util.spec_from_file_location("int8_gemm_oracle", Path(__file__).with_name("test_int8_gemm.py"))
gemm_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemm_tests)
_spec = importlib.util.spec_from_file_location("kernel_geometries", Path(__file__).with_name("geometries.py"))
geometries = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(geometries)

# ----------------------------------------------------------------------------------------
# The oracle


def oracle_conv_int32(x, x_zero_point, w, stride, padding, dilation, groups):
    """acc[n, k, oh, ow] = sum_{c,u,v} (xpad[n, g*Cg + c, oh*sh + u*dh, ow*sw + v*dw] - z_x) * w[k, c, u, v]
    in int64, where xpad is x padded with z_x (real 0) and g is output channel k's group."""
    (batch, channels, height, width), (out_channels, group_channels, kh, kw) = x.shape, w.shape
    geometry = geometries.WindowGeometry(batch, channels, height, width, kh, kw, *stride, *padding, *dilation)
    ph, pw = padding
    padded = np.full((batch, channels, height + 2 * ph, width + 2 * pw), x_zero_point, np.int64)
    padded[:, :, ph:ph + height, pw:pw + width] = x
    centred = padded - x_zero_point
    acc = np.zeros((batch, out_channels, geometry.out_height, geometry.out_width), np.int64)
    group_out = out_channels // groups
    for k in range(out_channels):
        g = k // group_out
        for u in range(kh):
            for v in range(kw):
                rows, cols = geometries.tap_slices(geometry, u, v)
                window = centred[:, g * group_channels:(g + 1) * group_channels, rows, cols]
                acc[:, k] += np.einsum("nchw,c->nhw", window, w[k, :, u, v].astype(np.int64))
    return acc


def oracle_conv(x, x_zero_point, w, bias, multiplier, shift, out_zero_point, clamp_min, clamp_max, out_dtype, stride,
                padding, dilation, groups):
    acc = oracle_conv_int32(x, x_zero_point, w, stride, padding, dilation, groups)
    if bias is not None:
        acc += bias.astype(np.int64)[None, :, None, None]
    per_channel = (slice(None), None, None)
    y = gemm_tests.oracle_requantize(acc, multiplier[per_channel], shift[per_channel], out_zero_point, clamp_min,
                                     clamp_max)
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------------------
# Generated cases


class Case:
    """One convolution: operands, requantization and geometry, drawn from a seed."""

    def __init__(self, batch, channels, out_per_group, groups, size, kernel, stride, padding, dilation, x_dtype,
                 out_dtype, fill, multiplier_range, relu, seed):
        rng = np.random.default_rng(seed)
        (height, width), (kh, kw) = size, kernel
        rows = batch * height * width
        x, self.x_zero_point, _ = gemm_tests.random_operands(rng, rows, 1, channels * groups, x_dtype, fill)
        self.x = np.ascontiguousarray(x.reshape(batch, height, width, channels * groups).transpose(0, 3, 1, 2))
        out_channels = out_per_group * groups
        if fill == "uniform":
            self.w = rng.integers(-128, 127, (out_channels, channels, kh, kw), endpoint=True).astype(np.int8)
        else:
            self.w = np.full((out_channels, channels, kh, kw), -128, np.int8)
        self.bias, self.multiplier, self.shift = gemm_tests.random_requantization(rng, out_channels,
                                                                                  multiplier_range)
        self.out_zero_point, self.clamp_min, self.clamp_max = gemm_tests.output_range(rng, out_dtype, relu)
        self.out_dtype = out_dtype
        self.geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def requantization(self):
        return (self.bias, self.multiplier, self.shift, self.out_zero_point, self.clamp_min, self.clamp_max,
                self.out_dtype)

    def check(self, weights=None):
        pairs = {k: (v, v) if isinstance(v, int) and k != "groups" else v for k, v in self.geometry.items()}
        expected = oracle_conv(self.x, self.x_zero_point, self.w, *self.requantization(), pairs["stride"],
                               pairs["padding"], pairs["dilation"], pairs["groups"])
        y = conv.int8_conv2d(self.x, self.x_zero_point, self.w if weights is None else weights,
                             *self.requantization(), **self.geometry)
        gemm_tests.assert_same(y, expected, self.out_dtype)
        return y


@st.composite
def cases(draw, max_size=7):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    height = draw(geometries.input_sizes(kh, ph, dh, max_size))
    width = draw(geometries.input_sizes(kw, pw, dw, max_size))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups > 1
    channels = 1 if depthwise else draw(st.integers(1, 5) | st.sampled_from([16, 17]))
    out_per_group = 1 if depthwise else draw(st.integers(1, 6))
    stride = draw(st.integers(1, 3) | st.tuples(st.integers(1, 3), st.integers(1, 3)))
    return Case(draw(st.integers(1, 2)), channels, out_per_group, groups, (height, width), (kh, kw), stride,
                (ph, pw), (dh, dw), draw(st.sampled_from([np.uint8, np.int8])),
                draw(st.sampled_from([np.uint8, np.int8])), draw(st.sampled_from(["uniform", "uniform", "x_min"])),
                draw(st.sampled_from(["small", "any", "large"])), draw(st.booleans()),
                draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=60)
@given(cases())
def test_matches_oracle(case):
    case.check()


@pytest.mark.parametrize("groups, channels, out_per_group", [(1, 8, 12), (4, 2, 3), (6, 1, 1)])
def test_pointwise_reads_the_input_directly(groups, channels, out_per_group):
    """1x1, stride 1, no padding skips the gather; with and without groups, and packed weights."""
    case = Case(2, channels, out_per_group, groups, (5, 3), (1, 1), 1, 0, 1, np.uint8, np.uint8, "uniform", "any",
                False, 11)
    y = case.check()
    np.testing.assert_array_equal(case.check(gemm.pack_weights(case.w)), y)


def test_depthwise_with_multiplier_channels():
    """groups == C with two output channels per group (depth multiplier 2), 3x3, stride 2."""
    Case(2, 1, 2, 5, (9, 8), (3, 3), 2, 1, 1, np.int8, np.int8, "uniform", "small", True, 12).check()


def test_padding_reads_the_zero_point():
    """An input that is all z_x (real 0) gives requantize(bias) everywhere, padding included."""
    x = np.full((1, 3, 4, 4), 77, np.uint8)
    w = np.random.default_rng(0).integers(-128, 127, (2, 3, 3, 3), endpoint=True).astype(np.int8)
    bias = np.array([1000, -1000], np.int32)
    m0, shift = rq.quantize_multiplier(np.array([0.01, 0.02]))
    y = conv.int8_conv2d(x, 77, w, bias, m0, shift, 10, 0, 255, np.uint8, padding=2, dilation=2)
    assert y.shape == (1, 2, 4, 4)
    assert (y[0, 0] == 20).all() and (y[0, 1] == 0).all()  # 10 + 1000 * 0.01, 10 - 1000 * 0.02 -> 0


def test_parallel_and_serial_drivers_agree(monkeypatch):
    case = Case(3, 5, 7, 1, (12, 11), (3, 3), 1, 1, 1, np.uint8, np.uint8, "uniform", "any", False, 13)
    monkeypatch.setattr(conv, "_L2_BLOCK_BYTES", 45 * 16)  # 16-pixel blocks: several tasks an image
    results = []
    for threshold in (0, 2**62):
        monkeypatch.setattr(conv, "PARALLEL_MIN_MACS", threshold)
        results.append(case.check())
    np.testing.assert_array_equal(*results)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(groups=2), ConfigError, "groups"),
    (dict(groups=0), ConfigError, "groups"),
    (dict(w_q=np.zeros((4, 2, 3, 3), np.int8)), ShapeError, "channels"),
    (dict(w_q=np.zeros((4, 3, 7, 3), np.int8)), ShapeError, "does not fit"),
    (dict(x_q=np.zeros((3, 5, 5), np.uint8)), ShapeError, "N, C, H, W"),
    (dict(w_q=np.zeros((4, 3), np.int8)), ShapeError, "4 dimensions"),
    (dict(stride=0), ConfigError, "stride"),
    (dict(padding=(1, -1)), ConfigError, "padding"),
    (dict(dilation=(1, 2, 3)), ConfigError, "dilation"),
])
def test_invalid_arguments_are_refused(kwargs, error, match):
    args = dict(x_q=np.zeros((1, 3, 5, 5), np.uint8), x_zero_point=0, w_q=np.zeros((4, 3, 3, 3), np.int8),
                bias_q=None, multiplier=np.full(4, 2**30, np.int32), shift=np.zeros(4, np.int32), out_zero_point=0,
                clamp_min=0, clamp_max=255, out_dtype=np.uint8)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        conv.int8_conv2d(**args)


@pytest.mark.parametrize("x_dtype, kernel", [(np.uint8, (3, 3)), (np.int8, (3, 3)), (np.uint8, (1, 1)),
                                             (np.int8, (1, 2))])
def test_a_plan_runs_many_inputs_like_int8_conv2d(x_dtype, kernel):
    """plan_conv2d once, run_conv2d on several inputs: the same bits as int8_conv2d each time
    (GEMM, pointwise and short-depth paths), and inputs of another shape or dtype are refused."""
    case = Case(2, 3, 4, 1, (6, 5), kernel, 1, 0 if kernel == (1, 1) else 1, 1, x_dtype, np.uint8, "uniform", "any",
                True, 15)
    plan = conv.plan_conv2d(case.x.shape, case.x.dtype, case.x_zero_point, case.w, *case.requantization(),
                            **case.geometry)
    rng = np.random.default_rng(3)
    for _ in range(3):
        case.x = rng.integers(np.iinfo(x_dtype).min, np.iinfo(x_dtype).max, case.x.shape, endpoint=True).astype(x_dtype)
        gemm_tests.assert_same(conv.run_conv2d(plan, case.x), case.check(), case.out_dtype)
    with pytest.raises(ShapeError, match="shape"):
        conv.run_conv2d(plan, case.x[:1])
    with pytest.raises(DTypeError, match="activations"):
        conv.run_conv2d(plan, case.x.view(np.int8 if x_dtype == np.uint8 else np.uint8))


def test_depth_beyond_the_bound_is_refused():
    channels = gemm.MAX_DEPTH // 9 + 1  # C * 3 * 3 > MAX_DEPTH
    with pytest.raises(ValueError, match="MAX_DEPTH"):
        conv.int8_conv2d(np.zeros((1, channels, 3, 3), np.uint8), 0, np.zeros((1, channels, 3, 3), np.int8), None,
                         np.full(1, 2**30, np.int32), np.zeros(1, np.int32), 0, 0, 255, np.uint8)


def test_empty_batch_and_inputs_left_alone():
    case = Case(1, 3, 2, 1, (4, 5), (3, 3), 1, 1, 1, np.int8, np.uint8, "uniform", "any", False, 14)
    before = [a.copy() for a in (case.x, case.w, case.bias, case.multiplier, case.shift)]
    case.check()
    for a, b in zip((case.x, case.w, case.bias, case.multiplier, case.shift), before):
        np.testing.assert_array_equal(a, b)
    y = conv.int8_conv2d(case.x[:0], case.x_zero_point, case.w, *case.requantization(), padding=1)
    assert y.shape == (0, 2, 4, 5) and y.dtype == np.uint8


@pytest.mark.parametrize("direct_max_depth", [0, 16, 10_000])
@pytest.mark.parametrize("parallel", [False, True])
def test_direct_and_gemm_paths_agree_across_pixel_blocks(monkeypatch, direct_max_depth, parallel):
    """Short depths (C/groups * kh * kw <= DIRECT_MAX_DEPTH) sum along the pixels of im2col's
    columns instead of through the GEMM tiles; forcing either path gives the oracle's result,
    also when an image's pixels are split into blocks that start mid-row (p0 not a multiple of
    OW). Moderate multipliers and biases keep every input pixel visible in the output."""
    monkeypatch.setattr(conv, "DIRECT_MAX_DEPTH", direct_max_depth)
    monkeypatch.setattr(conv, "_MAX_PIXEL_BLOCK", 12)  # 12-pixel blocks on both paths
    monkeypatch.setattr(conv, "PARALLEL_MIN_MACS", 0 if parallel else 2**62)
    rng = np.random.default_rng(21)
    for x_dtype, channels, groups, kernel, geometry in [
        (np.uint8, 1, 1, (3, 3), dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))),  # depth 9
        (np.int8, 4, 2, (2, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),  # depth 8, grouped
        (np.uint8, 3, 1, (3, 3), dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))),  # depth 27
    ]:
        info = np.iinfo(x_dtype)
        x = rng.integers(info.min, info.max, (3, channels, 9, 11), endpoint=True).astype(x_dtype)
        out_channels = 6
        w = rng.integers(-127, 127, (out_channels, channels // groups, *kernel), endpoint=True).astype(np.int8)
        bias = rng.integers(-200, 200, out_channels).astype(np.int32)
        m0, shift = rq.quantize_multiplier(np.full(out_channels, 1 / 96))
        args = (bias, m0, shift, 128, 0, 255, np.uint8)
        x_zero_point = int(rng.integers(info.min, info.max))
        expected = oracle_conv(x, x_zero_point, w, *args, geometry["stride"], geometry["padding"],
                               geometry["dilation"], groups)
        assert len(np.unique(expected)) > 50  # sensitive to every input value
        y = conv.int8_conv2d(x, x_zero_point, w, *args, groups=groups, **geometry)
        gemm_tests.assert_same(y, expected, np.uint8)


LANE_CASES = [  # (batch, C, K, size, kernel, stride, padding, dilation, x dtype, out dtype, relu)
    (3, 16, 16, (9, 11), (3, 3), 1, 1, 1, np.uint8, np.uint8, True),  # ResNet-20's stage 1, small
    (2, 3, 16, (8, 8), (3, 3), 1, 1, 1, np.int8, np.uint8, False),  # C = 3: padded to 4 channels
    (2, 8, 13, (7, 6), (3, 2), (2, 1), (1, 0), (1, 2), np.uint8, np.int8, False),  # K not a multiple of 8
    (2, 12, 20, (5, 5), (1, 1), 1, 0, 1, np.int8, np.int8, True),  # 1x1, stride 1
    (1, 18, 9, (6, 7), (1, 1), 2, 0, 1, np.uint8, np.uint8, False),  # 1x1, stride 2, C = 18
    (2, 4, 8, (5, 6), (3, 3), 2, (2, 0), 1, np.uint8, np.uint8, False),  # taps wholly in the padding
]


def check_lane_case(index, lanes, pixel_block=None, planes=True):
    batch, channels, out_channels, size, kernel, stride, padding, dilation, x_dtype, out_dtype, relu = \
        LANE_CASES[index]
    case = Case(batch, channels, out_channels, 1, size, kernel, stride, padding, dilation, x_dtype, out_dtype,
                "uniform", "small", relu, 40 + index)
    conv.LANES, conv.PLANES = lanes, planes
    if pixel_block is not None:
        conv._MAX_PIXEL_BLOCK = pixel_block
    plan = conv.plan_conv2d(case.x.shape, case.x.dtype, case.x_zero_point, case.w, *case.requantization(),
                            **case.geometry)
    stride_1 = stride in (1, (1, 1))
    assert plan.path == ("gather" if not lanes else "planes" if planes and stride_1 else "lanes")
    if lanes:  # weights padded to whole tiles of output channels
        assert plan.arguments[0].shape[0] % conv_lanes.TILE_CHANNELS == 0
    gemm_tests.assert_same(conv.run_conv2d(plan, case.x), case.check(), out_dtype)


@pytest.mark.parametrize("index", range(len(LANE_CASES)))
@pytest.mark.parametrize("lanes, planes, pixel_block, parallel", [
    (True, True, None, False), (True, True, 32, True), (True, False, None, False), (True, False, 32, True),
    (False, False, None, False)])
def test_pixel_lane_path_matches_oracle(monkeypatch, index, lanes, planes, pixel_block, parallel):
    """Ungrouped convolutions take the pixel-lane paths (int8_conv_lanes: padded word planes
    for stride 1, gathered words otherwise) where VNNI is, or the gather path; all equal the
    oracle, with 32-pixel blocks that start mid-row, K not a multiple of the tile's 8
    channels, C padded to a multiple of 4, taps in the padding."""
    monkeypatch.setattr(conv, "LANES", lanes)
    monkeypatch.setattr(conv, "PLANES", planes)
    monkeypatch.setattr(conv, "_MAX_PIXEL_BLOCK", conv._MAX_PIXEL_BLOCK)
    monkeypatch.setattr(conv, "PARALLEL_MIN_MACS", 0 if parallel else 2**62)
    monkeypatch.setattr(conv, "_L2_BLOCK_BYTES", 4 * 32 * 32 if pixel_block else conv._L2_BLOCK_BYTES)  # blocks mid-row
    check_lane_case(index, lanes, pixel_block, planes)


DEPTHWISE_CASES = [  # (batch, channels, size, kernel, stride, padding, dilation, x dtype, out dtype, relu)
    (2, 5, (9, 8), (3, 3), 1, 1, 1, np.uint8, np.uint8, True),  # MobileNetV2's 3x3, stride 1
    (3, 4, (8, 9), (3, 3), 2, 1, 1, np.int8, np.uint8, False),  # stride 2
    (1, 3, (7, 7), (2, 3), (1, 2), (2, 0), (2, 1), np.uint8, np.int8, False),  # uneven, dilated
    (2, 2, (4, 5), (5, 5), 1, 2, 1, np.int8, np.int8, True),  # taps mostly in the padding
]


def check_depthwise_case(index, depthwise=True):
    batch, channels, size, kernel, stride, padding, dilation, x_dtype, out_dtype, relu = DEPTHWISE_CASES[index]
    case = Case(batch, 1, 1, channels, size, kernel, stride, padding, dilation, x_dtype, out_dtype, "uniform",
                "small", relu, 60 + index)
    conv.DEPTHWISE = depthwise
    plan = conv.plan_conv2d(case.x.shape, case.x.dtype, case.x_zero_point, case.w, *case.requantization(),
                            **case.geometry)
    assert (plan.path == "depthwise") == depthwise
    gemm_tests.assert_same(conv.run_conv2d(plan, case.x), case.check(), out_dtype)


@pytest.mark.parametrize("index", range(len(DEPTHWISE_CASES)))
@pytest.mark.parametrize("depthwise, parallel", [(True, False), (True, True), (False, False)])
def test_depthwise_path_matches_oracle(monkeypatch, index, depthwise, parallel):
    """groups == C == K sums plane by plane (int8_depthwise) and equals the oracle, as does the
    short-depth path it replaces."""
    monkeypatch.setattr(conv, "DEPTHWISE", depthwise)
    monkeypatch.setattr(conv, "PARALLEL_MIN_MACS", 0 if parallel else 2**62)
    check_depthwise_case(index, depthwise)


# ----------------------------------------------------------------------------------------
# The same kernels as plain Python


def test_runs_as_plain_python(run_without_jit):
    run_without_jit(__file__, """
        assert_plain_python(tests.conv._gather_rows, tests.conv._direct_block)
        Case = tests.Case
        Case(2, 3, 2, 1, (5, 4), (3, 3), 1, 1, 1, np.uint8, np.uint8, "uniform", "any", False, 1).check()
        Case(1, 2, 3, 2, (6, 5), (2, 3), (2, 1), (1, 0), (2, 1), np.int8, np.int8, "uniform", "small", True, 2).check()
        Case(1, 1, 1, 4, (5, 5), (3, 3), 2, 1, 1, np.int8, np.uint8, "x_min", "large", False, 3).check()
        Case(2, 4, 3, 1, (3, 2), (1, 1), 1, 0, 1, np.uint8, np.int8, "uniform", "any", False, 4).check()
        lanes = tests.conv_lanes
        assert_plain_python(lanes._gather_words, lanes._tile_loop, lanes._tile, lanes.lanes_serial)
        assert_plain_python(lanes.to_word_planes, lanes._store_rows, lanes.planes_serial)
        for index in range(len(tests.LANE_CASES)):
            tests.check_lane_case(index, True, 32, planes=True)
            tests.check_lane_case(index, True, 32, planes=False)
        from qatcore.kernels import int8_depthwise as depthwise
        assert_plain_python(depthwise._depthwise_task, depthwise.depthwise_serial)
        for index in range(len(tests.DEPTHWISE_CASES)):
            tests.check_depthwise_case(index)
    """)
