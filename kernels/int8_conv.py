"""Integer-only int8 2-D convolution (Jacob et al. 2018), groups and depthwise.

For x_q (N, C, H, W), uint8 or int8 with zero point z_x, and int8 weights w_q (K, C/G, kh, kw)
(symmetric per output channel), output channel k of group g = k // (K/G) is

    acc[n, k, oh, ow] = bias_q[k] + sum_{c, u, v} (x_q[n, g*C/G + c, oh*sh - ph + u*dh, ow*sw - pw + v*dw]
                                                   - z_x) * w_q[k, c, u, v]
    y_q[n, k, oh, ow] = requantize(acc[n, k, oh, ow])       (kernels/requantize.py, per channel k;
                                                             docs/numerics.md, "Integer-only requantization")

where a position in the padding reads z_x, the integer that represents real 0 (so it adds
nothing). OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1, OW likewise. The accumulator is exact
for C/G * kh * kw <= ``MAX_DEPTH``, as in :mod:`int8_gemm`, whose tiles and epilogue this
module reuses; the oracle in ``tests/kernels/test_int8_conv.py`` is a direct int64 loop.

Layout. The input is transposed once to channels-last (N, H, W, C) (int8 inputs get their sign
bit flipped on the way, see int8_gemm). A task owns one image and a block of output pixels:
it gathers, for each pixel, the kh*kw taps of C/G channels of each group into one contiguous
row ("im2row": each tap is a copy of C/G contiguous bytes, or a fill with z_x in the padding),
then multiplies those rows with the weights of each group (packed by ``pack_weights`` in the
same (kh, kw, C/G) order) and requantizes straight into the (K, OH*OW) planes of the output.
The pixel block is sized so that its rows stay in L2. A 1x1 convolution with stride 1 and no
padding reads the channels-last input directly, with no gather. A short depth (C/G*kh*kw at
most ``DIRECT_MAX_DEPTH``, a first layer on one input channel say) takes another path: the
float conv's ``im2col`` (padding with z_x) lays each tap out along the pixels, and the sums run
along the pixels (``_direct_block``), where the GEMM's tiles would spend most of their time
setting up (DigitsCNN's first conv, depth 9, is the case; docs/benchmarks.md, "int8 runtime").
Where the CPU has AVX-512 VNNI (``LANES``), an ungrouped convolution takes the pixel-lane path
instead (int8_conv_lanes.py: 16 output pixels in the vector lanes, 4 input channels a step, the
input channels zero-padded to a multiple of 4), which needs no horizontal sums and, for
stride 1, no gather either (the tiles read the input laid out once as padded word planes); otherwise a
gathered convolution's weights are zero-padded to a multiple of 64 taps so that all of the depth
runs in int8_gemm's VNNI tiles. A depthwise convolution (groups == C == K) sums along the
channels of the channels-last input in int8_depthwise.py. Tasks run in parallel above int8_gemm's ``PARALLEL_MIN_MACS``.
Each call of :func:`int8_conv2d` is :func:`plan_conv2d` (validation, weight packing, blocking:
what the int8 runtime does once per layer and input shape) then :func:`run_conv2d`. Where a large convolution's
time goes (transpose and gather, GEMM tiles, requantization) is in docs/benchmarks.md,
"Measurements behind the code".

>>> import numpy as np
>>> x = np.full((1, 1, 3, 3), 12, np.uint8)                         # z_x = 10: x - z_x = 2
>>> w = np.ones((1, 1, 3, 3), np.int8)
>>> one = np.array([1 << 30], np.int32)                             # M0 = 0.5, shift 0
>>> int8_conv2d(x, 10, w, None, one, np.zeros(1, np.int32), 0, 0, 255, np.uint8, padding=1)[0, 0]
array([[4, 6, 4],
       [6, 9, 6],
       [4, 6, 4]], dtype=uint8)
"""

from typing import NamedTuple

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange

from qatcore.errors import ConfigError, DTypeError, ShapeError

