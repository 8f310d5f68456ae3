"""2-D convolution primitive: im2col (numba, ``qatcore.kernels.im2col``) and one GEMM per
layer in NumPy float32/float64 (BLAS), a few samples at a time.

With x of shape (N, C, H, W), weight (K, C/G, kh, kw), G groups, P = OH*OW and im2col's
columns for the whole batch (C*kh*kw, N*P):

    out_g  = W_g (K/G, C/G*kh*kw) @ cols_g (C/G*kh*kw, N*P)   (+ bias)     -> (K, N*P)

which is the output in channel-major order: an (N, K, OH, OW) array whose memory is ordered
(K, N, OH, OW), returned as such (a transposed view, no copy). The kernels of the ops that
follow a convolution (BatchNorm, the element-wise ops, the next im2col) read that layout as it
is, so a network's activations stay channel-major from one convolution to the next. The
gradients are the same products transposed, with the output gradient g seen as (K, N*P):

    dW_g   = g_g @ cols_g^T
    dcols  = W_g^T @ g_g;      dx = col2im(dcols)   (adjoint of im2col; channel-major too)
    dbias  = sum over n, oh, ow of g

A 1x1 convolution with stride 1 and no padding on a channel-major x needs no im2col: its
columns are x's (C, N*H*W) channel rows, and its dcols are dx's.

The forward pass keeps only x, not its columns (C*kh*kw times larger): the backward pass
unfolds them again. Both passes go ``_CHUNK_BYTES`` of columns at a time, so a chunk is
written, multiplied and dropped while it is still in the cache, and a training step never
holds a whole layer's columns. The chunks change the order in which dW's per-sample terms are
added (in chunk order), nothing else.
"""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.autograd.function import Function

__all__ = ["Conv2d", "conv_output_size"]

# Columns per chunk: the size the previous per-sample layout measured best for its input
# gradient (docs/benchmarks.md, "Measurements behind the code"), kept for the one-GEMM layout,
# where the sweep was too noisy to choose another.
_CHUNK_BYTES = 8 * 2**20


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """floor((size + 2*padding - dilation*(kernel-1) - 1) / stride) + 1"""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _chunks(batch: int, sample_bytes: int):
    """[first, stop) sample ranges of at most ``_CHUNK_BYTES`` of columns each (one sample
    at least)."""
    step = max(1, _CHUNK_BYTES // max(1, sample_bytes))
    return [(first, min(first + step, batch)) for first in range(0, batch, step)]


def _is_pointwise(x, window, groups) -> bool:
    """A 1x1 convolution with stride 1 and no padding, one group, on a channel-major (or
    single-sample) x: its columns are x's channel rows as they are in memory, so it is a plain
    GEMM with no im2col and no col2im."""
    layout = kernels.layout
    return (window == (1, 1, 1, 1, 0, 0, 1, 1) and groups == 1
            and (layout.is_channel_major(x) or (x.shape[0] == 1 and x.flags.c_contiguous)))


class Conv2d(Function):
    """out = conv2d(x, weight) + bias (cross-correlation, as every framework)."""

    def forward(self, x, weight, bias, stride, padding, dilation, groups):
        if not (x.flags.c_contiguous or kernels.layout.is_channel_major(x)):
            x = np.ascontiguousarray(x)  # once here, not once per chunk inside im2col
        n, c, h, w = x.shape
        k, cg, kh, kw = weight.shape
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        oh = conv_output_size(h, kh, sh, ph, dh)
        ow = conv_output_size(w, kw, sw, pw, dw)
        p = oh * ow
        self.window = (kh, kw, sh, sw, ph, pw, dh, dw)
        self.geometry = (x.shape, weight.shape, groups, p)
        dtype = np.result_type(x.dtype, weight.dtype)
        out = np.empty((k, n * p), dtype=dtype)
        w_g = weight.reshape(groups, k // groups, cg * kh * kw)
        out_g = out.reshape(groups, k // groups, n * p)
        self.pointwise = _is_pointwise(x, self.window, groups)
        cols = None
        for first, stop in _chunks(n, c * kh * kw * p * x.dtype.itemsize):
            cols = self._columns(x, first, stop, cols)
            np.matmul(w_g, cols.reshape(groups, cg * kh * kw, -1), out=out_g[:, :, first * p:stop * p])
        if bias is not None:
            out += bias[:, None]
        if self.needs_input_grad[1]:
            self.x = x
        if self.needs_input_grad[0]:
            self.weight = weight
        return out.reshape(k, n, oh, ow).swapaxes(0, 1)

    def _columns(self, x, first, stop, previous):
        """im2col of samples [first, stop) of x: (C*kh*kw, (stop - first)*P), written into the
        previous chunk's columns when they have the same size (see im2col's ``out``)."""
        p = self.geometry[3]
        if self.pointwise:
            return kernels.layout.channel_rows(x)[:, first * p:stop * p]
        reuse = previous is not None and previous.shape[1] == (stop - first) * p
        return kernels.im2col.im2col(x, *self.window, first_sample=first, samples=stop - first,
                                     out=previous if reuse else None)

    def backward(self, g):
        x_shape, w_shape, groups, p = self.geometry
        n, c, h, w = x_shape
        k, cg, kh, kw = w_shape
        depth = cg * kh * kw
        g2 = np.ascontiguousarray(g.swapaxes(0, 1)).reshape(k, n * p)  # free for a channel-major g
        g_g = g2.reshape(groups, k // groups, n * p)
        dx = dweight = dbias = None
        if self.needs_input_grad[2]:
            dbias = g2.sum(axis=1)
        if self.needs_input_grad[1]:
            dweight = np.zeros((groups, k // groups, depth), dtype=g.dtype)
        if self.needs_input_grad[0]:
            w_t = self.weight.reshape(groups, k // groups, depth).swapaxes(-1, -2)
            # channel-major: a pointwise conv writes every element, col2im adds onto zeros
            dtype = np.result_type(self.weight.dtype, g.dtype)
            if self.pointwise:
                dx = kernels.layout.empty((n, c, h, w), dtype, channel_major=True)
            else:
                dx = np.zeros((c, n, h, w), dtype).swapaxes(0, 1)
        cols = dcols = None
        for first, stop in _chunks(n, c * kh * kw * p * g.dtype.itemsize):
            g_chunk = g_g[:, :, first * p:stop * p]
            if dweight is not None:
                cols = self._columns(self.x, first, stop, cols)
                dweight += np.matmul(g_chunk, cols.reshape(groups, depth, -1).swapaxes(-1, -2))
            if dx is not None and self.pointwise:
                # the columns are x's channel rows, so their gradient is dx's
                np.matmul(w_t[0], g_chunk[0], out=kernels.layout.channel_rows(dx)[:, first * p:stop * p])
            elif dx is not None:
                if dcols is None or dcols.shape[-1] != (stop - first) * p:
                    dcols = np.empty((groups, depth, (stop - first) * p), dtype=dx.dtype)
                np.matmul(w_t, g_chunk, out=dcols)
                kernels.im2col.col2im_add(dcols.reshape(c * kh * kw, -1), dx, first, *self.window)
        if dweight is not None:
            dweight = dweight.reshape(w_shape)
        return dx, dweight, dbias
