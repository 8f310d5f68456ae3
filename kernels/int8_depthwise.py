"""The int8 depthwise convolution: one input channel per output channel, vectorised along the channels.

``int8_conv2d`` with groups == C == K (each output channel k reads input channel k alone):

    acc[n, k, oh, ow] = offset[k] + sum_{u, v} x'[n, ih, iw, k] * w[k, u, v],
    (ih, iw) = (oh*sh - ph + u*dh, ow*sw - pw + v*dw)

on the channels-last input, where x' is x inside the input and z_x in the padding (so a padded
tap adds z_x * w[k, u, v], which ``offset[k] = bias[k] - z_x * sum_{u,v} w[k, u, v]`` cancels,
as in int8_conv.py); then ``requantize_block`` (int8_gemm.py) stores y = requantize(acc) into
the output planes. A task owns one image and a block of output pixels; for each pixel and tap
it adds a whole row of C products (contiguous in the channels-last input, so the loop over the
channels vectorises however small the planes are: MobileNetV2's late layers have 4x4 planes of
960 channels), reading the padding's products from a table ``z_x * w``. The sums are exact:
|x| <= 255, |w| <= 128 and kh * kw <= MAX_DEPTH.
"""

import numpy as np
from numba import get_thread_id, njit, prange

from .int8_gemm import requantize_block

__all__ = ["depthwise_parallel", "depthwise_serial"]


@njit(cache=True)
def _depthwise_task(task, x, weights, padding_products, geometry, pixel_block, blocks_per_image, offset, multiplier,
                    shift, scale, out_zero_point, clamp_min, clamp_max, flip, acc, planes, out):
    """Image task // blocks_per_image, output pixels [p0, p1) of it. x is channels-last and
    flat; weights and padding_products are int32 (kh * kw, C); acc (pixel block, C) is this
    thread's, and planes (C, pixel block) the same sums channel-major; out is (N * C, OH * OW)."""
    height, width, channels, kh, kw, sh, sw, ph, pw, dh, dw, out_width = geometry
    pixels = (((height + 2 * ph - dh * (kh - 1) - 1) // sh) + 1) * out_width
    image, block = task // blocks_per_image, task % blocks_per_image
    p0 = block * pixel_block
    p1 = min(pixels, p0 + pixel_block)
    n_channels = np.uintp(channels)
    for p in range(p0, p1):
        r = np.uintp(p - p0)
        oh, ow = p // out_width, p % out_width
        for c in range(n_channels):
            acc[r, c] = 0
        for u in range(kh):
            ih = oh * sh - ph + u * dh
            for v in range(kw):
                tap = np.uintp(u * kw + v)
                iw = ow * sw - pw + v * dw
                if 0 <= ih < height and 0 <= iw < width:
                    start = np.uintp(((image * height + ih) * width + iw) * channels)
                    for c in range(n_channels):
                        acc[r, c] += np.int32(x[start + c]) * weights[tap, c]
                else:
                    for c in range(n_channels):
                        acc[r, c] += padding_products[tap, c]
    # the epilogue reads channel-major sums, the layout of the output planes: transpose the block
    # in 16 x 16 squares first (reading acc.T directly would be a strided gather in its loop)
    count = p1 - p0
    for c0 in range(0, channels, 16):
        for r0 in range(0, count, 16):
            for c in range(c0, min(c0 + 16, channels)):
                for r in range(r0, min(r0 + 16, count)):
                    planes[c, r] = acc[r, c]
    requantize_block(planes, count, channels, out, image * channels, p0, True, 0, offset, multiplier, shift, scale,
                     out_zero_point, clamp_min, clamp_max, flip)


@njit(cache=True, parallel=True)
def depthwise_parallel(x, weights, padding_products, geometry, pixel_block, blocks_per_image, offset, multiplier, shift,
                       scale, out_zero_point, clamp_min, clamp_max, flip, n_tasks, acc, planes, out):
    """Every task under prange; acc and planes hold one buffer a thread."""
    for task in prange(n_tasks):
        _depthwise_task(np.int64(task), x, weights, padding_products, geometry, pixel_block, blocks_per_image, offset,
                        multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, acc[get_thread_id()],
                        planes[get_thread_id()], out)


@njit(cache=True)
def depthwise_serial(x, weights, padding_products, geometry, pixel_block, blocks_per_image, offset, multiplier, shift,
                     scale, out_zero_point, clamp_min, clamp_max, flip, n_tasks, acc, planes, out):
    """Every task, in order, on the calling thread."""
    for task in range(n_tasks):
        _depthwise_task(task, x, weights, padding_products, geometry, pixel_block, blocks_per_image, offset,
                        multiplier, shift, scale, out_zero_point, clamp_min, clamp_max, flip, acc[0], planes[0], out)