from .im2col import im2col
from .int8_conv_lanes import (
    TILE_CHANNELS,
    TILE_PIXELS,
    lanes_parallel,
    lanes_serial,
    planes_parallel,
    planes_serial,
    to_word_planes,
)
from .int8_depthwise import depthwise_parallel, depthwise_serial
from .int8_gemm import (
    PARALLEL_MIN_MACS,
    USE_VNNI,
    activations_as_uint8,
    as_packed,
    channel_parameters,
    check_depth,
    gemm_block,
    output_parameters,
    requantize_block,
)
from .layout import channels_last
from .window import output_size

__all__ = ["int8_conv2d", "Conv2dPlan", "plan_conv2d", "run_conv2d", "DIRECT_MAX_DEPTH"]

# Bytes of gathered rows per task (pixels x C*kh*kw): they are re-read from L2 for every 4
# output channels.
_L2_BLOCK_BYTES = 256 * 1024
_MAX_PIXEL_BLOCK = 512
# At or below this depth (C/groups * kh * kw) the sums run along the pixels (``_direct_block``):
# the GEMM's 4x4 tiles need depth to amortise their set-up.
DIRECT_MAX_DEPTH = 16
# Depthwise convolutions (groups == C == K) take int8_depthwise's channels-last path; the tests
# switch it off to reach the short-depth path with depthwise layers.
DEPTHWISE = True
# Ungrouped convolutions on a multiple of 4 input channels take the pixel-lane path
# (int8_conv_lanes) where VNNI makes it the fastest; the tests switch it on everywhere.
LANES = USE_VNNI
# Among those, stride-1 convolutions read padded word planes of the input with no gather.
PLANES = True
# The depth the VNNI tiles of int8_gemm multiply in one step (64 bytes a row).
_VNNI_DEPTH = 64


@njit(cache=True)
def _gather_rows(x, image, p0, p1, geometry, zero_point, cols):
    """cols[p - p0, ((g*kh + u)*kw + v)*Cg + c] = x[image, ih, iw, g*Cg + c] for output pixel p,
    (ih, iw) = (oh*sh - ph + u*dh, ow*sw - pw + v*dw), or zero_point in the padding.

    x is channels-last, flattened; cols is 2-d, one row per pixel. Offsets are unsigned
    (np.uintp) so that numba does not test them for negative wraparound, which would keep the
    copies from vectorising, and no row views are taken (see kernels/im2col.py). The taps are
    the outer loops and the pixels the inner one: with the pixels outside, the copy of this
    function that numba links into (and optimises again with) its caller, which is the copy
    the on-disk cache keeps, ran several times slower than the function compiled on its own
    (docs/benchmarks.md, "Measurements behind the code"); in this order both copies run at
    the same speed.
    """
    height, width, channels, kh, kw, sh, sw, ph, pw, dh, dw, out_width, groups = geometry
    group_channels = channels // groups
    span = np.uintp(group_channels)
    image_start = image * height * width * channels
    for g in range(groups):
        for u in range(kh):
            for v in range(kw):
                target = np.uintp(((g * kh + u) * kw + v) * group_channels)
                for p in range(p0, p1):
                    row = np.uintp(p - p0)
                    ih = p // out_width * sh - ph + u * dh
                    iw = p % out_width * sw - pw + v * dw
                    if 0 <= ih < height and 0 <= iw < width:
                        start = np.uintp(image_start + (ih * width + iw) * channels + g * group_channels)
                        for c in range(span):
                            cols[row, target + c] = x[start + c]
                    else:
                        for c in range(span):
                            cols[row, target + c] = zero_point


@njit(cache=True)
def _conv_task(task, x, weights, geometry, out_height, pixel_block, blocks_per_image, zero_point, offset,
               multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, pointwise, rows, acc, out):
    """Image task // blocks_per_image, output pixels [p0, p1) of it, every output channel.
    rows (pixel_block, C*kh*kw) and acc (K/groups, pixel_block) are this thread's work
    buffers; out is (N * K, OH * OW): row n*K + k is output plane (n, k)."""
    height, width, channels, kh, kw, _, _, _, _, _, _, out_width, groups = geometry
    pixels = out_height * out_width
    image, block = task // blocks_per_image, task % blocks_per_image
    p0 = block * pixel_block
    p1 = min(pixels, p0 + pixel_block)
    out_channels = weights.shape[0]
    group_out, depth = out_channels // groups, weights.shape[1]
    if pointwise:  # 1x1, stride 1, no padding: the channels-last rows are the gathered rows
        source, row0 = x.reshape(-1, channels), image * pixels + p0
    else:
        _gather_rows(x, image, p0, p1, geometry, zero_point, rows)
        source, row0 = rows, 0
    for g in range(groups):
        # acc is channel-major, like the output planes, so the epilogue reads and writes rows
        gemm_block(source, row0, row0 + p1 - p0, g * depth, weights, g * group_out, (g + 1) * group_out, depth,
                   acc, True)
        requantize_block(acc, p1 - p0, group_out, out, image * out_channels + g * group_out, p0, True, g * group_out,
                         offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip)


