"""Max and average 2-d pooling over (N, C, H, W) arrays, forward and backward.

Both poolings slide a (kh, kw) window with stride (sh, sw) over an input padded by (ph, pw) on
each side. Max pooling also takes a dilation (dh, dw) and produces

    OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1        (OW likewise)

outputs per plane; average pooling has no dilation, so OH = (H + 2*ph - kh) // sh + 1.
Both follow PyTorch's CPU kernels with ceil_mode=False (and divisor_override=None for average
pooling) element for element, including the choice among ties and the handling of NaN.

All kernels are pure functions: they return new arrays and never modify their arguments. The
public functions allocate their results with NumPy and hand them to a jitted loop that runs in
parallel over the N*C planes (NumPy's allocator gets transparent huge pages on large arrays,
numba's does not; see ``im2col.py``). Loops compile lazily on first call, one specialisation per
dtype, are cached on disk, and run unchanged as plain Python under ``NUMBA_DISABLE_JIT=1``.
"""

import numpy as np
from numba import njit, prange

__all__ = [
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
]


def _pool_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@njit(cache=True)
def _valid_window_range(start, dilation, size, kernel):
    """Return (lo, hi) such that ``0 <= start + k*dilation < size`` exactly for k in [lo, hi).

    k is limited to [0, kernel) and ``lo <= hi`` always holds (the range may be empty).
    """
    if start >= 0:
        lo = 0
    else:
        lo = (-start + dilation - 1) // dilation  # ceil(-start / dilation); numerator > 0
    if start >= size:
        hi = 0
    else:
        hi = (size - start + dilation - 1) // dilation  # ceil((size - start) / dilation)
    lo = min(lo, kernel)
    hi = max(min(hi, kernel), lo)
    return lo, hi


@njit(cache=True)
def _average_window(start, kernel, size, padding):
    """PyTorch's average-pooling window along one axis.

    Returns (lo, hi, padded_extent): the input range [lo, hi) clipped to [0, size), and the
    window's extent measured before clipping, where the window may run into the padding but
    not past it.
    """
    end = min(start + kernel, size + padding)
    return max(start, 0), min(end, size), end - start


@njit(cache=True, parallel=True)
def _max_pool2d_forward_fill(x, kh, kw, sh, sw, ph, pw, dh, dw, out, argmax):
    batch, channels, height, width = x.shape
    out_height = out.shape[2]
    out_width = out.shape[3]
    minus_infinity = x.dtype.type(-np.inf)
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        source = x[n, c]
        for oh in range(out_height):
            h_start = oh * sh - ph
            i_lo, i_hi = _valid_window_range(h_start, dh, height, kh)
            for ow in range(out_width):
                w_start = ow * sw - pw
                j_lo, j_hi = _valid_window_range(w_start, dw, width, kw)
                if i_lo == i_hi or j_lo == j_hi:
                    # The window lies entirely in the padding.
                    out[n, c, oh, ow] = minus_infinity
                    argmax[n, c, oh, ow] = -1
                    continue
                # Starting from the first element in the window gives the same result as
                # PyTorch's start from (-inf, first index), including all -inf windows.
                best_h = h_start + i_lo * dh
                best_w = w_start + j_lo * dw
                best_value = source[best_h, best_w]
                best_index = best_h * width + best_w
                for i in range(i_lo, i_hi):
                    h = h_start + i * dh
                    for j in range(j_lo, j_hi):
                        w = w_start + j * dw
                        value = source[h, w]
                        # Strict '>' keeps the first of equal maxima; a NaN always replaces, so
                        # the result is NaN and argmax points at the window's last NaN.
                        if value > best_value or np.isnan(value):
                            best_value = value
                            best_index = h * width + w
                out[n, c, oh, ow] = best_value
                argmax[n, c, oh, ow] = best_index


@njit(cache=True, parallel=True)
def _max_pool2d_backward_scatter(grad_out, argmax, grad_x):
    batch, channels, out_height, out_width = grad_out.shape
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        target = grad_x[n, c]
        for oh in range(out_height):
            for ow in range(out_width):
                index = argmax[n, c, oh, ow]
                if index >= 0:
                    target[index] += grad_out[n, c, oh, ow]


