"""Batch normalization primitive (forward and backward fused for speed).

With per-channel statistics over every axis but the channel axis 1
(m = number of elements per channel):

    training:  mu = mean(x),  var = mean((x - mu)^2)       (biased, used to normalize)
               running_mean <- (1 - momentum) * running_mean + momentum * mu
               running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)
    eval:      mu = running_mean,  var = running_var
    xhat = (x - mu) / sqrt(var + eps);   out = gamma * xhat + beta

Backward (training; the batch statistics depend on x):

    dxhat = g * gamma
    dx    = (1 / sqrt(var + eps)) * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

and in eval simply dx = dxhat / sqrt(var + eps).  dgamma = sum(g * xhat), dbeta = sum(g).
"""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.autograd.function import Function

__all__ = ["BatchNorm"]


def _as_batch_channel_inner(a, channel_major):
    """a as the (N', C, M') array the kernels take, without a copy for the two layouts of
    ``kernels.layout``: C-contiguous a is (N, C, M); channel-major a is (1, C, N*M), channel
    c's values one contiguous row, which is the same statistics and the same map. (A gradient
    in the other layout is copied into this one.)"""
    if channel_major:
        return kernels.layout.channel_rows(np.ascontiguousarray(a.swapaxes(0, 1)).swapaxes(0, 1))[None]
    return np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1)


def _restore(a3, shape, channel_major):
    """The kernels' (N', C, M') result in x's shape and layout."""
    if channel_major:
        return kernels.layout.from_channel_rows(a3[0], shape)
    return a3.reshape(shape)


class BatchNorm(Function):
    """Batch normalization over axis 1 of an (N, C, ...) array.

    Training mode runs the fused kernels of ``qatcore.kernels.batch_norm`` (one
    pass for the statistics, one for the normalization, one for each backward
    reduction); eval mode is a per-channel affine map in numpy.
    """

    def forward(self, x, weight, bias, running_mean, running_var, training, momentum, eps):
        n, c = x.shape[:2]
        dtype = x.dtype
        self.in_shape, self.training = x.shape, training
        self.weight = weight
        if training:
            self.channel_major = kernels.layout.is_channel_major(x)
            x3 = _as_batch_channel_inner(x, self.channel_major)
            gamma = np.ones(c, dtype) if weight is None else weight.astype(dtype, copy=False)
            beta = np.zeros(c, dtype) if bias is None else bias.astype(dtype, copy=False)
            out, self.mean, var, self.inv_std = kernels.batch_norm.batch_norm_train_forward(
                x3, gamma, beta, eps)
            self.x3 = x3
            m = x3.shape[0] * x3.shape[2]
            if running_mean is not None:
                running_mean *= 1 - momentum
                running_mean += (momentum * self.mean).astype(running_mean.dtype)
            if running_var is not None:
                running_var *= 1 - momentum
                running_var += (momentum * m / (m - 1) * var).astype(running_var.dtype)
            return _restore(out, x.shape, self.channel_major)
        shape = (1, c) + (1,) * (x.ndim - 2)
        inv_std = 1 / np.sqrt(running_var.astype(np.float64) + eps)
        self.inv_std = inv_std
        scale = inv_std if weight is None else weight * inv_std
        shift = -running_mean * scale if bias is None else bias - running_mean * scale
        if self.needs_input_grad[1]:
            self.xhat = (x - running_mean.reshape(shape).astype(dtype)) * inv_std.reshape(shape).astype(dtype)
        return x * scale.reshape(shape).astype(dtype) + shift.reshape(shape).astype(dtype)

    def backward(self, g):
        n, c = self.in_shape[:2]
        dtype = g.dtype
        if self.training:
            gamma = np.ones(c, dtype) if self.weight is None else self.weight.astype(dtype, copy=False)
            g3 = _as_batch_channel_inner(g, self.channel_major)
            dx, dweight, dbias = kernels.batch_norm.batch_norm_train_backward(
                g3, self.x3, self.mean, self.inv_std, gamma)
            return (
                _restore(dx, self.in_shape, self.channel_major) if self.needs_input_grad[0] else None,
                dweight.astype(dtype) if self.needs_input_grad[1] else None,
                dbias.astype(dtype) if self.needs_input_grad[2] else None,
            )
        shape = (1, c) + (1,) * (g.ndim - 2)
        axes = (0,) + tuple(range(2, g.ndim))
        scale = self.inv_std if self.weight is None else self.weight * self.inv_std
        dx = g * scale.reshape(shape).astype(dtype) if self.needs_input_grad[0] else None
        dweight = (g * self.xhat).sum(axis=axes) if self.needs_input_grad[1] else None
        dbias = g.sum(axis=axes) if self.needs_input_grad[2] else None
        return dx, dweight, dbias
