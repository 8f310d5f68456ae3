"""Log-softmax primitive (softmax and cross-entropy are composed from it)."""

from __future__ import annotations

import numpy as np

from qatcore.autograd.function import Function

__all__ = ["LogSoftmax"]


class LogSoftmax(Function):
    """out_i = a_i - log(sum_j e^{a_j}) along ``axis``, computed as
    (a_i - m) - log(sum_j e^{a_j - m}) with m = max_j a_j so nothing overflows;
    da = g - softmax(a) * sum_j g_j."""

    def forward(self, a, axis: int):
        shifted = a - a.max(axis=axis, keepdims=True)
        self.out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        self.axis = axis
        return self.out

    def backward(self, g):
        return (g - np.exp(self.out) * g.sum(axis=self.axis, keepdims=True),)