@njit(cache=True, parallel=True)
def _conv_parallel(x, weights, geometry, out_height, pixel_block, blocks_per_image, zero_point, offset, multiplier,
                   shift, scale, out_zero_point, clamp_min, clamp_max, flip, pointwise, n_tasks, rows, acc, out):
    for task in prange(n_tasks):
        thread = get_thread_id()
        _conv_task(np.int64(task), x, weights, geometry, out_height, pixel_block, blocks_per_image, zero_point,
                   offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, pointwise,
                   rows[thread], acc[thread], out)


@njit(cache=True)
def _conv_serial(x, weights, geometry, out_height, pixel_block, blocks_per_image, zero_point, offset, multiplier,
                 shift, scale, out_zero_point, clamp_min, clamp_max, flip, pointwise, n_tasks, rows, acc, out):
    for task in range(n_tasks):
        _conv_task(task, x, weights, geometry, out_height, pixel_block, blocks_per_image, zero_point, offset,
                   multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, pointwise, rows[0], acc[0],
                   out)


@njit(cache=True)
def _direct_block(cols, col0, count, weights, channel0, channels, row0, depth, acc):
    """acc[k, p] = sum_j cols[row0 + j, col0 + p] * weights[channel0 + k, j] for k < channels and
    p < count: the raw sums gemm_block computes, vectorised along the pixels instead of the
    depth (for a depth too short to fill the GEMM's tiles)."""
    n, first = np.uintp(count), np.uintp(col0)
    for k in range(channels):
        for p in range(n):
            acc[k, p] = 0
        for j in range(depth):
            w = np.int32(weights[channel0 + k, j])
            row = np.uintp(row0 + j)
            for p in range(n):
                acc[k, p] += w * np.int32(cols[row, first + p])


@njit(cache=True)
def _direct_task(task, cols, weights, groups, pixels, pixel_block, blocks_per_image, offset, multiplier, shift,
                 scale, out_zero_point, clamp_min, clamp_max, flip, acc, out):
    """The short-depth path's task: image task // blocks_per_image, output pixels [p0, p1) of it.
    cols is im2col's columns image by image, (N*C*kh*kw, OH*OW); weights (K, C/G*kh*kw) in im2col's
    (c, kh, kw) order."""
    image, block = task // blocks_per_image, task % blocks_per_image
    p0 = block * pixel_block
    p1 = min(pixels, p0 + pixel_block)
    out_channels, depth = weights.shape
    group_out = out_channels // groups
    for g in range(groups):
        _direct_block(cols, p0, p1 - p0, weights, g * group_out, group_out, (image * groups + g) * depth, depth, acc)
        requantize_block(acc, p1 - p0, group_out, out, image * out_channels + g * group_out, p0, True, g * group_out,
                         offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip)


@njit(cache=True, parallel=True)
def _direct_parallel(cols, weights, groups, pixels, pixel_block, blocks_per_image, offset, multiplier, shift,
                     scale, out_zero_point, clamp_min, clamp_max, flip, n_tasks, acc, out):
    for task in prange(n_tasks):
        _direct_task(np.int64(task), cols, weights, groups, pixels, pixel_block, blocks_per_image, offset,
                     multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, acc[get_thread_id()], out)


@njit(cache=True)
def _direct_serial(cols, weights, groups, pixels, pixel_block, blocks_per_image, offset, multiplier, shift,
                   scale, out_zero_point, clamp_min, clamp_max, flip, n_tasks, acc, out):
    for task in range(n_tasks):
        _direct_task(task, cols, weights, groups, pixels, pixel_block, blocks_per_image, offset, multiplier, shift,
                     scale, out_zero_point, clamp_min, clamp_max, flip, acc[0], out)


