"""Batch normalization in training mode: per-channel statistics, normalization and
the backward reductions, each fused into one parallel loop over channels.

The input is viewed as (N, C, M) with M = H*W (M = 1 for (N, C) input); channel c
holds the R = N*M values x[:, c, :]. A channel-major activation (``kernels.layout``)
comes as (1, C, N*M), each channel one contiguous row. Sums are accumulated in
float64, so the statistics are at least as exact as numpy's float32 pairwise sums.

Forward (training):

    mean_c    = (1/R) * sum x
    var_c     = (1/R) * sum (x - mean_c)^2            (biased: what normalizes)
    inv_std_c = 1 / sqrt(var_c + eps)
    xhat      = (x - mean_c) * inv_std_c;      out = gamma_c * xhat + beta_c

Backward (the batch statistics depend on x):

    dbeta_c  = sum g;     dgamma_c = sum g * xhat
    dx       = gamma_c * inv_std_c * (g - dbeta_c / R - xhat * dgamma_c / R)

A data-parallel run (BatchNorm synchronized over ranks, ``qatcore/ops/normalization.py``)
needs the same computation split at its reductions, because the sums are then added over
the ranks between the passes: ``batch_norm_sums`` -> ``batch_norm_squared_deviations`` ->
``batch_norm_normalize`` forward, ``batch_norm_gradient_sums`` -> ``batch_norm_input_gradient``
backward. They share the per-channel loops of the fused pair, so with the fused pair's sums
they give its results bit for bit.

All are pure functions returning new arrays; the jitted loops are compiled on
first call (``cache=True``) and run as plain Python under ``NUMBA_DISABLE_JIT=1``.
They are serial: right after a multithreaded GEMM, OpenBLAS's spinning threads make
a numba parallel region several times slower (measured on conv -> BN -> ReLU -> pool;
docs/benchmarks.md, "Measurements behind the code").

>>> import numpy as np
>>> x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
>>> out, mean, var, inv_std = batch_norm_train_forward(
...     x, np.ones(2, np.float32), np.zeros(2, np.float32), 1e-5)
>>> mean.tolist(), var.tolist()
([2.5, 4.5], [4.25, 4.25])
"""

import math

import numpy as np
from numba import njit

__all__ = ["batch_norm_train_forward", "batch_norm_train_backward", "batch_norm_sums",
           "batch_norm_squared_deviations", "batch_norm_normalize", "batch_norm_gradient_sums",
           "batch_norm_input_gradient"]


# Each float64 sum runs in _LANES independent partial sums, added together at the end of the
# channel. One running sum is a chain of dependent additions, one per element, at the latency
# of an addition; independent ones run at the adders' throughput (and LLVM may put them in
# one vector register). The order of the additions is fixed by the code, not by the machine.
_LANES = 8


@njit(cache=True)
def _channel_sum(x, c):
    """sum over n, m of float64(x[n, c, m]), in _LANES partial sums."""
    batch, channels, inner = x.shape
    partial = np.zeros(_LANES, np.float64)
    tail = 0.0
    whole = inner - inner % _LANES
    for n in range(batch):
        for m in range(0, whole, _LANES):
            for lane in range(_LANES):
                # np.float64(): float64 under the jit and in plain Python alike (numba keeps
                # float() of a float32 in float32, NumPy 2 keeps 0.0 + float32 in float32)
                partial[lane] += np.float64(x[n, c, m + lane])
        for m in range(whole, inner):
            tail += np.float64(x[n, c, m])
    return partial.sum() + tail


@njit(cache=True)
def _channel_squared_deviation(x, c, mu):
    """sum over n, m of (float64(x[n, c, m]) - mu)^2, in _LANES partial sums."""
    batch, channels, inner = x.shape
    partial = np.zeros(_LANES, np.float64)
    tail = 0.0
    whole = inner - inner % _LANES
    for n in range(batch):
        for m in range(0, whole, _LANES):
            for lane in range(_LANES):
                d = np.float64(x[n, c, m + lane]) - mu
                partial[lane] += d * d
        for m in range(whole, inner):
            d = np.float64(x[n, c, m]) - mu
            tail += d * d
    return partial.sum() + tail


@njit(cache=True)
def _channel_gradient_sums(grad, x, mu32, scale32, c):
    """(sum g, sum g * xhat) over n, m of channel c, in float64, in _LANES partial sums each,
    with xhat = (x - mu32) * scale32 recomputed as the forward pass computed it."""
    batch, channels, inner = grad.shape
    partial_g = np.zeros(_LANES, np.float64)
    partial_gx = np.zeros(_LANES, np.float64)
    tail_g = 0.0
    tail_gx = 0.0
    whole = inner - inner % _LANES
    for n in range(batch):
        for m in range(0, whole, _LANES):
            for lane in range(_LANES):
                g = np.float64(grad[n, c, m + lane])
                partial_g[lane] += g
                partial_gx[lane] += g * np.float64((x[n, c, m + lane] - mu32) * scale32)
        for m in range(whole, inner):
            g = np.float64(grad[n, c, m])
            tail_g += g
            tail_gx += g * np.float64((x[n, c, m] - mu32) * scale32)
    return partial_g.sum() + tail_g, partial_gx.sum() + tail_gx


