"""Fused layers and the BatchNorm folding arithmetic.

A fused layer is one module the graph treats as one operation (and the int8
runtime as one kernel): ``ConvReLU2d`` = Conv2d then ReLU, ``LinearReLU`` =
Linear then ReLU. They are Sequentials with children ``0`` (the layer) and ``1``
(the ReLU), so their state_dict keys read ``0.weight``.

Folding an eval-mode BatchNorm (running statistics) into the layer before it:

    s      = gamma / sqrt(running_var + eps)
    W_fold = W * s[:, None, ...]
    b_fold = beta + (b - running_mean) * s

computed in float64 and stored in the layer's dtype.

>>> import numpy as np
>>> from qatcore.nn import BatchNorm2d, Conv2d
>>> conv, bn = Conv2d(1, 2, 3, rng=np.random.default_rng(0)), BatchNorm2d(2).eval()
>>> folded = fold_conv_batch_norm(conv, bn)
>>> x = np.random.default_rng(1).random((1, 1, 5, 5), dtype=np.float32)
>>> bool(np.allclose(folded(x).numpy(), bn(conv(x)).numpy(), atol=1e-6))
True
"""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn.activation import ReLU
from qatcore.nn.batchnorm import BatchNorm1d, BatchNorm2d
from qatcore.nn.container import Sequential
from qatcore.nn.conv import Conv2d
from qatcore.nn.linear import Linear
from qatcore.nn.parameter import Parameter

__all__ = ["ConvReLU2d", "LinearReLU", "fold_batch_norm", "fold_conv_batch_norm", "fold_linear_batch_norm"]


class ConvReLU2d(Sequential):
    """Conv2d followed by ReLU, as one layer."""

    def __init__(self, conv: Conv2d, relu: ReLU | None = None) -> None:
        super().__init__(conv, relu if relu is not None else ReLU())


class LinearReLU(Sequential):
    """Linear followed by ReLU, as one layer."""

    def __init__(self, linear: Linear, relu: ReLU | None = None) -> None:
        super().__init__(linear, relu if relu is not None else ReLU())


def fold_batch_norm(weight: np.ndarray, bias: np.ndarray | None, bn) -> tuple[np.ndarray, np.ndarray]:
    """(W_fold, b_fold) for a layer with ``weight`` (out, ...) and ``bias`` followed by ``bn``."""
    if not bn.track_running_stats:
        raise ConfigError(f"cannot fold {type(bn).__name__}: it keeps no running statistics")
    scale = np.asarray(bn.weight.data if bn.weight is not None else 1.0, np.float64) / np.sqrt(
        bn.running_var.data.astype(np.float64) + bn.eps
    )
    beta = bn.bias.data.astype(np.float64) if bn.bias is not None else 0.0
    b = bias.astype(np.float64) if bias is not None else 0.0
    shape = (-1,) + (1,) * (weight.ndim - 1)
    w_fold = weight.astype(np.float64) * scale.reshape(shape)
    b_fold = beta + (b - bn.running_mean.data.astype(np.float64)) * scale
    return w_fold.astype(weight.dtype), np.asarray(b_fold).astype(weight.dtype)


def fold_conv_batch_norm(conv: Conv2d, bn: BatchNorm2d) -> Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` of the eval-mode BatchNorm."""
    if bn.num_features != conv.out_channels:
        raise ConfigError(
            f"cannot fold BatchNorm2d({bn.num_features}) into a conv with {conv.out_channels} outputs"
        )
    w, b = fold_batch_norm(conv.weight.data, None if conv.bias is None else conv.bias.data, bn)
    folded = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, rng=np.random.default_rng(0), dtype=w.dtype)
    folded.weight = Parameter(w)
    folded.bias = Parameter(b)
    return folded


def fold_linear_batch_norm(linear: Linear, bn: BatchNorm1d) -> Linear:
    """A new Linear computing ``bn(linear(x))`` of the eval-mode BatchNorm."""
    if bn.num_features != linear.out_features:
        raise ConfigError(
            f"cannot fold BatchNorm1d({bn.num_features}) into a linear with {linear.out_features} outputs"
        )
    w, b = fold_batch_norm(linear.weight.data, None if linear.bias is None else linear.bias.data, bn)
    folded = Linear(linear.in_features, linear.out_features, bias=True, rng=np.random.default_rng(0),
                    dtype=w.dtype)
    folded.weight = Parameter(w)
    folded.bias = Parameter(b)
    return folded
