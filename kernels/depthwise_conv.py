"""Depthwise 2-d convolution computed directly: forward, input gradient and weight gradient.

Depthwise means one group per channel with channel multiplier 1: the input x is (N, C, H, W),
the weight (C, 1, kh, kw) and the output (N, C, OH, OW), channel c of the output reading only
channel c of the input. With stride (sh, sw), zero padding (ph, pw) and dilation (dh, dw):

    out[n, c, i, j] = bias[c] + sum_{u, v} w[c, 0, u, v] * x[n, c, i*sh - ph + u*dh, j*sw - pw + v*dw]

(a term is 0 where its x position lies in the padding). The output size is that of
``kernels/window.py``: ``OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1``, OW likewise. The output
is linear in x and in w, so the gradients, for an upstream gradient g shaped like the output, are

    dx[n, c, h, w'] = sum of w[c, 0, u, v] * g[n, c, i, j]
                      over (u, v, i, j) with i*sh - ph + u*dh == h and j*sw - pw + v*dw == w'
    dw[c, 0, u, v]  = sum_{n, i, j} g[n, c, i, j] * x[n, c, i*sh - ph + u*dh, j*sw - pw + v*dw]
    dbias[c]        = sum_{n, i, j} g[n, c, i, j]            (left to the caller: a NumPy sum)

dx is the adjoint of the forward map x -> out (the same index relation read backwards); it
is accumulated as a scatter, each output row adding its weighted taps onto the input rows it
read.

im2col + GEMM would spend on this a batch of C tiny (1 x kh*kw) GEMMs per sample; here every
(n, c) plane is one task of plain loops. For each tap column v the range of output columns
whose tap reads inside the input is computed once per call (:func:`window.valid_range`), and
for each output row the range of tap rows u likewise, so the innermost loop runs over one
output row's valid stretch with no test for padding: contiguous in the output, stepping by sw
in the input, a loop LLVM vectorises. As in ``kernels/im2col.py`` the loops index 2-d views
(plane, element) with unsigned indices (numba tests signed ones for wraparound, which keeps a
loop from vectorising) and slice no views per row.

Accumulation. The forward and dx accumulate in x's dtype (float32 for float32), in a fixed
order: for each output row, its taps in ascending (u, v), starting from the bias (from 0 for
dx). dw accumulates in float64: for each (c, u, v) a float64 row of OW partial sums collects
the products g * x of every sample and output row (elementwise, so it vectorises and the order
is fixed), and the row is summed at the end; the float32 products are exact in float64, so dw
is the exact sum to within float64 rounding, then rounded once to x's dtype. None of the
results depends on the driver (serial or parallel) or on the number of threads.

Drivers. The forward and dx run over the N*C planes, dw over the C channels (each owns its
partial sums: no two tasks write the same element). Each has a serial and a numba-parallel
driver; the parallel one runs only when a call has at least ``PARALLEL_MIN_MACS`` multiply-adds.
In a network the depthwise conv sits between two 1x1 convolutions, i.e. right after a BLAS
GEMM, and OpenBLAS's worker threads keep spinning for a while after one; a parallel region
started then waits for the cores, so small calls run serial (figures in docs/benchmarks.md,
"Measurements behind the code").

>>> import numpy as np
>>> x = np.arange(9.0).reshape(1, 1, 3, 3)
>>> w = np.ones((1, 1, 2, 2))
>>> depthwise_conv2d_forward(x, w, np.zeros(1), 1, 1, 0, 0, 1, 1)[0, 0]
array([[ 8., 12.],
       [20., 24.]])
>>> depthwise_conv2d_weight_grad(np.ones((1, 1, 2, 2)), x, 2, 2, 1, 1, 0, 0, 1, 1)[0, 0]
array([[ 8., 12.],
       [20., 24.]])
"""

import numpy as np
from numba import njit, prange

from .window import valid_range, window_geometry

__all__ = [
    "depthwise_conv2d_forward",
    "depthwise_conv2d_input_grad",
    "depthwise_conv2d_weight_grad",
    "PARALLEL_MIN_MACS",
]

# A call with at least this many multiply-adds (N*C*OH*OW*kh*kw) runs the parallel driver.
PARALLEL_MIN_MACS = 1 << 22


# ----------------------------------------------------------------------------- geometry


