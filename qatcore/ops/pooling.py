"""Pooling primitives over (N, C, H, W), numba kernels in ``qatcore.kernels.pooling``."""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.autograd.function import Function

__all__ = ["MaxPool2d", "AvgPool2d"]


class MaxPool2d(Function):
    """out[n, c, i, j] = max over the window of x (padding counts as -inf);
    dx = g routed to the element that was the maximum (first one on ties)."""

    def forward(self, x, kernel_size, stride, padding, dilation):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
        out, self.argmax = kernels.pooling.max_pool2d_forward(
            np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, dh, dw
        )
        self.in_hw = x.shape[2:]
        return out

    def backward(self, g):
        h, w = self.in_hw
        return (kernels.pooling.max_pool2d_backward(np.ascontiguousarray(g), self.argmax, h, w),)


class AvgPool2d(Function):
    """out[n, c, i, j] = mean over the window of x (divisor: the window size, or the
    count of real, non-padding elements when count_include_pad is False);
    dx = g / divisor spread over the window."""

    def forward(self, x, kernel_size, stride, padding, count_include_pad):
        (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
        self.params = (x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw, count_include_pad)
        return kernels.pooling.avg_pool2d_forward(
            np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, count_include_pad
        )

    def backward(self, g):
        return (kernels.pooling.avg_pool2d_backward(np.ascontiguousarray(g), *self.params),)
