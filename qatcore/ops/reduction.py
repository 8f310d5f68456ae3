"""Reduction primitives: sum and max over some axes (mean and var are composed
from these in :mod:`qatcore.nn.functional`)."""

from __future__ import annotations

import numpy as np

from qatcore.autograd.function import Function
from qatcore.errors import ShapeError

__all__ = ["Sum", "Max", "normalize_dims"]


def normalize_dims(dim, ndim: int) -> tuple[int, ...]:
    """``dim`` (None, an int or a sequence, negatives allowed) as sorted axes."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, (int, np.integer)) else tuple(dim)
    out = []
    for d in dims:
        if not -ndim <= d < max(ndim, 1):
            raise ShapeError(f"dim {d} is out of range for a tensor with {ndim} dimensions")
        out.append(int(d) % max(ndim, 1))
    if len(set(out)) != len(out):
        raise ShapeError(f"dim {dim} names an axis twice")
    return tuple(sorted(out))


class Sum(Function):
    """out = sum of a over ``axes``;  da = g broadcast back over those axes."""

    def forward(self, a, axes: tuple[int, ...], keepdim: bool):
        self.in_shape, self.axes, self.keepdim = a.shape, axes, keepdim
        return np.asarray(a.sum(axis=axes, keepdims=keepdim))

    def backward(self, g):
        if not self.keepdim:
            g = np.expand_dims(g, self.axes)
        return (np.broadcast_to(g, self.in_shape),)


class Max(Function):
    """out = max of a over ``axes``;  da = g shared equally among the elements
    equal to the maximum (ties split the gradient, like ``torch.amax``)."""

    def forward(self, a, axes: tuple[int, ...], keepdim: bool):
        out = np.max(a, axis=axes, keepdims=True)
        if self.needs_input_grad[0]:
            self.mask = a == out
            self.count = self.mask.sum(axis=axes, keepdims=True).astype(a.dtype)
            self.axes, self.keepdim = axes, keepdim
        return out if keepdim else np.squeeze(out, axis=axes)

    def backward(self, g):
        if not self.keepdim:
            g = np.expand_dims(g, self.axes)
        return (self.mask * (g / self.count),)