@njit(cache=True)
def _column_ranges(geometry):
    """For each tap column v: (lo, hi) such that output columns [lo, hi) read inside the input,
    and ``start``, the input column that output column lo reads (``lo*sw - pw + v*dw``)."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    ranges = np.empty((kw, 3), dtype=np.int64)
    for v in range(kw):
        offset = v * dw - pw
        lo, hi = valid_range(offset, sw, width, out_width)
        ranges[v, 0] = lo
        ranges[v, 1] = hi
        ranges[v, 2] = offset + lo * sw
    return ranges


# ----------------------------------------------------------------------------- one plane


@njit(cache=True)
def _forward_plane(plane, channel, x2, weight2, bias, out2, columns, geometry):
    """Output plane ``plane`` (channel ``channel``): every row starts at the bias and adds its
    valid taps in ascending (u, v)."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    stride = np.uintp(sw)
    for oh in range(out_height):
        row = oh * out_width
        start = bias[channel]
        for k in range(np.uintp(out_width)):
            out2[plane, np.uintp(row) + k] = start
        first = oh * sh - ph
        u_lo, u_hi = valid_range(first, dh, height, kh)
        for u in range(u_lo, u_hi):
            input_row = (first + u * dh) * width
            for v in range(kw):
                tap = weight2[channel, u * kw + v]
                count = np.uintp(columns[v, 1] - columns[v, 0])
                target = np.uintp(row + columns[v, 0])
                source = np.uintp(input_row + columns[v, 2])
                if sw == 1:
                    for k in range(count):
                        out2[plane, target + k] += tap * x2[plane, source + k]
                else:
                    for k in range(count):
                        out2[plane, target + k] += tap * x2[plane, source + k * stride]


@njit(cache=True)
def _input_grad_plane(plane, channel, grad2, weight2, x_grad2, columns, geometry):
    """Scatter every row of gradient plane ``plane`` onto the zeroed input-gradient plane, taps in
    ascending (u, v) for each output row in turn."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    stride = np.uintp(sw)
    for oh in range(out_height):
        row = oh * out_width
        first = oh * sh - ph
        u_lo, u_hi = valid_range(first, dh, height, kh)
        for u in range(u_lo, u_hi):
            input_row = (first + u * dh) * width
            for v in range(kw):
                tap = weight2[channel, u * kw + v]
                count = np.uintp(columns[v, 1] - columns[v, 0])
                source = np.uintp(row + columns[v, 0])
                target = np.uintp(input_row + columns[v, 2])
                if sw == 1:
                    for k in range(count):
                        x_grad2[plane, target + k] += tap * grad2[plane, source + k]
                else:
                    for k in range(count):
                        x_grad2[plane, target + k * stride] += tap * grad2[plane, source + k]


@njit(cache=True)
def _weight_grad_channel(channel, channels, grad2, x2, partial3, columns, geometry):
    """partial3[channel, u*kw + v, j] += g * x in float64 over every sample and output row, for
    the output columns j where tap (u, v) reads inside the input."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    stride = np.uintp(sw)
    batch = grad2.shape[0] // channels
    for n in range(batch):
        plane = n * channels + channel
        for oh in range(out_height):
            row = oh * out_width
            first = oh * sh - ph
            u_lo, u_hi = valid_range(first, dh, height, kh)
            for u in range(u_lo, u_hi):
                input_row = (first + u * dh) * width
                for v in range(kw):
                    tap = u * kw + v
                    lo = np.uintp(columns[v, 0])
                    count = np.uintp(columns[v, 1] - columns[v, 0])
                    source = np.uintp(row + columns[v, 0])
                    element = np.uintp(input_row + columns[v, 2])
                    # np.float64(): float64 under the jit and in plain Python alike
                    if sw == 1:
                        for k in range(count):
                            partial3[channel, tap, lo + k] += (np.float64(grad2[plane, source + k])
                                                               * np.float64(x2[plane, element + k]))
                    else:
                        for k in range(count):
                            partial3[channel, tap, lo + k] += (np.float64(grad2[plane, source + k])
                                                               * np.float64(x2[plane, element + k * stride]))


# ----------------------------------------------------------------------------- drivers
# Two drivers per pass, the same tasks in the same order: separate function objects so the
# parallel and serial compilations have separate caches. (prange hands out uint64 indices;
# mixed with int64, numba would promote the index arithmetic to float64.)


@njit(cache=True, parallel=True)
def _forward_parallel(x2, weight2, bias, out2, geometry):
    columns = _column_ranges(geometry)
    channels = weight2.shape[0]
    for task in prange(x2.shape[0]):
        plane = np.int64(task)
        _forward_plane(plane, plane % channels, x2, weight2, bias, out2, columns, geometry)


@njit(cache=True)
def _forward_serial(x2, weight2, bias, out2, geometry):
    columns = _column_ranges(geometry)
    channels = weight2.shape[0]
    for plane in range(x2.shape[0]):
        _forward_plane(plane, plane % channels, x2, weight2, bias, out2, columns, geometry)


@njit(cache=True, parallel=True)
def _input_grad_parallel(grad2, weight2, x_grad2, geometry):
    columns = _column_ranges(geometry)
    channels = weight2.shape[0]
    for task in prange(grad2.shape[0]):
        plane = np.int64(task)
        _input_grad_plane(plane, plane % channels, grad2, weight2, x_grad2, columns, geometry)