@njit(cache=True)
def _forward_fill(x, weight, bias, eps, out, mean, var, inv_std):
    batch, channels, inner = x.shape
    count = batch * inner
    for c in range(channels):
        mu = _channel_sum(x, c) / count
        variance = _channel_squared_deviation(x, c, mu) / count
        scale = 1.0 / math.sqrt(variance + eps)
        mean[c] = mu
        var[c] = variance
        inv_std[c] = scale
        _normalize_channel(x, c, mu, scale, weight[c], bias[c], out)


@njit(cache=True)
def _normalize_channel(x, c, mu, scale, gamma, beta, out):
    """out[:, c] = (x - mu) * scale * gamma + beta, in x's dtype (mu, scale rounded to it once)."""
    batch, channels, inner = x.shape
    # float32 arithmetic from here on, like the rest of the float path
    mu32 = x.dtype.type(mu)
    scale32 = x.dtype.type(scale)
    for n in range(batch):
        for m in range(inner):
            out[n, c, m] = (x[n, c, m] - mu32) * scale32 * gamma + beta


@njit(cache=True)
def _backward_fill(grad, x, mean, inv_std, weight, dx, dweight, dbias):
    batch, channels, inner = grad.shape
    count = batch * inner
    for c in range(channels):
        mu32 = x.dtype.type(mean[c])
        scale32 = x.dtype.type(inv_std[c])
        sum_g, sum_gx = _channel_gradient_sums(grad, x, mu32, scale32, c)
        dbias[c] = sum_g
        dweight[c] = sum_gx
        _input_gradient_channel(grad, x, c, mu32, scale32, weight[c] * inv_std[c], sum_g / count,
                                sum_gx / count, dx)


@njit(cache=True)
def _input_gradient_channel(grad, x, c, mu32, scale32, k64, mean_g, mean_gx, dx):
    """dx[:, c] = k * (g - mean_g - xhat * mean_gx), in grad's dtype (k, mean_g, mean_gx
    rounded to it once), xhat recomputed as the forward pass computed it."""
    batch, channels, inner = grad.shape
    k = grad.dtype.type(k64)
    a = grad.dtype.type(mean_g)
    b = grad.dtype.type(mean_gx)
    for n in range(batch):
        for m in range(inner):
            xhat = (x[n, c, m] - mu32) * scale32
            dx[n, c, m] = k * (grad[n, c, m] - a - xhat * b)


@njit(cache=True)
def _sums_fill(x, sums):
    for c in range(x.shape[1]):
        sums[c] = _channel_sum(x, c)


@njit(cache=True)
def _squared_deviations_fill(x, mean, out):
    for c in range(x.shape[1]):
        out[c] = _channel_squared_deviation(x, c, mean[c])


@njit(cache=True)
def _normalize_fill(x, weight, bias, mean, inv_std, out):
    for c in range(x.shape[1]):
        _normalize_channel(x, c, mean[c], inv_std[c], weight[c], bias[c], out)


@njit(cache=True)
def _gradient_sums_fill(grad, x, mean, inv_std, sums):
    for c in range(grad.shape[1]):
        sums[0, c], sums[1, c] = _channel_gradient_sums(grad, x, x.dtype.type(mean[c]),
                                                        x.dtype.type(inv_std[c]), c)


@njit(cache=True)
def _input_gradient_fill(grad, x, mean, inv_std, weight, mean_g, mean_gx, dx):
    for c in range(grad.shape[1]):
        _input_gradient_channel(grad, x, c, x.dtype.type(mean[c]), x.dtype.type(inv_std[c]),
                                weight[c] * inv_std[c], mean_g[c], mean_gx[c], dx)


def batch_norm_train_forward(x, weight, bias, eps):
    """Normalize each channel of x (N, C, M) with its batch statistics.

    Args:
        x: C-contiguous float32/float64 array (N, C, M); N*M >= 1.
        weight, bias: arrays of shape (C,) and x's dtype (ones and zeros when the
            layer has no affine parameters).
        eps: added to the variance.

    Returns:
        (out, mean, var, inv_std): out like x; mean, biased var and inv_std of shape
        (C,) in float64. xhat is not kept: the backward pass recomputes it from x,
        bit for bit, so a training step holds one array less per BatchNorm.
    """
    out = np.empty_like(x)
    channels = x.shape[1]
    mean = np.empty(channels, np.float64)
    var = np.empty(channels, np.float64)
    inv_std = np.empty(channels, np.float64)
    _forward_fill(x, weight, bias, float(eps), out, mean, var, inv_std)
    return out, mean, var, inv_std


