"""Batch normalization layers (see :func:`qatcore.nn.functional.batch_norm`)."""

from __future__ import annotations

import numpy as np

from qatcore.errors import ShapeError
from qatcore.nn import functional as F
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _BatchNorm(Module):
    """Shared body of BatchNorm1d/2d; subclasses only say which ranks they accept."""

    _accepted_ndim: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype=np.float32) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = Parameter(np.ones(num_features, dtype=dtype))
            self.bias = Parameter(np.zeros(num_features, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype=dtype))
            self.register_buffer("running_var", np.ones(num_features, dtype=dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x):
        if x.ndim not in self._accepted_ndim:
            raise ShapeError(
                f"{type(self).__name__}: expected input with {' or '.join(map(str, self._accepted_ndim))} "
                f"dimensions, got shape {x.shape}"
            )
        use_batch_stats = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.data += 1
        return F.batch_norm(
            x,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.weight, self.bias, use_batch_stats, self.momentum, self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input."""

    _accepted_ndim = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input.

    >>> import numpy as np
    >>> bn = BatchNorm2d(3)
    >>> y = bn(np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32))
    >>> bool(np.allclose(y.numpy().mean(axis=(0, 2, 3)), 0, atol=1e-6))
    True
    """

    _accepted_ndim = (4,)
