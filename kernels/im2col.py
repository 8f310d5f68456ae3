"""im2col and col2im: the layouts that turn a 2-d convolution into a batched GEMM.

For an input ``x`` of shape (N, C, H, W) and a kernel of size (kh, kw) with stride (sh, sw),
zero padding (ph, pw) and dilation (dh, dw), the output spatial size is

    OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1
    OW = (W + 2*pw - dw*(kw - 1) - 1) // sw + 1

``im2col`` unfolds every receptive field into a column:

    cols[n, (c*kh + i)*kw + j, oh*OW + ow] = x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]

(0 where that position lies in the padding), so a convolution with weight (K, C, kh, kw) is
``weight.reshape(K, C*kh*kw) @ cols`` (batched over n). ``col2im`` is the adjoint of that linear
map: it adds every column entry back onto the input position it was read from and drops the
entries that were read from padding, so the convolution's input gradient is
``col2im(weight.reshape(K, -1).T @ grad_out.reshape(N, K, OH*OW), C, H, W, ...)``.

Both are pure functions: they return a new array and never modify their arguments. The public
functions allocate the result with NumPy and hand it to a jitted loop (``_im2col_fill``,
``_col2im_accumulate``). Allocating in NumPy is deliberate: NumPy asks Linux for transparent
huge pages on large arrays and numba's allocator does not, and for the ~230 MB ``cols`` of a
ResNet-sized layer the 4 KiB page faults alone cost several times the copy itself.

The loops are compiled lazily by numba on first call (one specialisation per dtype and layout)
and cached on disk; under ``NUMBA_DISABLE_JIT=1`` they run unchanged as plain Python.

How the loops stay fast: for each kernel row ``i`` the range of ``oh`` that reads inside the
input is computed once, and for each kernel column ``j`` the range of ``ow``, so the copy loop
has no bounds tests and the padding is written (or skipped) outside it. The copy loop indexes
views that start at the first valid element with a counter that starts at 0: numba then knows
no index is negative, drops its wraparound test, and LLVM vectorises the unit-stride case.
"""

import numpy as np
from numba import njit, prange

__all__ = ["im2col", "col2im"]


def _conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@njit(cache=True)
def _valid_output_range(offset, stride, size, count):
    """Return (lo, hi) such that ``0 <= offset + k*stride < size`` exactly for k in [lo, hi).

    k is limited to [0, count) and ``lo <= hi`` always holds (the range may be empty).
    Requires stride >= 1.
    """
    if offset >= 0:
        lo = 0
    else:
        lo = (-offset + stride - 1) // stride  # ceil(-offset / stride); numerator > 0
    if offset >= size:
        hi = 0
    else:
        hi = (size - offset + stride - 1) // stride  # ceil((size - offset) / stride)
    lo = min(lo, count)
    hi = max(min(hi, count), lo)
    return lo, hi


@njit(cache=True, parallel=True)
def _im2col_fill(x, kh, kw, sh, sw, ph, pw, dh, dw, cols):
    """Write im2col(x) into ``cols`` viewed as (N, C*kh*kw, OH, OW). Parallel over N*C planes."""
    batch, channels, height, width = x.shape
    out_height = cols.shape[2]
    out_width = cols.shape[3]
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
                count = ow_hi - ow_lo
                block = cols[n, (c * kh + i) * kw + j]
                for oh in range(out_height):
                    line = block[oh]
                    if oh < oh_lo or oh >= oh_hi or count == 0:
                        # This output row reads only padding.
                        for ow in range(out_width):
                            line[ow] = zero
                        continue
                    for ow in range(ow_lo):
                        line[ow] = zero
                    # Views starting at the first valid element, indexed from 0: no index can
                    # be negative, so the copy has no wraparound test and can be vectorised.
                    destination = line[ow_lo:ow_hi]
                    source = x[n, c, oh * sh + h_offset, ow_lo * sw + w_offset:]
                    if sw == 1:
                        for k in range(count):
                            destination[k] = source[k]
                    else:
                        for k in range(count):
                            destination[k] = source[k * sw]
                    for ow in range(ow_hi, out_width):
                        line[ow] = zero