@njit(cache=True)
def _input_grad_serial(grad2, weight2, x_grad2, geometry):
    columns = _column_ranges(geometry)
    channels = weight2.shape[0]
    for plane in range(grad2.shape[0]):
        _input_grad_plane(plane, plane % channels, grad2, weight2, x_grad2, columns, geometry)


@njit(cache=True, parallel=True)
def _weight_grad_parallel(grad2, x2, partial3, geometry):
    columns = _column_ranges(geometry)
    channels = partial3.shape[0]
    for task in prange(channels):
        _weight_grad_channel(np.int64(task), channels, grad2, x2, partial3, columns, geometry)


@njit(cache=True)
def _weight_grad_serial(grad2, x2, partial3, geometry):
    columns = _column_ranges(geometry)
    channels = partial3.shape[0]
    for channel in range(channels):
        _weight_grad_channel(channel, channels, grad2, x2, partial3, columns, geometry)


def _parallel(planes, geometry):
    """Whether a pass over ``planes`` planes of this geometry has enough work for the parallel driver."""
    kh, kw = geometry[2], geometry[3]
    out_height, out_width = geometry[-2:]
    return planes * out_height * out_width * kh * kw >= PARALLEL_MIN_MACS


# ----------------------------------------------------------------------------- public


def depthwise_conv2d_forward(x, weight, bias, sh, sw, ph, pw, dh, dw):
    """out = depthwise conv2d of x with weight, plus bias: the formula in the module docstring.

    Args:
        x: C-contiguous float32 or float64 array (N, C, H, W).
        weight: C-contiguous array (C, 1, kh, kw) of x's dtype.
        bias: C-contiguous array (C,) of x's dtype (zeros for a layer without bias).
        sh, sw: stride (>= 1); ph, pw: zero padding on both sides (>= 0); dh, dw: dilation (>= 1).

    Returns:
        out, a new array of x's dtype, shape (N, C, OH, OW).

    Preconditions, checked by the caller and not here: the ranges above, OH >= 1 and OW >= 1.
    """
    batch, channels, height, width = x.shape
    kh, kw = weight.shape[2:]
    geometry = window_geometry(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    out_height, out_width = geometry[-2:]
    out = np.empty((batch, channels, out_height, out_width), dtype=x.dtype)
    arguments = (x.reshape(batch * channels, height * width), weight.reshape(channels, kh * kw), bias,
                 out.reshape(batch * channels, out_height * out_width), geometry)
    if _parallel(batch * channels, geometry):
        _forward_parallel(*arguments)
    else:
        _forward_serial(*arguments)
    return out


def depthwise_conv2d_input_grad(grad, weight, H, W, sh, sw, ph, pw, dh, dw):
    """dx, the gradient of the forward with respect to x (its adjoint applied to ``grad``).

    Args:
        grad: C-contiguous float32 or float64 array (N, C, OH, OW), the gradient of the output.
        weight: C-contiguous array (C, 1, kh, kw) of grad's dtype.
        H, W: the input's height and width.
        sh, sw, ph, pw, dh, dw: stride, padding and dilation, as in the forward.

    Returns:
        dx, a new array of grad's dtype, shape (N, C, H, W) (the formula in the module docstring).
    """
    batch, channels, out_height, out_width = grad.shape
    kh, kw = weight.shape[2:]
    geometry = window_geometry(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    x_grad = np.zeros((batch, channels, H, W), dtype=grad.dtype)
    arguments = (grad.reshape(batch * channels, out_height * out_width), weight.reshape(channels, kh * kw),
                 x_grad.reshape(batch * channels, H * W), geometry)
    if _parallel(batch * channels, geometry):
        _input_grad_parallel(*arguments)
    else:
        _input_grad_serial(*arguments)
    return x_grad


def depthwise_conv2d_weight_grad(grad, x, kh, kw, sh, sw, ph, pw, dh, dw):
    """dw, the gradient of the forward with respect to the weight, summed in float64.

    Args:
        grad: C-contiguous float32 or float64 array (N, C, OH, OW), the gradient of the output.
        x: C-contiguous array (N, C, H, W) of grad's dtype, the forward's input.
        kh, kw: the kernel size; sh, sw, ph, pw, dh, dw: stride, padding and dilation.

    Returns:
        dw, a new array of grad's dtype, shape (C, 1, kh, kw) (the formula in the module docstring).
    """
    batch, channels, height, width = x.shape
    geometry = window_geometry(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    out_height, out_width = geometry[-2:]
    partial = np.zeros((channels, kh * kw, out_width), dtype=np.float64)
    arguments = (grad.reshape(batch * channels, out_height * out_width), x.reshape(batch * channels, height * width),
                 partial, geometry)
    if _parallel(batch * channels, geometry):
        _weight_grad_parallel(*arguments)
    else:
        _weight_grad_serial(*arguments)
    return partial.sum(axis=2).astype(grad.dtype).reshape(channels, 1, kh, kw)
