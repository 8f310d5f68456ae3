"""2-D convolution primitive: im2col (numba, ``qatcore.kernels.im2col``) followed
by a batched GEMM in numpy float32/float64 (BLAS).

With x of shape (N, C, H, W), weight (K, C/G, kh, kw) and G groups:

    cols[n]           = im2col(x)[n]                         (C*kh*kw, OH*OW)
    out[n, g-th block] = W_g (K/G, C/G*kh*kw) @ cols[n, g-th block]  (+ bias)

and the gradients are the same products transposed:

    dW_g   = sum_n  g[n, g-th block] @ cols[n, g-th block]^T
    dcols  = W_g^T @ g[n, g-th block];      dx = col2im(dcols)   (adjoint of im2col)
    dbias  = sum over n, oh, ow of g
"""

from __future__ import annotations

import numpy as np

from qatcore.autograd.function import Function

__all__ = ["Conv2d", "conv_output_size"]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """floor((size + 2*padding - dilation*(kernel-1) - 1) / stride) + 1"""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class Conv2d(Function):
    """out = conv2d(x, weight) + bias (cross-correlation, as every framework)."""

    def forward(self, x, weight, bias, stride, padding, dilation, groups):
        from qatcore.kernels import im2col as im2col_kernels

        n, c, h, w = x.shape
        k, cg, kh, kw = weight.shape
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        oh = conv_output_size(h, kh, sh, ph, dh)
        ow = conv_output_size(w, kw, sw, pw, dw)
        x = np.ascontiguousarray(x)
        cols = im2col_kernels.im2col(x, kh, kw, sh, sw, ph, pw, dh, dw)
        if groups == 1:
            out = np.matmul(weight.reshape(k, -1), cols)
        else:
            w_g = weight.reshape(groups, k // groups, cg * kh * kw)
            out = np.matmul(w_g, cols.reshape(n, groups, cg * kh * kw, oh * ow))
            out = out.reshape(n, k, oh * ow)
        if bias is not None:
            out += bias[None, :, None]
        if self.needs_input_grad[1]:
            self.cols = cols
        if self.needs_input_grad[0]:
            self.weight = weight
        self.geometry = (x.shape, weight.shape, stride, padding, dilation, groups, oh * ow)
        return out.reshape(n, k, oh, ow)

    def backward(self, g):
        from qatcore.kernels import im2col as im2col_kernels

        x_shape, w_shape, stride, padding, dilation, groups, p = self.geometry
        n, c, h, w = x_shape
        k, cg, kh, kw = w_shape
        g3 = g.reshape(n, k, p)
        dx = dweight = dbias = None
        if self.needs_input_grad[2]:
            dbias = g3.sum(axis=(0, 2))
        if groups == 1:
            if self.needs_input_grad[1]:
                dweight = np.matmul(g3, self.cols.transpose(0, 2, 1)).sum(axis=0).reshape(w_shape)
            if self.needs_input_grad[0]:
                dcols = np.matmul(self.weight.reshape(k, -1).T, g3)
        else:
            gg = g3.reshape(n, groups, k // groups, p)
            if self.needs_input_grad[1]:
                cols_g = self.cols.reshape(n, groups, cg * kh * kw, p)
                dweight = np.matmul(gg, cols_g.swapaxes(-1, -2)).sum(axis=0).reshape(w_shape)
            if self.needs_input_grad[0]:
                w_g = self.weight.reshape(groups, k // groups, cg * kh * kw)
                dcols = np.matmul(w_g.swapaxes(-1, -2), gg).reshape(n, c * kh * kw, p)
        if self.needs_input_grad[0]:
            (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
            dx = im2col_kernels.col2im(
                np.ascontiguousarray(dcols), c, h, w, kh, kw, sh, sw, ph, pw, dh, dw
            )
        return dx, dweight, dbias
