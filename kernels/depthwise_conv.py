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
is accumulated as a scatter, each tap adding its weighted gradient onto the input elements it
read.

im2col + GEMM would spend on this a batch of C tiny (1 x kh*kw) GEMMs per sample; here every
(n, c) plane is computed by plain loops, which must be long to be fast: MobileNetV2's late
planes are 8x8 and 4x4, and a loop per output row and tap would run over 4 elements. So each
plane is laid out flat where every tap is one long contiguous loop:

* the zero-padded plane (Hp = H + 2*ph rows of Wp = W + 2*pw) is split into sh*sw phases,
  phase (a, b) holding the padded elements (r*sh + a, q*sw + b) at row r, column q of a
  ceil(Hp/sh) x ceil(Wp/sw) block (for stride 1 that is the padded plane itself); the blocks
  sit one after the other in a buffer ``xp``, with a zero tail;
* the outputs are computed on a grid of OH rows of Q = ceil(Wp/sw) >= OW columns, flattened:
  grid point k = i*Q + j reads, for tap (u, v), ``xp[k + offset(u, v)]``, where the offset
  selects phase (u*dh % sh, v*dw % sw), row u*dh // sh and column v*dw // sw. For j < OW that is
  padded element (i*sh + u*dh, j*sw + v*dw), the one of the formula above; the columns j >= OW
  are scratch, read past their row's end and never used;
* so the forward is, per tap, ``y[k] += w[u, v] * xp[k + offset(u, v)]`` over the whole grid, one
  contiguous loop that LLVM vectorises, whatever the stride; dx is the same loop as a scatter,
  ``dxp[k + offset(u, v)] += w[u, v] * gq[k]``, from the gradient placed on the grid with zeros
  in its scratch columns (each tap writes distinct elements of ``dxp``), and is then read back
  from the phases.

The scratch columns cost Q/OW - 1 extra work (25% on an 8x8 output with padding 1, 12% on 8x8
at stride 2). The copies into and out of the buffers are small next to the kh*kw passes. The
buffers come from NumPy, one per task, allocated once per call.

Accumulation. The forward and dx accumulate in x's dtype (float32 for float32), in a fixed
order: each output starts from the bias (dx elements from 0) and adds its taps in ascending
(u, v) (a dx element receives at most one term per tap). dw accumulates in float64: for each
(c, u, v) a float64 grid of partial sums collects the products g * x of every sample
(elementwise, so it vectorises and its order is fixed), then its OH x OW valid points are
summed in row-major order; the float32 products are exact in float64, so dw is the exact sum
to within float64 rounding, rounded once to x's dtype. No result depends on the driver (serial
or parallel) or on the number of tasks. Non-finite values: the padding is read as zeros and
multiplied by the weight, as im2col + GEMM does, and dx's scratch columns multiply the weight
by 0 too, so a weight of +-inf gives NaN there; x's values never reach a result they do not
belong to (the forward and dw drop the scratch columns).