@njit(cache=True, parallel=True)
def _col2im_accumulate(cols, kh, kw, sh, sw, ph, pw, dh, dw, x_grad):
    """Add ``cols`` viewed as (N, C*kh*kw, OH, OW) onto the zeroed ``x_grad`` (N, C, H, W).

    Parallel over the N*C planes of x_grad, so no two threads write the same element.
    """
    batch, channels, height, width = x_grad.shape
    out_height = cols.shape[2]
    out_width = cols.shape[3]
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        for i in range(kh):
            h_offset = i * dh - ph
            oh_lo, oh_hi = _valid_output_range(h_offset, sh, height, out_height)
            for j in range(kw):
                w_offset = j * dw - pw
                ow_lo, ow_hi = _valid_output_range(w_offset, sw, width, out_width)
                count = ow_hi - ow_lo
                if count == 0:
                    continue
                block = cols[n, (c * kh + i) * kw + j]
                for oh in range(oh_lo, oh_hi):
                    # Zero-based views, as in _im2col_fill.
                    source = block[oh, ow_lo:ow_hi]
                    target = x_grad[n, c, oh * sh + h_offset, ow_lo * sw + w_offset:]
                    if sw == 1:
                        for k in range(count):
                            target[k] += source[k]
                    else:
                        for k in range(count):
                            target[k * sw] += source[k]


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

    Preconditions, checked by the caller and not here: the integer ranges above, OH >= 1 and
    OW >= 1. The loop runs in parallel over the N*C input planes.

    Example:
        >>> import numpy as np
        >>> x = np.arange(4.0).reshape(1, 1, 2, 2)
        >>> im2col(x, 2, 2, 1, 1, 0, 0, 1, 1)[0, :, 0]
        array([0., 1., 2., 3.])
        >>> im2col(x, 1, 1, 1, 1, 1, 1, 1, 1)[0, 0].reshape(4, 4)
        array([[0., 0., 0., 0.],
               [0., 0., 1., 0.],
               [0., 2., 3., 0.],
               [0., 0., 0., 0.]])
    """
    batch, channels, height, width = x.shape
    out_height = _conv_output_size(height, kh, sh, ph, dh)
    out_width = _conv_output_size(width, kw, sw, pw, dw)
    cols = np.empty((batch, channels * kh * kw, out_height * out_width), dtype=x.dtype)
    cols_by_row = cols.reshape(batch, channels * kh * kw, out_height, out_width)  # a view
    _im2col_fill(x, kh, kw, sh, sw, ph, pw, dh, dw, cols_by_row)
    return cols


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
        in ascending (i, j) order (for a fixed (i, j) at most one (oh, ow) lands on it), so the
        result is reproducible and equals a NumPy scatter done in the same order.

    Preconditions, checked by the caller and not here: the integer ranges of :func:`im2col`
    and ``cols.shape[1:] == (C*kh*kw, OH*OW)`` (a mismatch in size raises ValueError from the
    reshape). The loop runs in parallel over the N*C planes of x_grad, so no two threads
    write the same element.

    Example:
        >>> import numpy as np
        >>> cols = np.ones((1, 4, 4))  # a 2x2 kernel at the 4 positions of a 3x3 input
        >>> col2im(cols, 1, 3, 3, 2, 2, 1, 1, 0, 0, 1, 1)[0, 0]
        array([[1., 2., 1.],
               [2., 4., 2.],
               [1., 2., 1.]])
    """
    batch = cols.shape[0]
    out_height = _conv_output_size(H, kh, sh, ph, dh)
    out_width = _conv_output_size(W, kw, sw, pw, dw)
    x_grad = np.zeros((batch, C, H, W), dtype=cols.dtype)
    cols_by_row = cols.reshape(batch, C * kh * kw, out_height, out_width)
    _col2im_accumulate(cols_by_row, kh, kw, sh, sw, ph, pw, dh, dw, x_grad)
    return x_grad
