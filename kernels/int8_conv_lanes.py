"""The int8 convolution's pixel-lane path: output pixels in the vector lanes, input channels in fours.

``int8_conv2d`` (int8_conv.py) computes, for each output channel k and pixel p of an image,

    acc[k, p] = sum_j cols[j, p] * w[k, j]           (j over the C * kh * kw taps, raw bytes)

and requantizes it. Its general path puts the reduction over j in the vector lanes (a 4x4 tile
of dot products per step, each summed across its lanes at the end, int8_gemm.py). This path,
taken for ungrouped convolutions whose input channels are a multiple of 4, puts 16 pixels in
the 16 int32 lanes instead, and uses AVX-512 VNNI's ``vpdpbusd`` as it is meant to be used:

    acc[k, p:p+16] += sum_{b<4} cols4[j4, p:p+16, b] * w[k, 4*j4 + b]     (one vpdpbusd)

where ``cols4[j4, p]`` is the 32-bit word of pixel p's taps 4*j4 .. 4*j4 + 3 (4 channels of one
tap: the channels-last input read a word at a time) and w[k, 4*j4:4*j4+4] is one weight word
broadcast to every lane. A tile keeps 8 output channels x 32 pixels in 16 accumulators for the
whole reduction, loads 2 vectors of pixels and 8 weight words per step, and stores its sums
with no horizontal reduction; the result is the channel-major ``acc`` that int8_gemm's
``requantize_block`` turns into the output planes.

Layout of a task (one image, a block of output pixels): ``_gather_words`` copies the input
words of each tap into ``cols4`` (depth/4 rows, one column per pixel, the padding read as the
zero point's word), then the tiles run over 8-channel by 32-pixel blocks. Weights are padded
with zero rows to a multiple of 8 channels and ``cols4`` to a multiple of 32 pixels; the extra
sums are computed and never read. Without VNNI, and under ``NUMBA_DISABLE_JIT``, the tile is a
plain loop with the same result (integer sums are exact; int8_gemm.py's bound on the depth
keeps every partial sum in int32).
"""

import numpy as np
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .int8_gemm import USE_VNNI, requantize_block
from .requantize import requantize_value
from .requantize_float32 import requantize_float32_value

__all__ = ["TILE_CHANNELS", "TILE_PIXELS", "lanes_parallel", "lanes_serial", "to_word_planes", "planes_parallel",
           "planes_serial"]

TILE_CHANNELS = 8
TILE_PIXELS = 32  # two vectors of 16 int32 lanes


@intrinsic
def _tile_vnni(typingctx, source, first, offsets, weights, channel0, acc, acc_col):
    """acc[channel0 + r, acc_col + i] = sum_{j4, b < 4} byte b of source[first + offsets[j4] + i] *
    weights[channel0 + r, 4*j4 + b], for r < 8, i < 32 and j4 < len(offsets); source uint32
    (1-d), offsets int64, weights int8 (channels, 4 * len(offsets)), acc int32, C-contiguous."""
    def codegen(context, builder, signature, args):
        source_type, _, offsets_type, w_type, _, acc_type, _ = signature.args
        source_value, first_word, offsets_value, w_value, first_channel, acc_value, first_column = args
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        lanes = ir.VectorType(i32, 16)
        source_array = context.make_array(source_type)(context, builder, source_value)
        offsets_array = context.make_array(offsets_type)(context, builder, offsets_value)
        w_array = context.make_array(w_type)(context, builder, w_value)
        acc_array = context.make_array(acc_type)(context, builder, acc_value)
        n_words = cgutils.unpack_tuple(builder, offsets_array.shape, 1)[0]
        w_stride = cgutils.unpack_tuple(builder, w_array.strides, 2)[0]
        acc_stride = cgutils.unpack_tuple(builder, acc_array.strides, 2)[0]
        w_base = builder.bitcast(w_array.data, i8.as_pointer())
        acc_base = builder.bitcast(acc_array.data, i8.as_pointer())
        w_rows = [builder.gep(w_base, [builder.mul(builder.add(first_channel, i64(r)), w_stride)])
                  for r in range(TILE_CHANNELS)]
        dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                                "llvm.x86.avx512.vpdpbusd.512")
        vectors = TILE_PIXELS // 16
        sums = [cgutils.alloca_once_value(builder, ir.Constant(lanes, None))
                for _ in range(TILE_CHANNELS * vectors)]
        with cgutils.for_range(builder, n_words) as loop:
            offset = builder.load(builder.gep(offsets_array.data, [loop.index]))
            row = builder.gep(source_array.data, [builder.add(first_word, offset)])
            xs = [builder.load(builder.bitcast(builder.gep(row, [i64(16 * v)]), lanes.as_pointer()), align=1)
                  for v in range(vectors)]
            w_offset = builder.mul(loop.index, i64(4))
            for r in range(TILE_CHANNELS):
                word = builder.load(builder.bitcast(builder.gep(w_rows[r], [w_offset]), i32.as_pointer()), align=1)
                splat = builder.shuffle_vector(builder.insert_element(ir.Constant(lanes, None), word, i32(0)),
                                               ir.Constant(lanes, None), ir.Constant(lanes, [i32(0)] * 16))
                for v in range(vectors):
                    total = builder.call(dpbusd, [builder.load(sums[r * vectors + v]), xs[v], splat])
                    builder.store(total, sums[r * vectors + v])
        column_bytes = builder.mul(first_column, i64(4))
        for r in range(TILE_CHANNELS):
            acc_row = builder.gep(acc_base, [builder.add(builder.mul(builder.add(first_channel, i64(r)), acc_stride),
                                                         column_bytes)])
            for v in range(vectors):
                target = builder.bitcast(builder.gep(acc_row, [i64(64 * v)]), lanes.as_pointer())
                builder.store(builder.load(sums[r * vectors + v]), target, align=1)
        return context.get_dummy_value()

    return types.void(source, types.intp, offsets, weights, types.intp, acc, types.intp), codegen


