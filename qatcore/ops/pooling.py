"""Pooling primitives over (N, C, H, W), numba kernels in ``qatcore.kernels.pooling``.

The kernels pool each (H, W) plane on its own, so a channel-major x (``kernels.layout``) is
pooled as the C-contiguous (C, N, H, W) array it is in memory, and its result is channel-major
too: no copy either way."""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.autograd.function import Function

__all__ = ["MaxPool2d", "AvgPool2d"]


def _planes_in_memory_order(x):
    """(planes, swapped): x as a C-contiguous 4-d array of its planes; for a channel-major x
    that is x with axes 0 and 1 exchanged (swapped True), and the result is swapped back."""
    if kernels.layout.is_channel_major(x):
        return x.swapaxes(0, 1), True
    return np.ascontiguousarray(x), False


def _as_input_layout(a, swapped):
    return a.swapaxes(0, 1) if swapped else a


def _like(g, swapped):
    """The output gradient in the planes' order the forward pass used."""
    return np.ascontiguousarray(g.swapaxes(0, 1) if swapped else g)


class MaxPool2d(Function):
    """out[n, c, i, j] = max over the window of x (padding counts as -inf);
    dx = g routed to the element that was the maximum (first one on ties)."""

    def forward(self, x, kernel_size, stride, padding, dilation):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
        planes, self.swapped = _planes_in_memory_order(x)
        out, self.argmax = kernels.pooling.max_pool2d_forward(planes, kh, kw, sh, sw, ph, pw, dh, dw)
        self.in_hw = x.shape[2:]
        return _as_input_layout(out, self.swapped)

    def backward(self, g):
        h, w = self.in_hw
        dx = kernels.pooling.max_pool2d_backward(_like(g, self.swapped), self.argmax, h, w)
        return (_as_input_layout(dx, self.swapped),)


class AvgPool2d(Function):
    """out[n, c, i, j] = mean over the window of x (divisor: the window size, or the
    count of real, non-padding elements when count_include_pad is False);
    dx = g / divisor spread over the window."""

    def forward(self, x, kernel_size, stride, padding, count_include_pad):
        (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
        self.params = (x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw, count_include_pad)
        planes, self.swapped = _planes_in_memory_order(x)
        out = kernels.pooling.avg_pool2d_forward(planes, kh, kw, sh, sw, ph, pw, count_include_pad)
        return _as_input_layout(out, self.swapped)

    def backward(self, g):
        dx = kernels.pooling.avg_pool2d_backward(_like(g, self.swapped), *self.params)
        return (_as_input_layout(dx, self.swapped),)
