"""Batch normalization in training mode: per-channel statistics, normalization and
the backward reductions, each fused into one parallel loop over channels.

The input is viewed as (N, C, M) with M = H*W (M = 1 for (N, C) input); channel c
holds the R = N*M values x[:, c, :]. Sums are accumulated in float64, so the
statistics are at least as exact as numpy's float32 pairwise sums.

Forward (training):

    mean_c    = (1/R) * sum x
    var_c     = (1/R) * sum (x - mean_c)^2            (biased: what normalizes)
    inv_std_c = 1 / sqrt(var_c + eps)
    xhat      = (x - mean_c) * inv_std_c;      out = gamma_c * xhat + beta_c

Backward (the batch statistics depend on x):

    dbeta_c  = sum g;     dgamma_c = sum g * xhat
    dx       = gamma_c * inv_std_c * (g - dbeta_c / R - xhat * dgamma_c / R)

Both are pure functions returning new arrays; the jitted loops are compiled on
first call (``cache=True``) and run as plain Python under ``NUMBA_DISABLE_JIT=1``.
They are serial: right after a multithreaded GEMM, OpenBLAS's spinning threads make
a numba parallel region several times slower (measured on conv -> BN -> ReLU -> pool;
docs/benchmarks.md, "Measurements behind the code").

>>> import numpy as np
>>> x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
>>> out, xhat, mean, var, inv_std = batch_norm_train_forward(
...     x, np.ones(2, np.float32), np.zeros(2, np.float32), 1e-5)
>>> mean.tolist(), var.tolist()
([2.5, 4.5], [4.25, 4.25])
"""

import math

import numpy as np
from numba import njit

__all__ = ["batch_norm_train_forward", "batch_norm_train_backward"]


@njit(cache=True)
def _forward_fill(x, weight, bias, eps, out, xhat, mean, var, inv_std):
    batch, channels, inner = x.shape
    count = batch * inner
    for c in range(channels):
        total = 0.0
        for n in range(batch):
            row = x[n, c]
            for m in range(inner):
                # np.float64(): float64 under the jit and in plain Python alike (numba keeps
                # float() of a float32 in float32, NumPy 2 keeps 0.0 + float32 in float32)
                total += np.float64(row[m])
        mu = total / count
        squares = 0.0
        for n in range(batch):
            row = x[n, c]
            for m in range(inner):
                d = np.float64(row[m]) - mu
                squares += d * d
        variance = squares / count
        scale = 1.0 / math.sqrt(variance + eps)
        mean[c] = mu
        var[c] = variance
        inv_std[c] = scale
        # float32 arithmetic from here on, like the rest of the float path
        mu32 = x.dtype.type(mu)
        scale32 = x.dtype.type(scale)
        gamma = weight[c]
        beta = bias[c]
        for n in range(batch):
            row = x[n, c]
            xhat_row = xhat[n, c]
            out_row = out[n, c]
            for m in range(inner):
                normalized = (row[m] - mu32) * scale32
                xhat_row[m] = normalized
                out_row[m] = normalized * gamma + beta


@njit(cache=True)
def _backward_fill(grad, xhat, weight, inv_std, dx, dweight, dbias):
    batch, channels, inner = grad.shape
    count = batch * inner
    for c in range(channels):
        sum_g = 0.0
        sum_gx = 0.0
        for n in range(batch):
            g_row = grad[n, c]
            x_row = xhat[n, c]
            for m in range(inner):
                g = np.float64(g_row[m])
                sum_g += g
                sum_gx += g * np.float64(x_row[m])
        dbias[c] = sum_g
        dweight[c] = sum_gx
        k = grad.dtype.type(weight[c] * inv_std[c])
        a = grad.dtype.type(sum_g / count)
        b = grad.dtype.type(sum_gx / count)
        for n in range(batch):
            g_row = grad[n, c]
            x_row = xhat[n, c]
            dx_row = dx[n, c]
            for m in range(inner):
                dx_row[m] = k * (g_row[m] - a - x_row[m] * b)


def batch_norm_train_forward(x, weight, bias, eps):
    """Normalize each channel of x (N, C, M) with its batch statistics.

    Args:
        x: C-contiguous float32/float64 array (N, C, M); N*M >= 1.
        weight, bias: arrays of shape (C,) and x's dtype (ones and zeros when the
            layer has no affine parameters).
        eps: added to the variance.

    Returns:
        (out, xhat, mean, var, inv_std): out and xhat like x; mean, biased var and
        inv_std of shape (C,) in float64.
    """
    out = np.empty_like(x)
    xhat = np.empty_like(x)
    channels = x.shape[1]
    mean = np.empty(channels, np.float64)
    var = np.empty(channels, np.float64)
    inv_std = np.empty(channels, np.float64)
    _forward_fill(x, weight, bias, float(eps), out, xhat, mean, var, inv_std)
    return out, xhat, mean, var, inv_std


def batch_norm_train_backward(grad, xhat, weight, inv_std):
    """Gradients of :func:`batch_norm_train_forward` w.r.t. x, weight and bias.

    Args:
        grad: C-contiguous (N, C, M) gradient of the output.
        xhat: the normalized input saved by the forward pass.
        weight: gamma, shape (C,); inv_std: float64 (C,) from the forward pass.

    Returns:
        (dx, dweight, dbias): dx like grad; dweight and dbias float64 (C,).
    """
    dx = np.empty_like(grad)
    channels = grad.shape[1]
    dweight = np.empty(channels, np.float64)
    dbias = np.empty(channels, np.float64)
    _backward_fill(grad, xhat, weight, inv_std, dx, dweight, dbias)
    return dx, dweight, dbias