@njit(cache=True, parallel=True)
def _avg_pool2d_forward_fill(x, kh, kw, sh, sw, ph, pw, count_include_pad, out):
    batch, channels, height, width = x.shape
    out_height = out.shape[2]
    out_width = out.shape[3]
    zero = x.dtype.type(0)
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        source = x[n, c]
        for oh in range(out_height):
            h_lo, h_hi, h_extent = _average_window(oh * sh - ph, kh, height, ph)
            for ow in range(out_width):
                w_lo, w_hi, w_extent = _average_window(ow * sw - pw, kw, width, pw)
                if h_lo >= h_hi or w_lo >= w_hi:
                    out[n, c, oh, ow] = zero
                    continue
                if count_include_pad:
                    divisor = h_extent * w_extent
                else:
                    divisor = (h_hi - h_lo) * (w_hi - w_lo)
                # Summed in the input dtype, in row-major order, as PyTorch does.
                total = zero
                for h in range(h_lo, h_hi):
                    for w in range(w_lo, w_hi):
                        total += source[h, w]
                out[n, c, oh, ow] = total / divisor


@njit(cache=True, parallel=True)
def _avg_pool2d_backward_scatter(grad_out, kh, kw, sh, sw, ph, pw, count_include_pad, grad_x):
    batch, channels, height, width = grad_x.shape
    out_height = grad_out.shape[2]
    out_width = grad_out.shape[3]
    dtype = grad_x.dtype
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        target = grad_x[n, c]
        for oh in range(out_height):
            h_lo, h_hi, h_extent = _average_window(oh * sh - ph, kh, height, ph)
            for ow in range(out_width):
                w_lo, w_hi, w_extent = _average_window(ow * sw - pw, kw, width, pw)
                if count_include_pad:
                    divisor = h_extent * w_extent
                else:
                    divisor = (h_hi - h_lo) * (w_hi - w_lo)
                if divisor == 0:
                    continue  # an empty window received nothing in the forward pass
                # Rounded to the gradient dtype once, then added, as PyTorch does.
                share = dtype.type(grad_out[n, c, oh, ow] / divisor)
                for h in range(h_lo, h_hi):
                    for w in range(w_lo, w_hi):
                        target[h, w] += share


def max_pool2d_forward(x, kh, kw, sh, sw, ph, pw, dh, dw):
    """Max pooling with dilation, returning the maxima and where they came from.

    Args:
        x: C-contiguous float32 or float64 array of shape (N, C, H, W).
        kh, kw: window height and width (>= 1).
        sh, sw: stride (>= 1).
        ph, pw: padding on each side (0 <= ph <= kh // 2, 0 <= pw <= kw // 2); it acts as -inf.
        dh, dw: dilation (>= 1).

    Returns:
        (out, argmax), both of shape (N, C, OH, OW) with
        ``OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1`` (OW likewise):

            out[n, c, oh, ow] = max over i < kh, j < kw of x[n, c, h, w],
                h = oh*sh - ph + i*dh,  w = ow*sw - pw + j*dw,  (h, w) inside the input,

        and argmax (int64) the flat index ``h*W + w`` of the chosen element inside its (n, c)
        plane. Among equal maxima the first in row-major window order wins; if the window
        holds a NaN, out is NaN and argmax points at the window's last NaN (both as PyTorch's
        CPU kernel). A window that lies wholly in the padding (possible only with dilation on
        tiny inputs) gives -inf and argmax -1, which :func:`max_pool2d_backward` skips.

    Preconditions, checked by the caller and not here: the integer ranges above, OH >= 1 and
    OW >= 1.

    Example:
        >>> import numpy as np
        >>> x = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
        >>> out, argmax = max_pool2d_forward(x, 2, 2, 1, 1, 0, 0, 1, 1)
        >>> out[0, 0, 0, 0], argmax[0, 0, 0, 0]
        (np.float64(3.0), np.int64(1))
    """
    batch, channels, height, width = x.shape
    out_shape = (
        batch,
        channels,
        _pool_output_size(height, kh, sh, ph, dh),
        _pool_output_size(width, kw, sw, pw, dw),
    )
    out = np.empty(out_shape, dtype=x.dtype)
    argmax = np.empty(out_shape, dtype=np.int64)
    _max_pool2d_forward_fill(x, kh, kw, sh, sw, ph, pw, dh, dw, out, argmax)
    return out, argmax