def _pair(value, what, minimum):
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= minimum for v in pair):
        raise ConfigError(f"int8_conv2d: {what} must be an integer >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


class Conv2dPlan(NamedTuple):
    """Everything ``int8_conv2d`` derives from its arguments for one input shape and dtype,
    validated: made once by :func:`plan_conv2d` and run by :func:`run_conv2d` on as many
    inputs of that shape as wanted (the int8 runtime keeps one per layer, so a forward does no
    per-layer packing or validation). Fields are private to this module."""

    input_shape: tuple
    input_dtype: np.dtype
    out_shape: tuple
    out_dtype: np.dtype
    path: str  # "depthwise" (int8_depthwise), "direct" (short depth), "planes" and "lanes" (int8_conv_lanes)
    # or "gather"
    parallel: bool
    arguments: tuple  # the driver's arguments between its input and its work buffers
    scratch: tuple  # (shape, dtype) of each per-thread work buffer
    layout: tuple  # the input's layout: im2col's geometry (direct) or the word planes' (planes)
    padded_channels: int = 0  # the pixel-lane path's channels, when C is not a multiple of 4
    # work buffers kept between runs (name -> array): fresh ones each run would cost their page
    # faults every time. The kernels hold the GIL, so one run of a plan at a time uses them.
    buffers: dict = None


def _buffer(plan, name, shape, dtype):
    """The plan's work buffer ``name`` of this shape and dtype (made on first use)."""
    buffer = plan.buffers.get(name)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
        buffer = plan.buffers[name] = np.empty(shape, dtype)
    return buffer


def _make_plan(*fields, padded_channels=0):
    return Conv2dPlan(*fields, padded_channels, {})


def plan_conv2d(x_shape, x_dtype, x_zero_point, w_q, bias_q, multiplier, shift, out_zero_point, clamp_min,
                clamp_max, out_dtype, stride=1, padding=0, dilation=1, groups=1):
    """The :class:`Conv2dPlan` of ``int8_conv2d`` on inputs of shape ``x_shape`` and dtype
    ``x_dtype`` (the other arguments as for :func:`int8_conv2d`, which it validates)."""
    name = "int8_conv2d"
    packed = as_packed(w_q, 4, name)
    x_dtype = np.dtype(x_dtype)
    if x_dtype not in (np.uint8, np.int8):
        raise DTypeError(f"{name}: activations must be a uint8 or int8 array, got {x_dtype}")
    _, zero_point = activations_as_uint8(np.zeros(0, x_dtype), x_zero_point, name)
    if len(x_shape) != 4:
        raise ShapeError(f"{name}: input must be (N, C, H, W), got shape {tuple(x_shape)}")
    (batch, channels, height, width), (out_channels, group_channels, kh, kw) = tuple(x_shape), packed.shape
    if not isinstance(groups, (int, np.integer)) or groups < 1 or out_channels % groups or channels % groups:
        raise ConfigError(f"{name}: groups must be a positive divisor of in_channels {channels} and "
                          f"out_channels {out_channels}, got {groups!r}")
    if channels != group_channels * groups:
        raise ShapeError(f"{name}: input has {channels} channels but weights {packed.shape} with groups={groups} "
                         f"expect {group_channels * groups}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation,
                                                                                                "dilation", 1)
    out_height, out_width = output_size(height, kh, sh, ph, dh), output_size(width, kw, sw, pw, dw)
    if out_height < 1 or out_width < 1:
        raise ShapeError(f"{name}: kernel {(kh, kw)} with dilation {(dh, dw)} does not fit input {(height, width)} "
                         f"padded by {(ph, pw)}")
    check_depth(group_channels * kh * kw, name)
    offset, multiplier, shift, scale = channel_parameters(packed, zero_point, bias_q, multiplier, shift, name)
    out_zero_point, clamp_min, clamp_max, flip, out_dtype = output_parameters(out_zero_point, clamp_min, clamp_max,
                                                                           out_dtype, name)
    pixels = out_height * out_width
    out_shape = (batch, out_channels, out_height, out_width)
    epilogue = (offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip)
    macs = batch * out_channels * pixels * group_channels * kh * kw
    if DEPTHWISE and groups == channels == out_channels:  # int8_depthwise: along the channels
        geometry = (height, width, channels, kh, kw, sh, sw, ph, pw, dh, dw, out_width)
        weights = np.ascontiguousarray(packed.matrix.T, dtype=np.int32)  # (kh * kw, C)
        pixel_block = max(1, min(pixels, _L2_BLOCK_BYTES // (4 * channels)))
        blocks_per_image = -(-pixels // pixel_block)
        n_tasks = batch * blocks_per_image
        parallel = n_tasks > 1 and macs >= PARALLEL_MIN_MACS
        return _make_plan(tuple(x_shape), x_dtype, out_shape, out_dtype, "depthwise", parallel,
                          (weights, weights * np.int32(zero_point), geometry, pixel_block, blocks_per_image, *epilogue,
                           n_tasks),
                          (((pixel_block, channels), np.int32), ((channels, pixel_block), np.int32)), ())
    if group_channels * kh * kw <= DIRECT_MAX_DEPTH and (kh, kw, sh, sw, ph, pw) != (1, 1, 1, 1, 0, 0):
        weights = np.ascontiguousarray(
            packed.matrix.reshape(out_channels, kh, kw, group_channels).transpose(0, 3, 1, 2)).reshape(out_channels, -1)
        pixel_block = min(pixels, _MAX_PIXEL_BLOCK)
        blocks_per_image = -(-pixels // pixel_block)
        n_tasks = batch * blocks_per_image
        parallel = n_tasks > 1 and macs >= PARALLEL_MIN_MACS
        return _make_plan(tuple(x_shape), x_dtype, out_shape, out_dtype, "direct", parallel,
                          (weights, int(groups), pixels, pixel_block, blocks_per_image, *epilogue, n_tasks),
                          (((out_channels // groups, pixel_block), np.int32),),
                          (kh, kw, sh, sw, ph, pw, dh, dw, zero_point))
    pointwise = (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0)
    pixel_block = max(4, min(_MAX_PIXEL_BLOCK, _L2_BLOCK_BYTES // (channels * kh * kw)) // 4 * 4)
    blocks_per_image = -(-pixels // pixel_block)
    n_tasks = batch * blocks_per_image
    geometry = (height, width, channels, kh, kw, sh, sw, ph, pw, dh, dw, out_width, int(groups))
    parallel = n_tasks > 1 and macs >= PARALLEL_MIN_MACS
    if LANES and groups == 1:
        # pixels in the vector lanes (int8_conv_lanes): weights padded with zero rows to whole
        # tiles and, for a C that is not a multiple of 4, with zero channels to the next one (the
        # input gets the same channels, whatever they hold is multiplied by 0)
        padded_channels = -(-channels // 4) * 4
        matrix = np.zeros((out_channels, kh * kw, padded_channels), np.int8)
        matrix[:, :, :channels] = packed.matrix.reshape(out_channels, kh * kw, channels)
        matrix = matrix.reshape(out_channels, -1)
        depth = matrix.shape[1]
        geometry = (height, width, padded_channels, *geometry[3:])
        pixel_block = max(TILE_PIXELS, min(_MAX_PIXEL_BLOCK, _L2_BLOCK_BYTES // depth) // TILE_PIXELS * TILE_PIXELS)
        blocks_per_image = -(-pixels // pixel_block)
        n_tasks = batch * blocks_per_image
        weights = np.zeros((-(-out_channels // TILE_CHANNELS) * TILE_CHANNELS, depth), np.int8)
        weights[:out_channels] = matrix
        zero_word = np.uint32(zero_point * 0x01010101)
        if PLANES and (sh, sw) == (1, 1):  # no gather: the tiles read the input's padded word planes
            padded_height, padded_width, words = height + 2 * ph, width + 2 * pw, padded_channels // 4
            rows = padded_height + -(-(TILE_PIXELS - 1 + (kw - 1) * dw) // padded_width)  # the last tile's reads
            plane_words = rows * padded_width
            offsets = np.array([c4 * plane_words + u * dh * padded_width + v * dw for u in range(kh) for v in range(kw)
                                for c4 in range(words)], np.int64)
            positions = out_height * padded_width
            block = max(TILE_PIXELS, min(-(-positions // TILE_PIXELS) * TILE_PIXELS,
                                         _L2_BLOCK_BYTES // (4 * weights.shape[0]) // TILE_PIXELS * TILE_PIXELS))
            blocks_per_image = -(-positions // block)
            n_tasks = batch * blocks_per_image
            parallel = n_tasks > 1 and macs >= PARALLEL_MIN_MACS
            return _make_plan(tuple(x_shape), x_dtype, out_shape, out_dtype, "planes", parallel,
                              (weights, offsets, words * plane_words, padded_width, positions, out_width, block,
                               blocks_per_image, *epilogue, out_channels, n_tasks),
                              (((weights.shape[0], block), np.int32),), (ph, pw, rows, padded_width, words, zero_word))
        parallel = n_tasks > 1 and macs >= PARALLEL_MIN_MACS
        return _make_plan(tuple(x_shape), x_dtype, out_shape, out_dtype, "lanes", parallel,
                          (weights, np.arange(depth // 4, dtype=np.int64) * pixel_block, geometry, out_height,
                           pixel_block, blocks_per_image, zero_word, *epilogue, out_channels, n_tasks),
                          (((depth // 4, pixel_block), np.uint32), ((weights.shape[0], pixel_block), np.int32)), (),
                          padded_channels=padded_channels if padded_channels != channels else 0)
    weights, depth = packed.matrix, packed.matrix.shape[1]
    if USE_VNNI and groups == 1 and not pointwise and depth % _VNNI_DEPTH:
        # zero weights up to a multiple of the VNNI tile's depth: every product then runs in
        # vpdpbusd, none in the tiles' slower loop; the gathered rows' extra columns are never
        # written, and whatever they hold is multiplied by 0
        weights = np.zeros((out_channels, -(-depth // _VNNI_DEPTH) * _VNNI_DEPTH), np.int8)
        weights[:, :depth] = packed.matrix
    return _make_plan(tuple(x_shape), x_dtype, out_shape, out_dtype, "gather", parallel,
                      (weights, geometry, out_height, pixel_block, blocks_per_image, np.uint8(zero_point),
                       *epilogue, pointwise, n_tasks),
                      (((0 if pointwise else pixel_block, weights.shape[1] * groups), np.uint8),
                       ((out_channels // groups, pixel_block), np.int32)),
                      ())


def run_conv2d(plan, x_q):
    """``int8_conv2d`` of ``x_q`` with the arguments ``plan`` was made from; x_q must have the
    plan's shape and dtype (ShapeError / DTypeError otherwise). Returns a new array."""
    if not isinstance(x_q, np.ndarray) or x_q.dtype != plan.input_dtype:
        raise DTypeError(f"int8_conv2d: this plan takes {plan.input_dtype} activations, got "
                         f"{getattr(x_q, 'dtype', type(x_q).__name__)}")
    if x_q.shape != plan.input_shape:
        raise ShapeError(f"int8_conv2d: this plan takes inputs of shape {plan.input_shape}, got {x_q.shape}")
    out = np.empty(plan.out_shape, np.uint8)
    if out.size == 0:
        return out.view(plan.out_dtype)
    batch, out_channels = plan.out_shape[:2]
    flat_out = out.reshape(batch * out_channels, -1)
    x_u8 = np.bitwise_xor(x_q.view(np.uint8), np.uint8(0x80)) if x_q.dtype == np.int8 else x_q
    threads = get_num_threads() if plan.parallel else 1
    scratch = [_buffer(plan, f"scratch{i}", (threads,) + tuple(shape), dtype)
               for i, (shape, dtype) in enumerate(plan.scratch)]
    if plan.path == "depthwise":
        driver = depthwise_parallel if plan.parallel else depthwise_serial
        driver(channels_last(x_u8, _buffer(plan, "nhwc", (x_u8.size,), np.uint8)), *plan.arguments, *scratch,
               flat_out)
        return out.view(plan.out_dtype)
    if plan.path == "planes":
        ph, pw, rows, padded_width, words, zero_word = plan.layout
        planes = _buffer(plan, "planes", (plan.input_shape[0], words, rows, padded_width), np.uint32)
        to_word_planes(np.ascontiguousarray(x_u8), zero_word, ph, pw, planes)
        driver = planes_parallel if plan.parallel else planes_serial
        driver(planes.reshape(-1), *plan.arguments, *scratch, flat_out)
        return out.view(plan.out_dtype)
    if plan.path == "direct":
        # im2col's (C*kh*kw, N*OH*OW) columns in this path's per-image order (N*C*kh*kw, OH*OW)
        batch, pixels = plan.input_shape[0], flat_out.shape[1]
        cols = im2col(x_u8, *plan.layout[:8], fill=plan.layout[8])
        cols = np.ascontiguousarray(cols.reshape(-1, batch, pixels).transpose(1, 0, 2)).reshape(-1, pixels)
        driver = _direct_parallel if plan.parallel else _direct_serial
        driver(cols, *plan.arguments, *scratch, flat_out)
        return out.view(plan.out_dtype)
    if plan.padded_channels:  # the extra channels' bytes are multiplied by zero weights: left as they are
        x_nhwc = _buffer(plan, "nhwc", plan.input_shape[:1] + plan.input_shape[2:] + (plan.padded_channels,), np.uint8)
        x_nhwc[..., :plan.input_shape[1]] = x_u8.transpose(0, 2, 3, 1)
        x_nhwc = x_nhwc.reshape(-1)
    else:
        x_nhwc = channels_last(x_u8, _buffer(plan, "nhwc", (x_u8.size,), np.uint8))
    if plan.path == "lanes":
        driver = lanes_parallel if plan.parallel else lanes_serial
        driver(x_nhwc.view(np.uint32), *plan.arguments, *scratch, flat_out)
    else:
        driver = _conv_parallel if plan.parallel else _conv_serial
        driver(x_nhwc, *plan.arguments, *scratch, flat_out)
    return out.view(plan.out_dtype)


def int8_conv2d(x_q, x_zero_point, w_q, bias_q, multiplier, shift, out_zero_point, clamp_min, clamp_max, out_dtype,
                stride=1, padding=0, dilation=1, groups=1):
    """Integer-only 2-D convolution with requantized output (module docstring formula).

    Args:
        x_q: (N, C, H, W) uint8 or int8 activations; x_zero_point: z_x in their range.
        w_q: (K, C/groups, kh, kw) int8 weights (symmetric, zero point 0), or
            ``int8_gemm.pack_weights`` of them (pack once per layer).
        bias_q: (K,) int32 at scale s_x * s_w[k], or None.
        multiplier, shift: (K,) int32 (or (1,)) from ``requantize.quantize_multiplier`` of
            s_x * s_w[k] / s_y: M0 in [2^30, 2^31), shift in [-31, 31] (negative = left);
            or a float32 multiplier (K,) or (1,) and shift None: the float32 requantization
            of ``requantize_float32``.
        out_zero_point, clamp_min, clamp_max: z_y and the clamp (clamp_min = z_y fuses a ReLU).
        out_dtype: np.uint8 or np.int8.
        stride, padding, dilation: an int or an (h, w) pair; >= 1, >= 0, >= 1.
        groups: a positive divisor of C and K; groups == C == K is depthwise.

    Returns:
        A new (N, K, OH, OW) array of out_dtype.

    Raises:
        DTypeError, ShapeError, ConfigError (the last two are ValueErrors): wrong dtypes or
        shapes, a kernel that does not fit the padded input, C/groups * kh * kw > MAX_DEPTH,
        parameters out of range.
    """
    if not isinstance(x_q, np.ndarray):
        raise DTypeError(f"int8_conv2d: activations must be a uint8 or int8 array, got {type(x_q).__name__}")
    plan = plan_conv2d(x_q.shape, x_q.dtype, x_zero_point, w_q, bias_q, multiplier, shift, out_zero_point, clamp_min,
                       clamp_max, out_dtype, stride, padding, dilation, groups)
    return run_conv2d(plan, x_q)