Drivers. The forward and dx run over the N*C planes, dw over the C channels (a task owns whole
channels, so no two tasks write the same element), in chunks of consecutive planes or channels
that each have their own scratch buffers. Each pass has a serial and a numba-parallel driver;
the parallel one runs only when a call has at least ``PARALLEL_MIN_MACS`` multiply-adds. In a
network the depthwise conv sits between two 1x1 convolutions, i.e. right after a BLAS GEMM, and
OpenBLAS's worker threads keep spinning for a while after one; a parallel region started then
waits for the cores, so small calls run serial (figures in docs/benchmarks.md, "Measurements
behind the code"; ``benchmarks/bench_depthwise_conv.py`` measures both drivers).

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


import numba
import numpy as np
from numba import njit, prange

from . import layout as memory_layout
from .window import window_geometry

__all__ = [
    "depthwise_conv2d_forward",
    "depthwise_conv2d_input_grad",
    "depthwise_conv2d_weight_grad",
    "PARALLEL_MIN_MACS",
]

# A call with at least this many multiply-adds (N*C*OH*OW*kh*kw) runs the parallel driver. Set
# above every depthwise layer of MobileNetV2 at batch 64 (the largest has 85M): next to
# OpenBLAS's threads, on a shared machine, the parallel driver was not reliably faster on any.
PARALLEL_MIN_MACS = 1 << 27
# Tasks per numba thread in the parallel driver: a few, so that uneven progress evens out.
_TASKS_PER_THREAD = 4


# ----------------------------------------------------------------------------- layout


class _Layout:
    """The phase buffer and the output grid of one call (module docstring), as the integer tuple
    ``loop`` the jitted loops take, and ``offsets[u*kw + v]``, where grid point k of tap (u, v)
    reads the buffer: phase (u*dh % sh, v*dw % sw), row u*dh // sh, column v*dw // sw."""

    def __init__(self, height, width, kh, kw, sh, sw, ph, pw, dh, dw):
        geometry = window_geometry(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
        self.out_height, self.out_width = geometry[-2:]
        phase_height = -(-(height + 2 * ph) // sh)
        phase_width = -(-(width + 2 * pw) // sw)
        phase_size = phase_height * phase_width
        offsets = [((u * dh % sh) * sw + v * dw % sw) * phase_size + (u * dh // sh) * phase_width + v * dw // sw
                   for u in range(kh) for v in range(kw)]
        self.grid_length = self.out_height * phase_width
        # the scratch points of the last taps read past the last phase: a zero tail holds them
        self.buffer_length = max(sh * sw * phase_size, self.grid_length + max(offsets))
        self.offsets = np.array(offsets, dtype=np.uintp)
        self.loop = (height, width, ph, pw, sh, sw, phase_height, phase_width, self.out_height, self.out_width,
                     self.grid_length)
        self.taps = kh * kw

    def macs(self, planes):
        return planes * self.out_height * self.out_width * self.taps


def _tasks(items, macs):
    """How many tasks to cut ``items`` planes or channels into: 1 (the serial driver) below
    ``PARALLEL_MIN_MACS``."""
    if macs < PARALLEL_MIN_MACS:
        return 1
    return max(1, min(items, _TASKS_PER_THREAD * numba.get_num_threads()))


# ----------------------------------------------------------------------------- buffers


@njit(cache=True)
def _phase_runs(h, b, loop):
    """Input row h's elements of column phase b: (count, first, start): the ``count`` elements
    from column ``first`` on, sw apart, go to the buffer from ``start`` on, contiguous."""
    height, width, ph, pw, sh, sw, phase_height, phase_width = loop[:8]
    row = h + ph
    first = (b - pw) % sw
    count = max(0, (width - first + sw - 1) // sw)
    start = ((row % sh) * sw + b) * phase_height * phase_width + (row // sh) * phase_width + (first + pw) // sw
    return np.uintp(count), np.uintp(first), np.uintp(start)


@njit(cache=True)
def _pad_plane(x2, plane, xp, task, loop):
    """Copy plane ``plane`` of x into its places in the phase buffer ``xp[task]`` (the padding
    and the tail stay zero)."""
    height, width, sw = loop[0], loop[1], loop[5]
    stride = np.uintp(sw)
    for h in range(height):
        row = np.uintp(h * width)
        for b in range(sw):
            count, first, start = _phase_runs(h, b, loop)
            source = row + first
            if sw == 1:  # a contiguous copy, which LLVM vectorises
                for k in range(count):
                    xp[task, start + k] = x2[plane, source + k]
            else:
                for k in range(count):
                    xp[task, start + k] = x2[plane, source + k * stride]


@njit(cache=True)
def _unpad_plane(xp, task, x2, plane, loop):
    """The inverse of :func:`_pad_plane`: plane ``plane`` of x2 from its places in ``xp[task]``."""
    height, width, sw = loop[0], loop[1], loop[5]
    stride = np.uintp(sw)
    for h in range(height):
        row = np.uintp(h * width)
        for b in range(sw):
            count, first, start = _phase_runs(h, b, loop)
            target = row + first
            if sw == 1:
                for k in range(count):
                    x2[plane, target + k] = xp[task, start + k]
            else:
                for k in range(count):
                    x2[plane, target + k * stride] = xp[task, start + k]


@njit(cache=True)
def _grid_plane(grad2, plane, gq, task, loop):
    """Place plane ``plane`` of the output gradient on the grid ``gq[task]`` (its scratch
    columns stay zero)."""
    phase_width, out_height, out_width = loop[7], loop[8], loop[9]
    for i in range(out_height):
        source = np.uintp(i * out_width)
        target = np.uintp(i * phase_width)
        for k in range(np.uintp(out_width)):
            gq[task, target + k] = grad2[plane, source + k]


# ----------------------------------------------------------------------------- one plane


@njit(cache=True)
def _forward_plane(plane, channel, x2, weight2, bias, out2, xp, y, task, offsets, loop):
    """Output plane ``plane`` (of channel ``channel``): the grid starts at the bias and adds
    its taps in ascending (u, v); its valid columns are copied out."""
    phase_width, out_height, out_width, grid_length = loop[7], loop[8], loop[9], loop[10]
    length = np.uintp(grid_length)
    _pad_plane(x2, plane, xp, task, loop)
    start = bias[channel]
    for k in range(length):
        y[task, k] = start
    for tap in range(offsets.size):
        weight = weight2[channel, tap]
        offset = offsets[tap]
        for k in range(length):
            y[task, k] += weight * xp[task, offset + k]
    for i in range(out_height):
        source = np.uintp(i * phase_width)
        target = np.uintp(i * out_width)
        for k in range(np.uintp(out_width)):
            out2[plane, target + k] = y[task, source + k]


@njit(cache=True)
def _input_grad_plane(plane, channel, grad2, weight2, x_grad2, gq, dxp, task, offsets, loop):
    """Input-gradient plane ``plane``: the gradient's grid scattered tap by tap, in ascending
    (u, v), onto the zeroed phase buffer, from whose places the plane is copied out."""
    length = np.uintp(loop[10])
    _grid_plane(grad2, plane, gq, task, loop)
    for k in range(np.uintp(dxp.shape[1])):
        dxp[task, k] = 0
    for tap in range(offsets.size):
        weight = weight2[channel, tap]
        offset = offsets[tap]
        for k in range(length):
            dxp[task, offset + k] += weight * gq[task, k]
    _unpad_plane(dxp, task, x_grad2, plane, loop)


@njit(cache=True)
def _weight_grad_channel(channel, strides, grad2, x2, weight_grad, xp, gq, partial, task, offsets, loop):
    """weight_grad[channel, u*kw + v]: the float64 products g * x of every sample summed per
    grid point, then the valid grid points summed in row-major order."""
    phase_width, out_height, out_width, grid_length = loop[7], loop[8], loop[9], loop[10]
    length = np.uintp(grid_length)
    for tap in range(offsets.size):
        for k in range(length):
            partial[task, tap, k] = 0.0
    sample_stride, channel_stride = strides
    batch = grad2.shape[0] // weight_grad.shape[0]
    for n in range(batch):
        plane = n * sample_stride + channel * channel_stride
        _pad_plane(x2, plane, xp, task, loop)
        _grid_plane(grad2, plane, gq, task, loop)
        for tap in range(offsets.size):
            offset = offsets[tap]
            # np.float64(): float64 under the jit and in plain Python alike
            for k in range(length):
                partial[task, tap, k] += np.float64(gq[task, k]) * np.float64(xp[task, offset + k])
    for tap in range(offsets.size):
        total = 0.0
        for i in range(out_height):
            row = np.uintp(i * phase_width)
            for k in range(np.uintp(out_width)):
                total += partial[task, tap, row + k]
        weight_grad[channel, tap] = total


# ----------------------------------------------------------------------------- drivers
# Two drivers per pass, the same work per plane or channel: separate function objects so the
# parallel and serial compilations have separate caches. A task covers the consecutive items
# [task*chunk, (task + 1)*chunk). (prange hands out uint64 indices; mixed with int64, numba
# would promote the index arithmetic to float64.) Plane n*sample_stride + c*channel_stride is
# sample n's channel c: strides (C, 1) for a C-contiguous array, (1, N) for a channel-major one.


@njit(cache=True, parallel=True)
def _forward_parallel(x2, weight2, bias, out2, xp, y, offsets, loop, strides):
    tasks, planes, channels = xp.shape[0], x2.shape[0], weight2.shape[0]
    chunk = (planes + tasks - 1) // tasks
    for each in prange(tasks):
        task = np.int64(each)
        for plane in range(task * chunk, min(planes, (task + 1) * chunk)):
            _forward_plane(plane, plane // strides[1] % channels, x2, weight2, bias, out2, xp, y, task, offsets, loop)


@njit(cache=True)
def _forward_serial(x2, weight2, bias, out2, xp, y, offsets, loop, strides):
    tasks, planes, channels = xp.shape[0], x2.shape[0], weight2.shape[0]
    chunk = (planes + tasks - 1) // tasks
    for task in range(tasks):
        for plane in range(task * chunk, min(planes, (task + 1) * chunk)):
            _forward_plane(plane, plane // strides[1] % channels, x2, weight2, bias, out2, xp, y, task, offsets, loop)


@njit(cache=True, parallel=True)
def _input_grad_parallel(grad2, weight2, x_grad2, gq, dxp, offsets, loop, strides):
    tasks, planes, channels = gq.shape[0], grad2.shape[0], weight2.shape[0]
    chunk = (planes + tasks - 1) // tasks
    for each in prange(tasks):
        task = np.int64(each)
        for plane in range(task * chunk, min(planes, (task + 1) * chunk)):
            _input_grad_plane(plane, plane // strides[1] % channels, grad2, weight2, x_grad2, gq, dxp, task, offsets,
                              loop)


@njit(cache=True)
def _input_grad_serial(grad2, weight2, x_grad2, gq, dxp, offsets, loop, strides):
    tasks, planes, channels = gq.shape[0], grad2.shape[0], weight2.shape[0]
    chunk = (planes + tasks - 1) // tasks
    for task in range(tasks):
        for plane in range(task * chunk, min(planes, (task + 1) * chunk)):
            _input_grad_plane(plane, plane // strides[1] % channels, grad2, weight2, x_grad2, gq, dxp, task, offsets,
                              loop)


@njit(cache=True, parallel=True)
def _weight_grad_parallel(grad2, x2, weight_grad, xp, gq, partial, offsets, loop, strides):
    tasks, channels = xp.shape[0], weight_grad.shape[0]
    chunk = (channels + tasks - 1) // tasks
    for each in prange(tasks):
        task = np.int64(each)
        for channel in range(task * chunk, min(channels, (task + 1) * chunk)):
            _weight_grad_channel(channel, strides, grad2, x2, weight_grad, xp, gq, partial, task, offsets, loop)


@njit(cache=True)
def _weight_grad_serial(grad2, x2, weight_grad, xp, gq, partial, offsets, loop, strides):
    tasks, channels = xp.shape[0], weight_grad.shape[0]
    chunk = (channels + tasks - 1) // tasks
    for task in range(tasks):
        for channel in range(task * chunk, min(channels, (task + 1) * chunk)):
            _weight_grad_channel(channel, strides, grad2, x2, weight_grad, xp, gq, partial, task, offsets, loop)


# ----------------------------------------------------------------------------- public


def _strides(batch, channels, channel_major):
    """(sample_stride, channel_stride) of the planes (the comment above the drivers)."""
    return (1, batch) if channel_major else (channels, 1)


def _in_layout(a, channel_major):
    """a's values in the given layout (a copy unless a is in it already)."""
    if channel_major:
        return np.ascontiguousarray(a.swapaxes(0, 1)).swapaxes(0, 1)
    return np.ascontiguousarray(a)


def depthwise_conv2d_forward(x, weight, bias, sh, sw, ph, pw, dh, dw):
    """out = depthwise conv2d of x with weight, plus bias: the formula in the module docstring.

    Args:
        x: float32 or float64 array (N, C, H, W), C-contiguous or channel-major (``kernels.layout``).
        weight: C-contiguous array (C, 1, kh, kw) of x's dtype.
        bias: C-contiguous array (C,) of x's dtype (zeros for a layer without bias).
        sh, sw: stride (>= 1); ph, pw: zero padding on both sides (>= 0); dh, dw: dilation (>= 1).

    Returns:
        out, a new array of x's dtype, shape (N, C, OH, OW), in x's layout.

    Preconditions, checked by the caller and not here: the ranges above, OH >= 1 and OW >= 1.
    """
    batch, channels, height, width = x.shape
    kh, kw = weight.shape[2:]
    layout = _Layout(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    planes = batch * channels
    x2, channel_major = memory_layout.planes(x)
    out = memory_layout.empty((batch, channels, layout.out_height, layout.out_width), x.dtype, channel_major)
    tasks = _tasks(planes, layout.macs(planes))
    xp = np.zeros((tasks, layout.buffer_length), dtype=x.dtype)
    y = np.empty((tasks, layout.grid_length), dtype=x.dtype)
    driver = _forward_serial if tasks == 1 else _forward_parallel
    driver(x2, weight.reshape(channels, kh * kw), bias, memory_layout.planes(out)[0],
           xp, y, layout.offsets, layout.loop, _strides(batch, channels, channel_major))
    return out


def depthwise_conv2d_input_grad(grad, weight, H, W, sh, sw, ph, pw, dh, dw):
    """dx, the gradient of the forward with respect to x (its adjoint applied to ``grad``).

    Args:
        grad: float32 or float64 array (N, C, OH, OW), the gradient of the output, C-contiguous
            or channel-major.
        weight: C-contiguous array (C, 1, kh, kw) of grad's dtype.
        H, W: the input's height and width.
        sh, sw, ph, pw, dh, dw: stride, padding and dilation, as in the forward.

    Returns:
        dx, a new array of grad's dtype, shape (N, C, H, W) (the formula in the module docstring),
        in grad's layout.
    """
    batch, channels = grad.shape[:2]
    kh, kw = weight.shape[2:]
    layout = _Layout(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    planes = batch * channels
    grad2, channel_major = memory_layout.planes(grad)
    x_grad = memory_layout.empty((batch, channels, H, W), grad.dtype, channel_major)
    tasks = _tasks(planes, layout.macs(planes))
    gq = np.zeros((tasks, layout.grid_length), dtype=grad.dtype)
    dxp = np.empty((tasks, layout.buffer_length), dtype=grad.dtype)
    driver = _input_grad_serial if tasks == 1 else _input_grad_parallel
    driver(grad2, weight.reshape(channels, kh * kw), memory_layout.planes(x_grad)[0], gq, dxp,
           layout.offsets, layout.loop, _strides(batch, channels, channel_major))
    return x_grad


def depthwise_conv2d_weight_grad(grad, x, kh, kw, sh, sw, ph, pw, dh, dw):
    """dw, the gradient of the forward with respect to the weight, summed in float64.

    Args:
        grad: float32 or float64 array (N, C, OH, OW), the gradient of the output.
        x: array (N, C, H, W) of grad's dtype, the forward's input; each of the two C-contiguous
            or channel-major (grad is copied into x's layout when they differ).
        kh, kw: the kernel size; sh, sw, ph, pw, dh, dw: stride, padding and dilation.

    Returns:
        dw, a new array of grad's dtype, shape (C, 1, kh, kw) (the formula in the module docstring).
    """
    batch, channels, height, width = x.shape
    layout = _Layout(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    planes = batch * channels
    x2, channel_major = memory_layout.planes(x)
    grad2, grad_channel_major = memory_layout.planes(grad)
    if grad_channel_major != channel_major:
        grad2 = memory_layout.planes(_in_layout(grad, channel_major))[0]
    tasks = _tasks(channels, layout.macs(planes))
    weight_grad = np.empty((channels, kh * kw), dtype=np.float64)
    xp = np.zeros((tasks, layout.buffer_length), dtype=x.dtype)
    gq = np.zeros((tasks, layout.grid_length), dtype=grad.dtype)
    partial = np.empty((tasks, kh * kw, layout.grid_length), dtype=np.float64)
    driver = _weight_grad_serial if tasks == 1 else _weight_grad_parallel
    driver(grad2, x2, weight_grad, xp, gq, partial, layout.offsets, layout.loop,
           _strides(batch, channels, channel_major))
    return weight_grad.astype(grad.dtype).reshape(channels, 1, kh, kw)