def max_pool2d_backward(grad_out, argmax, H, W):
    """Gradient of :func:`max_pool2d_forward` with respect to its input.

    Args:
        grad_out: C-contiguous float32 or float64 array of shape (N, C, OH, OW).
        argmax: the int64 array of the same shape returned by the forward pass.
        H, W: height and width of the forward input.

    Returns:
        grad_x of grad_out's dtype and shape (N, C, H, W), zero except

            grad_x[n, c].flat[argmax[n, c, oh, ow]] += grad_out[n, c, oh, ow]

        for every output position with argmax >= 0, added in row-major (oh, ow) order.

    Preconditions, checked by the caller and not here: every argmax entry is -1 or lies in
    [0, H*W); this holds for arrays produced by :func:`max_pool2d_forward`.

    Example:
        >>> import numpy as np
        >>> grad_out = np.array([[[[5.0]]]])
        >>> argmax = np.array([[[[1]]]])
        >>> max_pool2d_backward(grad_out, argmax, 2, 2)[0, 0]
        array([[0., 5.],
               [0., 0.]])
    """
    batch, channels = grad_out.shape[0], grad_out.shape[1]
    grad_x = np.zeros((batch, channels, H * W), dtype=grad_out.dtype)
    _max_pool2d_backward_scatter(grad_out, argmax, grad_x)
    return grad_x.reshape(batch, channels, H, W)


def avg_pool2d_forward(x, kh, kw, sh, sw, ph, pw, count_include_pad):
    """Average pooling, matching torch.nn.functional.avg_pool2d (ceil_mode=False).

    Args:
        x: C-contiguous float32 or float64 array of shape (N, C, H, W).
        kh, kw: window height and width (>= 1).
        sh, sw: stride (>= 1).
        ph, pw: zero padding on each side (0 <= ph <= kh // 2, 0 <= pw <= kw // 2).
        count_include_pad: whether padded positions count in the divisor.

    Returns:
        out of x's dtype and shape (N, C, OH, OW), ``OH = (H + 2*ph - kh) // sh + 1`` (OW
        likewise). For each output, along each axis (shown for h):

            hstart = oh*sh - ph;  hend = min(hstart + kh, H + ph)
            pool_size = (hend - hstart) * (wend - wstart)       (before clipping)
            hstart, hend = max(hstart, 0), min(hend, H)         (clip to the input)
            divisor = pool_size if count_include_pad else (hend - hstart) * (wend - wstart)
            out[n, c, oh, ow] = sum(x[n, c, hstart:hend, wstart:wend]) / divisor

        The sum runs in the input dtype in row-major order; a window with no input element
        gives 0 (both as PyTorch).

    Preconditions, checked by the caller and not here: the integer ranges above, OH >= 1 and
    OW >= 1.

    Example:
        >>> import numpy as np
        >>> x = np.ones((1, 1, 2, 2))
        >>> avg_pool2d_forward(x, 2, 2, 1, 1, 1, 1, True)[0, 0]
        array([[0.25, 0.5 , 0.25],
               [0.5 , 1.  , 0.5 ],
               [0.25, 0.5 , 0.25]])
        >>> avg_pool2d_forward(x, 2, 2, 1, 1, 1, 1, False)[0, 0]
        array([[1., 1., 1.],
               [1., 1., 1.],
               [1., 1., 1.]])
    """
    batch, channels, height, width = x.shape
    out = np.empty(
        (
            batch,
            channels,
            _pool_output_size(height, kh, sh, ph, 1),
            _pool_output_size(width, kw, sw, pw, 1),
        ),
        dtype=x.dtype,
    )
    _avg_pool2d_forward_fill(x, kh, kw, sh, sw, ph, pw, count_include_pad, out)
    return out


def avg_pool2d_backward(grad_out, H, W, kh, kw, sh, sw, ph, pw, count_include_pad):
    """Gradient of :func:`avg_pool2d_forward` with respect to its input (its adjoint).

    Args:
        grad_out: C-contiguous float32 or float64 array of shape (N, C, OH, OW).
        H, W: height and width of the forward input.
        kh, kw, sh, sw, ph, pw, count_include_pad: as in :func:`avg_pool2d_forward`.

    Returns:
        grad_x of grad_out's dtype and shape (N, C, H, W): with the window and divisor of
        :func:`avg_pool2d_forward`, each output adds ``grad_out[n, c, oh, ow] / divisor``
        (rounded to the dtype once) to every input element of its clipped window, in
        row-major (oh, ow) order.

    Preconditions, checked by the caller and not here: as for :func:`avg_pool2d_forward`, and
    grad_out's OH, OW are those the forward pass gives for an (H, W) input.

    Example:
        >>> import numpy as np
        >>> avg_pool2d_backward(np.ones((1, 1, 1, 1)), 2, 2, 2, 2, 1, 1, 0, 0, True)[0, 0]
        array([[0.25, 0.25],
               [0.25, 0.25]])
    """
    batch, channels = grad_out.shape[0], grad_out.shape[1]
    grad_x = np.zeros((batch, channels, H, W), dtype=grad_out.dtype)
    _avg_pool2d_backward_scatter(grad_out, kh, kw, sh, sw, ph, pw, count_include_pad, grad_x)
    return grad_x