@njit(cache=True)
def _tile_loop(source, first, offsets, weights, channel0, acc, acc_col):
    """``_tile_vnni``'s sums as a plain loop (no VNNI, or NUMBA_DISABLE_JIT)."""
    for r in range(TILE_CHANNELS):
        k = channel0 + r
        for i in range(TILE_PIXELS):
            total = np.int64(0)
            for j4 in range(offsets.shape[0]):
                word = np.int64(source[first + offsets[j4] + i])
                for b in range(4):
                    total += ((word >> (8 * b)) & 0xFF) * np.int64(weights[k, 4 * j4 + b])
            acc[k, acc_col + i] = np.int32(total)


@njit(cache=True)
def _tile(source, first, offsets, weights, channel0, acc, acc_col):
    if USE_VNNI:
        _tile_vnni(source, first, offsets, weights, channel0, acc, acc_col)
    else:
        _tile_loop(source, first, offsets, weights, channel0, acc, acc_col)


@njit(cache=True)
def _valid_columns(out_width, offset, stride, width):
    """[lo, hi): the output columns ow whose input column ow*stride + offset lies in [0, width)."""
    lo = 0 if offset >= 0 else (stride - 1 - offset) // stride
    hi = (width - offset + stride - 1) // stride if width > offset else 0
    hi = min(hi, out_width)
    return min(lo, hi), hi


@njit(cache=True)
def _gather_words(x_words, image, p0, p1, geometry, zero_word, cols):
    """cols[(u*kw + v)*C/4 + c4, p - p0] = x_words[image, ih, iw, c4] (the channels-last input
    as 32-bit words) for output pixel p, (ih, iw) = (oh*sh - ph + u*dh, ow*sw - pw + v*dw), or
    zero_word (the zero point in all 4 bytes) in the padding. For each tap, the pixels are
    walked one output row at a time, split into the padding on the left, the columns inside
    the input and the padding on the right, so that no pixel tests its bounds."""
    height, width, channels, kh, kw, sh, sw, ph, pw, dh, dw, out_width, _ = geometry
    words = channels // 4
    image_start = image * height * width * words
    for u in range(kh):
        for v in range(kw):
            row0 = (u * kw + v) * words
            lo, hi = _valid_columns(out_width, v * dw - pw, sw, width)
            p = p0
            while p < p1:
                oh, first = p // out_width, p % out_width
                last = min(out_width, first + p1 - p)
                column = p - p0 - first  # cols column of output column 0 of this row
                ih = oh * sh - ph + u * dh
                inside_lo, inside_hi = max(lo, first), min(hi, last)
                if not 0 <= ih < height or inside_lo >= inside_hi:
                    inside_lo = inside_hi = last
                for c in range(words):
                    row = np.uintp(row0 + c)
                    for ow in range(first, inside_lo):
                        cols[row, np.uintp(column + ow)] = zero_word
                    source = image_start + (ih * width - pw + v * dw) * words + c
                    for ow in range(inside_lo, inside_hi):
                        cols[row, np.uintp(column + ow)] = x_words[np.uintp(source + ow * sw * words)]
                    for ow in range(inside_hi, last):
                        cols[row, np.uintp(column + ow)] = zero_word
                p += last - first


