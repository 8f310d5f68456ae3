"""Embedding lookup: rows of a weight table picked by integer indices.

    out[..., :] = weight[indices[...], :]
    dweight[v, :] = sum over the positions p with indices[p] == v of g[p, :]   (a scatter-add)

and with ``padding_idx`` set, row ``padding_idx`` of dweight is 0: that row is looked up
but never trained (PyTorch's ``F.embedding``). The indices are a constant (no gradient).
"""

from __future__ import annotations

import numpy as np

from qatcore.autograd.function import Function

__all__ = ["Embedding"]


class Embedding(Function):
    """out = weight[indices];  dweight = scatter-add of g into the looked-up rows (module docstring)."""

    def forward(self, weight, indices: np.ndarray, padding_idx: int | None):
        self.indices, self.padding_idx, self.weight_shape = indices, padding_idx, weight.shape
        return weight[indices]

    def backward(self, g):
        dweight = np.zeros(self.weight_shape, dtype=g.dtype)
        # np.add.at accumulates repeated indices (plain fancy-index assignment keeps only one)
        np.add.at(dweight, self.indices.reshape(-1), g.reshape(-1, self.weight_shape[1]))
        if self.padding_idx is not None:
            dweight[self.padding_idx] = 0
        return (dweight,)
