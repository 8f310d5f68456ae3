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

from qatcore.autograd.function import Function

__all__ = ["BatchNorm"]


class BatchNorm(Function):
    """Batch normalization over axis 1 of an (N, C, ...) array."""

    def forward(self, x, weight, bias, running_mean, running_var, training, momentum, eps):
        c = x.shape[1]
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, c) + (1,) * (x.ndim - 2)
        if training:
            m = x.size // c
            mean = x.mean(axis=axes)
            centered = x - mean.reshape(shape)
            var = np.mean(centered * centered, axis=axes)
            if running_mean is not None:
                running_mean *= 1 - momentum
                running_mean += momentum * mean
            if running_var is not None:
                running_var *= 1 - momentum
                running_var += (momentum * m / (m - 1)) * var
        else:
            centered = x - running_mean.reshape(shape).astype(x.dtype, copy=False)
            var = running_var.astype(x.dtype, copy=False)
        inv_std = (1 / np.sqrt(var + np.asarray(eps, dtype=x.dtype))).astype(x.dtype, copy=False)
        xhat = centered * inv_std.reshape(shape)
        out = xhat if weight is None else xhat * weight.reshape(shape)
        if bias is not None:
            out = out + bias.reshape(shape)
        self.xhat, self.inv_std, self.weight = xhat, inv_std, weight
        self.training, self.axes, self.shape = training, axes, shape
        return out

    def backward(self, g):
        axes, shape = self.axes, self.shape
        dweight = (g * self.xhat).sum(axis=axes) if self.needs_input_grad[1] else None
        dbias = g.sum(axis=axes) if self.needs_input_grad[2] else None
        dx = None
        if self.needs_input_grad[0]:
            dxhat = g if self.weight is None else g * self.weight.reshape(shape)
            if self.training:
                mean_dxhat = dxhat.mean(axis=axes, keepdims=True)
                mean_dxhat_xhat = (dxhat * self.xhat).mean(axis=axes, keepdims=True)
                dxhat = dxhat - mean_dxhat - self.xhat * mean_dxhat_xhat
            dx = dxhat * self.inv_std.reshape(shape)
        return dx, dweight, dbias
