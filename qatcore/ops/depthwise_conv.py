"""Depthwise 2-D convolution primitive (groups == C == K): direct numba loops,
``qatcore.kernels.depthwise_conv``, instead of :class:`~qatcore.ops.conv.Conv2d`'s im2col and
a batch of C one-row GEMMs.

With x of shape (N, C, H, W), weight (C, 1, kh, kw), stride (sh, sw), padding (ph, pw) and
dilation (dh, dw):

    out[n, c, i, j] = bias[c] + sum_{u, v} weight[c, 0, u, v] * x[n, c, i*sh - ph + u*dh, j*sw - pw + v*dw]

(zero where x is read in the padding). It is linear in x and in the weight, so

    dx[n, c, h, w]       = sum of weight[c, 0, u, v] * g[n, c, i, j] over the (u, v, i, j) that read x[n, c, h, w]
    dweight[c, 0, u, v]  = sum_{n, i, j} g[n, c, i, j] * x[n, c, i*sh - ph + u*dh, j*sw - pw + v*dw]
    dbias[c]             = sum_{n, i, j} g[n, c, i, j]

:func:`qatcore.nn.functional.conv2d` routes a depthwise call here; the result is the same
convolution as ``Conv2d`` up to float rounding (the order of the kh*kw products differs, and
dweight is summed in float64).

>>> import numpy as np
>>> import qatcore
>>> x = qatcore.tensor(np.ones((1, 2, 3, 3)), requires_grad=True)
>>> w = qatcore.tensor(np.ones((2, 1, 3, 3)), requires_grad=True)
>>> out = DepthwiseConv2d.apply(x, w, None, stride=(1, 1), padding=(1, 1), dilation=(1, 1))
>>> out.numpy()[0, 0]
array([[4., 6., 4.],
       [6., 9., 6.],
       [4., 6., 4.]])
>>> out.sum().backward()
>>> w.grad[0, 0]
array([[4., 6., 4.],
       [6., 9., 6.],
       [4., 6., 4.]])
"""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.autograd.function import Function

__all__ = ["DepthwiseConv2d"]


class DepthwiseConv2d(Function):
    """out = depthwise conv2d(x, weight) + bias; dx, dweight and dbias as in the module docstring."""

    def forward(self, x, weight, bias, stride, padding, dilation):
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        if not kernels.layout.is_channel_major(x):  # the kernels read a channel-major x as it is
            x = np.ascontiguousarray(x)
        weight = np.ascontiguousarray(weight)
        channels = x.shape[1]
        bias = np.zeros(channels, x.dtype) if bias is None else np.ascontiguousarray(bias, dtype=x.dtype)
        out = kernels.depthwise_conv.depthwise_conv2d_forward(x, weight, bias, sh, sw, ph, pw, dh, dw)
        if self.needs_input_grad[1]:
            self.x = x
        if self.needs_input_grad[0]:
            self.weight = weight
        self.geometry = (x.shape, weight.shape, (sh, sw, ph, pw, dh, dw))
        return out

    def backward(self, g):
        (n, c, h, w), (_, _, kh, kw), window = self.geometry
        if not kernels.layout.is_channel_major(g):
            g = np.ascontiguousarray(g)
        dx = dweight = dbias = None
        if self.needs_input_grad[2]:
            dbias = g.reshape(n, c, -1).sum(axis=(0, 2))
        if self.needs_input_grad[1]:
            dweight = kernels.depthwise_conv.depthwise_conv2d_weight_grad(
                g.astype(self.x.dtype, copy=False), self.x, kh, kw, *window)
        if self.needs_input_grad[0]:
            dx = kernels.depthwise_conv.depthwise_conv2d_input_grad(
                g.astype(self.weight.dtype, copy=False), self.weight, h, w, *window)
        return dx, dweight, dbias