def batch_norm_train_backward(grad, x, mean, inv_std, weight):
    """Gradients of :func:`batch_norm_train_forward` w.r.t. x, weight and bias.

    Args:
        grad: C-contiguous (N, C, M) gradient of the output.
        x: the forward pass's input; mean, inv_std: float64 (C,) from the forward pass
            (xhat = (x - mean) * inv_std is recomputed in x's dtype, as the forward did).
        weight: gamma, shape (C,).

    Returns:
        (dx, dweight, dbias): dx like grad; dweight and dbias float64 (C,).
    """
    dx = np.empty_like(grad)
    channels = grad.shape[1]
    dweight = np.empty(channels, np.float64)
    dbias = np.empty(channels, np.float64)
    _backward_fill(grad, x, mean, inv_std, weight, dx, dweight, dbias)
    return dx, dweight, dbias


# ---- the same computation split at its reductions (synchronized BatchNorm) ----------------

def batch_norm_sums(x):
    """Per channel, sum over n, m of float64(x[n, c, m]): float64 (C,). x as for
    :func:`batch_norm_train_forward`, but N*M may be 0 (the sums are then 0).

    >>> import numpy as np
    >>> batch_norm_sums(np.arange(8, dtype=np.float32).reshape(2, 2, 2)).tolist()
    [10.0, 18.0]
    """
    sums = np.empty(x.shape[1], np.float64)
    _sums_fill(x, sums)
    return sums


def batch_norm_squared_deviations(x, mean):
    """Per channel, sum over n, m of (float64(x[n, c, m]) - mean[c])^2: float64 (C,), for a
    float64 (C,) ``mean`` given (the global batch's, in a data-parallel run).

    >>> import numpy as np
    >>> x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    >>> batch_norm_squared_deviations(x, np.array([2.5, 4.5])).tolist()
    [17.0, 17.0]
    """
    out = np.empty(x.shape[1], np.float64)
    _squared_deviations_fill(x, np.ascontiguousarray(mean, np.float64), out)
    return out


def batch_norm_normalize(x, weight, bias, mean, inv_std):
    """out = (x - mean_c) * inv_std_c * gamma_c + beta_c with given float64 (C,) statistics,
    in x's dtype, exactly as :func:`batch_norm_train_forward` computes it from its own.

    >>> import numpy as np
    >>> x = np.arange(4, dtype=np.float64).reshape(2, 1, 2)
    >>> batch_norm_normalize(x, np.ones(1), np.zeros(1), np.array([1.5]), np.array([2.0])).ravel().tolist()
    [-3.0, -1.0, 1.0, 3.0]
    """
    out = np.empty_like(x)
    _normalize_fill(x, weight, bias, np.ascontiguousarray(mean, np.float64),
                    np.ascontiguousarray(inv_std, np.float64), out)
    return out


def batch_norm_gradient_sums(grad, x, mean, inv_std):
    """float64 (2, C): row 0 the per-channel sum g (dbeta), row 1 sum g * xhat (dgamma),
    xhat = (x - mean) * inv_std recomputed in x's dtype as the forward pass computed it.

    >>> import numpy as np
    >>> x = np.arange(4, dtype=np.float64).reshape(2, 1, 2)
    >>> batch_norm_gradient_sums(np.ones_like(x), x, np.array([1.5]), np.array([2.0])).tolist()
    [[4.0], [0.0]]
    """
    sums = np.empty((2, grad.shape[1]), np.float64)
    _gradient_sums_fill(grad, x, np.ascontiguousarray(mean, np.float64),
                        np.ascontiguousarray(inv_std, np.float64), sums)
    return sums


def batch_norm_input_gradient(grad, x, mean, inv_std, weight, mean_g, mean_gx):
    """dx = gamma_c * inv_std_c * (g - mean_g_c - xhat * mean_gx_c) for given float64 (C,)
    ``mean_g`` and ``mean_gx`` (dbeta / R and dgamma / R in :func:`batch_norm_train_backward`;
    the global batch's, suitably weighted, in a data-parallel run).

    >>> import numpy as np
    >>> x = np.arange(4, dtype=np.float64).reshape(2, 1, 2)
    >>> g = np.ones_like(x)
    >>> batch_norm_input_gradient(g, x, np.array([1.5]), np.array([2.0]), np.ones(1),
    ...                           np.array([1.0]), np.array([0.0])).ravel().tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    dx = np.empty_like(grad)
    _input_gradient_fill(grad, x, np.ascontiguousarray(mean, np.float64), np.ascontiguousarray(inv_std, np.float64),
                         weight, np.ascontiguousarray(mean_g, np.float64), np.ascontiguousarray(mean_gx, np.float64),
                         dx)
    return dx
