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

Synchronized (training, inside a data-parallel group: ``qatcore.process_group.current_group()``
is not None). Rank r holds n_r of the N samples of the global batch, m_r of the m values of
each channel. The statistics are the global batch's, from two sums over the ranks:

    mu  = sum_r S_r / m,        S_r = sum over rank r of x           (float64; m = sum_r m_r)
    var = sum_r Q_r / m,        Q_r = sum over rank r of (x - mu)^2  (biased; m / (m - 1) for the running var)

and rank r normalizes its own x with them. Backward: the data-parallel wrapper combines the
ranks' parameter gradients as sum_r w_r * grad_r with w_r = n_r / N, where grad_r is the
gradient of rank r's loss L_r (the mean over its share). So the loss trained is
L = sum_r w_r L_r (= the mean over the global batch) and, for a value on rank r,
dL/dout = w_r * g (g: the gradient rank r's backward pass carries). Then

    dL/dgamma = sum_r w_r * sum_(rank r) g * xhat:    rank r returns its LOCAL sum(g * xhat)
    dL/dbeta  = sum_r w_r * sum_(rank r) g:           rank r returns its LOCAL sum(g)
    dL/dx     = w_r * gamma / sqrt(var + eps) * (g - G / (w_r m) - xhat * GX / (w_r m)),
                G = sum_r w_r * sum_(rank r) g,  GX = sum_r w_r * sum_(rank r) g * xhat,

and rank r returns dx = dL/dx / w_r: everything computed from it upstream is again combined
with the weight w_r, so the combination is exactly the gradient of L, for x (through every
parameter before the BatchNorm), gamma and beta. One reduction in backward, of
(w_r * sum g, w_r * sum g * xhat), made only when dx is needed (the same on every rank: the
ranks run the same model). With one rank (w = 1) these are the formulas above; a rank with
an empty share (n_r = 0) still takes part in the reductions.
"""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.autograd.function import Function
from qatcore.errors import ShapeError
from qatcore.process_group import ProcessGroup, current_group

__all__ = ["BatchNorm"]


def _as_batch_channel_inner(a, channel_major):
    """a as the (N', C, M') array the kernels take, without a copy for the two layouts of
    ``kernels.layout``: C-contiguous a is (N, C, M); channel-major a is (1, C, N*M), channel
    c's values one contiguous row, which is the same statistics and the same map. (A gradient
    in the other layout is copied into this one.)"""
    if channel_major:
        return kernels.layout.channel_rows(np.ascontiguousarray(a.swapaxes(0, 1)).swapaxes(0, 1))[None]
    return np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1 if a.size else 0)


def _restore(a3, shape, channel_major):
    """The kernels' (N', C, M') result in x's shape and layout."""
    if channel_major:
        return kernels.layout.from_channel_rows(a3[0], shape)
    return a3.reshape(shape)


class BatchNorm(Function):
    """Batch normalization over axis 1 of an (N, C, ...) array.

    Training mode runs the fused kernels of ``qatcore.kernels.batch_norm`` (one
    pass for the statistics, one for the normalization, one for each backward
    reduction), or inside a data-parallel group their split form with the sums
    reduced over the ranks (module docstring); eval mode is a per-channel affine map
    in numpy.

    >>> import numpy as np
    >>> from qatcore.distributed import ThreadGroup
    >>> from qatcore.tensor import Tensor
    >>> x = np.arange(12.0).reshape(6, 2) ** 2               # 6 samples, 2 channels
    >>> def normalize(values):
    ...     return BatchNorm.apply(Tensor(values), None, None, running_mean=None, running_var=None,
    ...                            training=True, momentum=0.1, eps=0.0).numpy()
    >>> def rank_output(group):                              # rank 0: samples 0-3, rank 1: 4-5
    ...     return normalize(x[:4] if group.rank == 0 else x[4:])
    >>> bool(np.allclose(np.concatenate(ThreadGroup.run(2, rank_output)), normalize(x), rtol=1e-14))
    True
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
            self.x3 = x3
            self.group = current_group()
            if self.group is None:
                out, self.mean, var, self.inv_std = kernels.batch_norm.batch_norm_train_forward(
                    x3, gamma, beta, eps)
                m = x3.shape[0] * x3.shape[2]
            else:
                out, var, m = self._synchronized_forward(x3, gamma, beta, eps, n)
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
            if self.group is None:
                dx, dweight, dbias = kernels.batch_norm.batch_norm_train_backward(
                    g3, self.x3, self.mean, self.inv_std, gamma)
            else:
                dx, dweight, dbias = self._synchronized_backward(g3, gamma)
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

    def _synchronized_forward(self, x3, gamma, beta, eps, samples):
        """(out, biased var, m) with the global batch's statistics (module docstring); sets
        self.mean, self.inv_std, self.share = w_r = n_r / N and self.global_count = m for
        the backward pass. Two reductions: (S_r, m_r, n_r) and Q_r."""
        group: ProcessGroup = self.group
        channels = x3.shape[1]
        local = np.empty(channels + 2, np.float64)
        local[:channels] = kernels.batch_norm.batch_norm_sums(x3)
        local[channels] = x3.shape[0] * x3.shape[2]       # values per channel, m_r
        local[channels + 1] = samples                     # samples, n_r
        total = group.allreduce(local, "sum")
        m, global_samples = total[channels], total[channels + 1]
        if m < 2:  # the same global count on every rank: all raise alike
            raise ShapeError(
                f"batch_norm: training needs more than one value per channel in the global batch, got "
                f"{int(m)} over {group.world_size} ranks (this rank's input has shape {self.in_shape})")
        self.mean = total[:channels] / m
        var = group.allreduce(kernels.batch_norm.batch_norm_squared_deviations(x3, self.mean), "sum") / m
        self.inv_std = 1.0 / np.sqrt(var + eps)
        self.share, self.global_count = samples / global_samples, m
        return kernels.batch_norm.batch_norm_normalize(x3, gamma, beta, self.mean, self.inv_std), var, m

    def _synchronized_backward(self, g3, gamma):
        """(dx / w_r, local dweight, local dbias) of the module docstring."""
        sums = kernels.batch_norm.batch_norm_gradient_sums(g3, self.x3, self.mean, self.inv_std)
        dx = None
        if self.needs_input_grad[0]:
            total = self.group.allreduce(self.share * sums, "sum")
            if self.share > 0:
                scale = self.share * self.global_count      # w_r * m
                dx = kernels.batch_norm.batch_norm_input_gradient(
                    g3, self.x3, self.mean, self.inv_std, gamma, total[0] / scale, total[1] / scale)
            else:
                dx = np.empty_like(g3)
        return dx, sums[1], sums[0]