@njit(cache=True)
def _lanes_task(task, x_words, weights, offsets, geometry, out_height, pixel_block, blocks_per_image, zero_word,
                offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, out_channels, cols, acc,
                out):
    """Image task // blocks_per_image, output pixels [p0, p1) of it, every output channel;
    cols (depth/4, pixel block) and acc (padded channels, pixel block) are this thread's;
    offsets[j4] = j4 * pixel block, where row j4 of cols starts."""
    pixels = out_height * geometry[11]
    image, block = task // blocks_per_image, task % blocks_per_image
    p0 = block * pixel_block
    p1 = min(pixels, p0 + pixel_block)
    _gather_words(x_words, image, p0, p1, geometry, zero_word, cols)
    count = p1 - p0
    padded = -(-count // TILE_PIXELS) * TILE_PIXELS
    source = cols.reshape(-1)
    for channel0 in range(0, weights.shape[0], TILE_CHANNELS):
        for q in range(0, padded, TILE_PIXELS):
            _tile(source, q, offsets, weights, channel0, acc, q)
    requantize_block(acc, count, out_channels, out, image * out_channels, p0, True, 0, offset, multiplier, shift,
                     scale, out_zero_point, clamp_min, clamp_max, flip)


@njit(cache=True, parallel=True)
def lanes_parallel(x_words, weights, offsets, geometry, out_height, pixel_block, blocks_per_image, zero_word,
                   offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, out_channels,
                   n_tasks, cols, acc, out):
    """Every task of the pixel-lane path under prange; cols and acc hold one buffer a thread."""
    for task in prange(n_tasks):
        thread = get_thread_id()
        _lanes_task(np.int64(task), x_words, weights, offsets, geometry, out_height, pixel_block, blocks_per_image,
                    zero_word, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip,
                    out_channels, cols[thread], acc[thread], out)


@njit(cache=True)
def lanes_serial(x_words, weights, offsets, geometry, out_height, pixel_block, blocks_per_image, zero_word, offset,
                 multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, out_channels, n_tasks, cols,
                 acc, out):
    """Every task of the pixel-lane path, in order, on the calling thread."""
    for task in range(n_tasks):
        _lanes_task(task, x_words, weights, offsets, geometry, out_height, pixel_block, blocks_per_image, zero_word,
                    offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, out_channels,
                    cols[0], acc[0], out)


# ----------------------------------------------------------------------------------------
# Stride 1: no gather. The input is laid out once as padded word planes, planes[n, c4, i, j] =
# the 4 channels 4*c4 .. 4*c4 + 3 at input (i - ph, j - pw) (the zero point's word in the
# padding), and the output positions are numbered on the padded width, q = oh * Wp + ow. Then
# tap (u, v) of channel word c4 at position q is planes[n, c4] at q + u*dh*Wp + v*dw: 16
# consecutive q are 16 consecutive words, so the tile reads them straight from the planes
# (offsets[j4] = c4 * plane words + u*dh*Wp + v*dw) and no cols are gathered. The positions
# with ow >= OW are computed and never stored.


@njit(cache=True)
def to_word_planes(x, zero_word, ph, pw, planes):
    """Fill planes (N, C4, rows, Wp) uint32 from x (N, C, H, W) uint8: byte b of
    planes[n, c4, ph + i, pw + j] is x[n, 4*c4 + b, i, j] (0 for 4*c4 + b >= C), and every
    other word is zero_word."""
    batch, channels, height, width = x.shape
    words = planes.shape[1]
    flat = planes.reshape(-1)
    for i in range(flat.size):
        flat[i] = zero_word
    full = channels // 4
    for n in range(batch):
        for c4 in range(words):
            for i in range(height):
                row = planes[n, c4, ph + i]
                if c4 < full:
                    c = 4 * c4
                    for j in range(np.uintp(width)):
                        row[np.uintp(pw) + j] = (np.uint32(x[n, c, i, j]) | (np.uint32(x[n, c + 1, i, j]) << 8)
                                                 | (np.uint32(x[n, c + 2, i, j]) << 16)
                                                 | (np.uint32(x[n, c + 3, i, j]) << 24))
                else:
                    for j in range(np.uintp(width)):
                        word = np.uint32(0)
                        for b in range(channels - 4 * c4):
                            word |= np.uint32(x[n, 4 * c4 + b, i, j]) << np.uint32(8 * b)
                        row[np.uintp(pw) + j] = word


@njit(cache=True)
def _store_rows(acc, q0, q1, padded_width, out_width, out_channels, out, out_row, offset, multiplier, shift, scale,
                out_zero_point, clamp_min, clamp_max, flip):
    """The epilogue of positions [q0, q1): out[out_row + k, oh * OW + ow] = requantize(acc[k, q - q0]
    + offset[k]) for q = oh * Wp + ow with ow < OW (int8_gemm's requantize_block, by rows)."""
    use_float = scale.size > 0
    for k in range(out_channels):
        bias, m0, n, o_row = offset[k], multiplier[k], shift[k], np.uintp(out_row + k)
        for oh in range(q0 // padded_width, (q1 - 1) // padded_width + 1):
            start, stop = max(q0, oh * padded_width), min(q1, oh * padded_width + out_width)
            first, target = np.uintp(start - q0), np.uintp(oh * out_width + start - oh * padded_width)
            if use_float:
                for i in range(np.uintp(max(stop - start, 0))):
                    y = requantize_float32_value(np.int64(acc[k, first + i]) + bias, scale[k], out_zero_point,
                                                 clamp_min, clamp_max)
                    out[o_row, target + i] = y ^ flip
            else:
                for i in range(np.uintp(max(stop - start, 0))):
                    y = requantize_value(np.int64(acc[k, first + i]) + bias, m0, n, out_zero_point, clamp_min,
                                         clamp_max)
                    out[o_row, target + i] = y ^ flip


@njit(cache=True)
def _planes_task(task, planes, weights, offsets, image_words, padded_width, positions, out_width, block,
                 blocks_per_image, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip,
                 out_channels, acc, out):
    """Image task // blocks_per_image, positions [q0, q1) of it (positions = OH * Wp), every
    output channel; planes is flat, image_words = C4 * rows * Wp; acc (padded channels, block)."""
    image, part = task // blocks_per_image, task % blocks_per_image
    q0 = part * block
    q1 = min(positions, q0 + block)
    base = image * image_words
    for channel0 in range(0, weights.shape[0], TILE_CHANNELS):
        for q in range(q0, q1, TILE_PIXELS):
            _tile(planes, base + q, offsets, weights, channel0, acc, q - q0)
    _store_rows(acc, q0, q1, padded_width, out_width, out_channels, out, image * out_channels, offset, multiplier,
                shift, scale, out_zero_point, clamp_min, clamp_max, flip)


@njit(cache=True, parallel=True)
def planes_parallel(planes, weights, offsets, image_words, padded_width, positions, out_width, block,
                    blocks_per_image, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip,
                    out_channels, n_tasks, acc, out):
    """Every task of the stride-1 path under prange; acc holds one buffer a thread."""
    for task in prange(n_tasks):
        _planes_task(np.int64(task), planes, weights, offsets, image_words, padded_width, positions, out_width,
                     block, blocks_per_image, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max,
                     flip, out_channels, acc[get_thread_id()], out)


@njit(cache=True)
def planes_serial(planes, weights, offsets, image_words, padded_width, positions, out_width, block, blocks_per_image,
                  offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, out_channels, n_tasks,
                  acc, out):
    """Every task of the stride-1 path, in order, on the calling thread."""
    for task in range(n_tasks):
        _planes_task(task, planes, weights, offsets, image_words, padded_width, positions, out_width, block,
                     blocks_per_image, offset, multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip,
                     out_channels, acc[0], out)
