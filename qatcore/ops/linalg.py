"""Matrix product primitive."""

from __future__ import annotations

import numpy as np

from qatcore.autograd.function import Function

__all__ = ["MatMul"]


class MatMul(Function):
    """out = a @ b (numpy matmul rules: 1-D operands, batched broadcasting);
    da = g @ b^T,  db = a^T @ g  (batch axes summed back by the engine).

    A batched ``a`` (..., M, K) against a matrix ``b`` (K, N), as in a linear layer on
    (B, T, C) inputs, is one matrix product of the rows stacked, (B*M, K) @ (K, N), in
    the forward and in both gradients (db = sum over the batch of a_i^T @ g_i =
    (B*M, K)^T @ (B*M, N)): numpy's matmul would loop over the batch, one small BLAS
    call per (M, K) slice, 6 to 14 times slower on TinyGPT's layers.
    """

    def forward(self, a, b):
        self.a, self.b = a, b
        if a.ndim > 2 and b.ndim == 2:  # the rows stacked: one GEMM
            return (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1])
        return np.matmul(a, b)

    def backward(self, g):
        a, b = self.a, self.b
        if a.ndim == 1 and b.ndim == 1:  # dot product: g is a scalar
            return g * b, g * a
        # Promote 1-D operands to matrices so one formula covers every case.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        g2 = g
        if a.ndim == 1:
            g2 = np.expand_dims(g2, -2)
        if b.ndim == 1:
            g2 = np.expand_dims(g2, -1)
        da = db = None
        if self.needs_input_grad[0] and a.ndim > 2 and b.ndim == 2 and g.shape[:-1] == a.shape[:-1]:
            da = (g.reshape(-1, g.shape[-1]) @ b.T).reshape(a.shape)
        elif self.needs_input_grad[0]:
            da = np.matmul(g2, np.swapaxes(b2, -1, -2))
            if a.ndim == 1:
                da = da.reshape(da.shape[:-2] + (a.shape[0],))
        if self.needs_input_grad[1] and b.ndim == 2 and a.ndim > 2:
            db = a.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
        elif self.needs_input_grad[1]:
            db = np.matmul(np.swapaxes(a2, -1, -2), g2)
            if b.ndim == 1:
                db = db.reshape(db.shape[:-2] + (b.shape[0],))
        return da, db
