"""2-D convolution primitive: im2col (numba, ``qatcore.kernels.im2col``) followed
by a batched GEMM in numpy float32/float64 (BLAS).

With x of shape (N, C, H, W), weight (K, C/G, kh, kw) and G groups:

    cols[n]           = im2col(x)[n]                         (C*kh*kw, OH*OW)
    out[n, g-th block] = W_g (K/G, C/G*kh*kw) @ cols[n, g-th block]  (+ bias)

and the gradients are the same products transposed:

    dW_g   = sum_n  g[n, g-th block] @ cols[n, g-th block]^T
    dcols  = W_g^T @ g[n, g-th block];      dx = col2im(dcols)   (adjoint of im2col)
    dbias  = sum over n, oh, ow of g

For large layers dcols and dx are computed a few samples at a time (see
``_INPUT_GRAD_CHUNK_BYTES``); every sample still gets the same GEMM, so the result does not
depend on the chunking.
"""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.autograd.function import Function

__all__ = ["Conv2d", "conv_output_size"]

# dcols for a whole batch is as large as the saved cols (230 MB for N=32, C=64, 56x56, 3x3):
# the GEMM writes it to memory, page-faulting it in, and col2im reads it back. A chunk of
# samples this size or smaller is allocated once, reused, and stays in the cache between the
# two, which measured faster on that layer than the whole batch at once (one sample there is
# 7.2 MB; figures in docs/benchmarks.md, "Measurements behind the code").
_INPUT_GRAD_CHUNK_BYTES = 8 * 2**20


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """floor((size + 2*padding - dilation*(kernel-1) - 1) / stride) + 1"""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class Conv2d(Function):
    """out = conv2d(x, weight) + bias (cross-correlation, as every framework)."""

    def forward(self, x, weight, bias, stride, padding, dilation, groups):
        n, c, h, w = x.shape
        k, cg, kh, kw = weight.shape
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        oh = conv_output_size(h, kh, sh, ph, dh)
        ow = conv_output_size(w, kw, sw, pw, dw)
        x = np.ascontiguousarray(x)
        cols = kernels.im2col.im2col(x, kh, kw, sh, sw, ph, pw, dh, dw)
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
        x_shape, w_shape, stride, padding, dilation, groups, p = self.geometry
        n, c, h, w = x_shape
        k, cg, kh, kw = w_shape
        g3 = g.reshape(n, k, p)
        dx = dweight = dbias = None
        if self.needs_input_grad[2]:
            dbias = g3.sum(axis=(0, 2))
        if self.needs_input_grad[1]:
            if groups == 1:
                dweight = np.matmul(g3, self.cols.transpose(0, 2, 1)).sum(axis=0)
            else:
                gg = g3.reshape(n, groups, k // groups, p)
                cols_g = self.cols.reshape(n, groups, cg * kh * kw, p)
                dweight = np.matmul(gg, cols_g.swapaxes(-1, -2)).sum(axis=0)
            dweight = dweight.reshape(w_shape)
        if self.needs_input_grad[0]:
            dx = self._input_gradient(g3)
        return dx, dweight, dbias

    def _input_gradient(self, g3):
        """dx = col2im(W^T @ g), computed ``_INPUT_GRAD_CHUNK_BYTES`` of dcols at a time."""
        x_shape, w_shape, stride, padding, dilation, groups, p = self.geometry
        n, c, h, w = x_shape
        k, cg, kh, kw = w_shape
        window = (kh, kw, *stride, *padding, *dilation)
        if groups == 1:
            w_t = self.weight.reshape(k, -1).T  # (C*kh*kw, K)
            g_blocks = g3  # (N, K, P)
            block_shape = (c * kh * kw, p)
        else:
            w_t = self.weight.reshape(groups, k // groups, cg * kh * kw).swapaxes(-1, -2)
            g_blocks = g3.reshape(n, groups, k // groups, p)
            block_shape = (groups, cg * kh * kw, p)
        dtype = np.result_type(self.weight.dtype, g3.dtype)
        samples_per_chunk = max(1, _INPUT_GRAD_CHUNK_BYTES // (c * kh * kw * p * dtype.itemsize))
        if samples_per_chunk >= n:
            dcols = np.matmul(w_t, g_blocks).reshape(n, c * kh * kw, p)
            return kernels.im2col.col2im(dcols, c, h, w, *window)
        # Each sample gets the same GEMM as in the one batched call above, so the result is
        # the same to the bit.
        dx = np.empty(x_shape, dtype=dtype)
        dcols = np.empty((samples_per_chunk, c * kh * kw, p), dtype=dtype)
        for start in range(0, n, samples_per_chunk):
            stop = min(start + samples_per_chunk, n)
            part = dcols[: stop - start]
            np.matmul(w_t, g_blocks[start:stop], out=part.reshape(stop - start, *block_shape))
            dx[start:stop] = kernels.im2col.col2im(part, c, h, w, *window)
        return dx
