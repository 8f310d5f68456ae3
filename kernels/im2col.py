"""im2col and col2im: the layouts that turn a 2-d convolution into a batched GEMM.

For an input ``x`` of shape (N, C, H, W) and a kernel of size (kh, kw) with stride (sh, sw),
zero padding (ph, pw) and dilation (dh, dw), the output spatial size is

    OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1
    OW = (W + 2*pw - dw*(kw - 1) - 1) // sw + 1

``im2col`` unfolds every receptive field into a column:

    cols[n, (c*kh + i)*kw + j, oh*OW + ow] = x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]

(0 where the input position lies in the padding), so that a convolution with weight
(K, C, kh, kw) is ``weight.reshape(K, C*kh*kw) @ cols[n]`` for every n. ``col2im`` is the
adjoint (transpose) of that linear map: it adds every column entry back onto the input position
it was read from and drops the entries that were read from padding. The convolution's input
gradient is ``col2im(weight.reshape(K, -1).T @ grad_out.reshape(N, K, OH*OW), ...)``.

Both kernels are pure functions: they allocate and return a new array and never modify their
arguments. They are compiled lazily by numba on first call (one specialisation per dtype) and
cached on disk; under ``NUMBA_DISABLE_JIT=1`` they run unchanged as plain Python.

Speed: the innermost loop always runs along ``ow``, which is contiguous in ``cols``. For each
kernel row ``i`` the range of ``oh`` that reads inside the input is computed once, and for each
kernel column ``j`` the range of ``ow``; rows of padding and the two ends of each row are then
written as zeros (im2col) or skipped (col2im) outside the copy loop, so the copy loop itself
has no bounds tests.
"""

import numpy as np
from numba import njit, prange

__all__ = ["im2col", "col2im"]


@njit(cache=True)
def _valid_output_range(offset, stride, size, count):
    """Return (lo, hi) such that ``0 <= offset + k*stride < size`` exactly for k in [lo, hi).

    k is limited to [0, count); ``lo <= hi`` always holds (the range may be empty).
    Requires stride >= 1.
    """
    if offset >= 0:
        lo = 0
    else:
        lo = (-offset + stride - 1) // stride  # ceil(-offset / stride), numerator > 0
    if offset >= size:
        hi = 0
    else:
        hi = (size - offset + stride - 1) // stride  # ceil((size - offset) / stride)
    lo = min(lo, count)
    hi = min(hi, count)
    if hi < lo:
        hi = lo
    return lo, hi


@njit(cache=True, parallel=True)
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw):
    """Unfold the receptive fields of ``x`` into columns.

    Args:
        x: C-contiguous float32 or float64 array of shape (N, C, H, W).
        kh, kw: kernel height and width (>= 1).
        sh, sw: stride (>= 1).
        ph, pw: zero padding on both sides (>= 0).
        dh, dw: dilation (>= 1).

    Returns:
        cols, a new array of x's dtype with shape (N, C*kh*kw, OH*OW), where
        ``OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1`` (OW likewise) and

            cols[n, (c*kh + i)*kw + j, oh*OW + ow] = x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]

        or 0 where that position lies outside [0, H) x [0, W).

    Preconditions (checked by the caller, not here): the parameter ranges above and OH, OW >= 1.

    Parallel over the N*C input planes; each plane writes its own C-slice of rows.

    Example:
        >>> import numpy as np
        >>> x = np.arange(4.0).reshape(1, 1, 2, 2)
        >>> im2col(x, 2, 2, 1, 1, 0, 0, 1, 1)[0, :, 0]
        array([0., 1., 2., 3.])
    """
    batch, channels, height, width = x.shape
    out_height = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_width = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((batch, channels * kh * kw, out_height * out_width), dtype=x.dtype)
    zero = x.dtype.type(0)
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        for i in range(kh):
            h_offset = i * dh - ph
            oh_lo, oh_hi = _valid_output_range(h_offset, sh, height, out_height)
            for j in range(kw):
                w_offset = j * dw - pw
                ow_lo, ow_hi = _valid_output_range(w_offset, sw, width, out_width)
                row = cols[n, (c * kh + i) * kw + j]
                # Output rows whose input row lies in the top or bottom padding.
                for k in range(oh_lo * out_width):
                    row[k] = zero
                for k in range(oh_hi * out_width, out_height * out_width):
                    row[k] = zero
                for oh in range(oh_lo, oh_hi):
                    source = x[n, c, oh * sh + h_offset]
                    base = oh * out_width
                    for ow in range(ow_lo):
                        row[base + ow] = zero
                    for ow in range(ow_lo, ow_hi):
                        row[base + ow] = source[ow * sw + w_offset]
                    for ow in range(ow_hi, out_width):
                        row[base + ow] = zero
    return cols


@njit(cache=True, parallel=True)
def col2im(cols, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    """Fold columns back onto the input: the adjoint of :func:`im2col`.

    Args:
        cols: C-contiguous float32 or float64 array of shape (N, C*kh*kw, OH*OW), with OH and OW
            given by the formula in :func:`im2col` for an (H, W) input.
        C, H, W: channels, height and width of the input that ``cols`` was unfolded from.
        kh, kw, sh, sw, ph, pw, dh, dw: kernel size, stride, padding and dilation, as in
            :func:`im2col`.

    Returns:
        x_grad, a new array of cols' dtype with shape (N, C, H, W):

            x_grad[n, c, h, w] = sum of cols[n, (c*kh + i)*kw + j, oh*OW + ow]
                                 over all (i, j, oh, ow) with oh*sh - ph + i*dh == h
                                 and ow*sw - pw + j*dw == w.

        Entries that im2col read from the padding are dropped. Each element receives its terms
        in ascending (i, j) order (for fixed (i, j) at most one (oh, ow) maps to it), which makes
        the result reproducible and equal to a NumPy scatter done in the same order.

    Preconditions (checked by the caller, not here): kh, kw, sh, sw, dh, dw >= 1, ph, pw >= 0,
    and ``cols.shape == (N, C*kh*kw, OH*OW)``.

    Parallel over the N*C output planes, so no two threads write the same element.

    Example:
        >>> import numpy as np
        >>> cols = np.ones((1, 4, 4))  # a 2x2 kernel over a 3x3 input: 4 positions
        >>> col2im(cols, 1, 3, 3, 2, 2, 1, 1, 0, 0, 1, 1)[0, 0]
        array([[1., 2., 1.],
               [2., 4., 2.],
               [1., 2., 1.]])
    """
    batch = cols.shape[0]
    out_height = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_width = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    x_grad = np.zeros((batch, C, H, W), dtype=cols.dtype)
    for plane in prange(batch * C):
        n = plane // C
        c = plane - n * C
        for i in range(kh):
            h_offset = i * dh - ph
            oh_lo, oh_hi = _valid_output_range(h_offset, sh, H, out_height)
            for j in range(kw):
                w_offset = j * dw - pw
                ow_lo, ow_hi = _valid_output_range(w_offset, sw, W, out_width)
                row = cols[n, (c * kh + i) * kw + j]
                for oh in range(oh_lo, oh_hi):
                    target = x_grad[n, c, oh * sh + h_offset]
                    base = oh * out_width
                    for ow in range(ow_lo, ow_hi):
                        target[ow * sw + w_offset] += row[base + ow]
    return x_grad
