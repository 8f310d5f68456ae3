"""Max and average 2-d pooling over (N, C, H, W) arrays, forward and backward.

Both poolings slide a (kh, kw) window with stride (sh, sw) over an input padded by (ph, pw) on
each side. Max pooling also takes a dilation (dh, dw) and produces

    OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1        (OW likewise)

outputs per plane; average pooling has no dilation, so OH = (H + 2*ph - kh) // sh + 1.
Both follow PyTorch's CPU kernels with ceil_mode=False (and divisor_override=None for average
pooling) element for element, including the choice among ties and the handling of NaN.

All kernels are pure functions: they return new arrays and never modify their arguments. The
public functions allocate their results with NumPy and hand them to a jitted loop over the N*C
planes (NumPy's allocator gets transparent huge pages on large arrays, numba's does not; see
``im2col.py``). Loops compile lazily on first call, one specialisation per dtype, are cached on
disk, and run unchanged as plain Python under ``NUMBA_DISABLE_JIT=1``.

The max-pooling loops are serial, index planes of the inputs viewed as (N*C, H*W) with
unsigned indices and never slice views (the reasons, measured, are in ``im2col.py``: numba
threads next to OpenBLAS's spinning threads ran a conv-ReLU-pool block several times slower,
see docs/benchmarks.md, "Measurements behind the code"; a view or array-passing call per
plane costs an atomic reference count update).
The average-pooling loops are serial too, for the same reason.
"""

import numpy as np
from numba import njit

from .window import output_size, valid_range, window_geometry

__all__ = [
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
]


@njit(cache=True)
def _average_window(start, kernel, size, padding):
    """PyTorch's average-pooling window along one axis.

    Returns (lo, hi, padded_extent): the input range [lo, hi) clipped to [0, size), and the
    window's extent measured before clipping, where the window may run into the padding but
    not past it.
    """
    end = min(start + kernel, size + padding)
    return max(start, 0), min(end, size), end - start


@njit(cache=True)
def _average_divisor(h_lo, h_hi, h_extent, w_lo, w_hi, w_extent, count_include_pad):
    """PyTorch's divisor for the windows :func:`_average_window` gives along h and w: the
    padded extent with count_include_pad, else the number of input elements."""
    if count_include_pad:
        return h_extent * w_extent
    return (h_hi - h_lo) * (w_hi - w_lo)


@njit(cache=True)
def _window_offsets(width, kh, kw, dh, dw):
    """Flat offsets ``i*dh*W + j*dw`` of the kh*kw window taps from the window's first
    element, in row-major (i, j) order."""
    offsets = np.empty(kh * kw, dtype=np.uintp)
    for i in range(kh):
        for j in range(kw):
            offsets[i * kw + j] = i * dh * width + j * dw
    return offsets


@njit(cache=True)
def _max_step(best_key, best_index, value, index, infinity):
    """One step of the max-pooling rule: the new (key, index) after looking at ``value``.

    The running best is kept as a key: the best value, with NaN recorded as +inf. ``value``
    is taken when ``not (value <= key)``: a NaN value compares false, so a NaN is always
    taken; once the best is a NaN, nothing but another NaN passes its +inf key; otherwise
    this is ``value > best``, so the first of equal maxima stays.
    """
    take = not (value <= best_key)
    key = infinity if np.isnan(value) else value
    return (key if take else best_key), (index if take else best_index)


@njit(cache=True)
def _max_pool2d_forward_fill(x2, out2, argmax2, offsets, geometry):
    """Max pooling of every plane of x2 (N*C, H*W) into out2 and argmax2 (N*C, OH*OW).

    ``offsets`` is :func:`_window_offsets` for this geometry; windows wholly inside the input
    use it as a fast path. An empty ``offsets`` turns the fast path off, so that the tests can
    check that it gives the same result as the general path, bit for bit.

    Every window starts from its first valid element and moves to a later element that is
    larger or NaN (:func:`_max_step`). Starting there gives the same result as PyTorch's start
    from (-inf, first index), including all -inf windows; strict '>' keeps the first of equal
    maxima, and a NaN always replaces, so the result is NaN and argmax points at the window's
    last NaN. The output is read back at the chosen index.

    Why it is written this way (each measured): one comparison and a select per element, with
    no branch on the data (mispredicted half the time), keep the dependency chain through a
    window short, faster on 3x3 windows than ``if value > best or isnan(value)``; and the
    four taps of a 2x2 window (``MaxPool2d(2)``, by far the most common pooling) are written
    out, faster than the loop over taps (figures in docs/benchmarks.md, "Measurements behind
    the code").
    """
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    infinity = x2.dtype.type(np.inf)
    window_height = (kh - 1) * dh + 1
    window_width = (kw - 1) * dw + 1
    fast_path = offsets.size > 0
    two_by_two = fast_path and kh == 2 and kw == 2
    right = below = below_right = np.uintp(0)  # the taps after the first of a 2x2 window
    if two_by_two:
        right, below, below_right = offsets[1], offsets[2], offsets[3]
    for plane in range(x2.shape[0]):
        for oh in range(out_height):
            h_start = oh * sh - ph
            rows_inside = fast_path and h_start >= 0 and h_start + window_height <= height
            for ow in range(out_width):
                w_start = ow * sw - pw
                position = oh * out_width + ow
                if rows_inside and w_start >= 0 and w_start + window_width <= width:
                    # Fast paths for a window wholly inside the input (every window, without
                    # padding): no clipping, and the same elements in the same order as the
                    # clipped loops below.
                    first = np.uintp(h_start * width + w_start)
                    best_index = first
                    value = x2[plane, first]
                    best_key = infinity if np.isnan(value) else value
                    if two_by_two:
                        for index in (first + right, first + below, first + below_right):
                            best_key, best_index = _max_step(
                                best_key, best_index, x2[plane, index], index, infinity
                            )
                    else:
                        for t in range(1, offsets.size):
                            index = first + offsets[t]
                            best_key, best_index = _max_step(
                                best_key, best_index, x2[plane, index], index, infinity
                            )
                else:
                    i_lo, i_hi = valid_range(h_start, dh, height, kh)
                    j_lo, j_hi = valid_range(w_start, dw, width, kw)
                    if i_lo == i_hi or j_lo == j_hi:
                        # The window lies entirely in the padding.
                        out2[plane, position] = -infinity
                        argmax2[plane, position] = -1
                        continue
                    # The first element is compared with itself too, which changes nothing.
                    best_index = np.uintp((h_start + i_lo * dh) * width + w_start + j_lo * dw)
                    value = x2[plane, best_index]
                    best_key = infinity if np.isnan(value) else value
                    for i in range(i_lo, i_hi):
                        row = (h_start + i * dh) * width + w_start
                        for j in range(j_lo, j_hi):
                            index = np.uintp(row + j * dw)
                            best_key, best_index = _max_step(
                                best_key, best_index, x2[plane, index], index, infinity
                            )
                out2[plane, position] = x2[plane, best_index]
                argmax2[plane, position] = best_index


@njit(cache=True)
def _max_pool2d_backward_scatter(grad2, argmax2, grad_x2):
    """grad_x2[p, argmax2[p, q]] += grad2[p, q] for every plane p, in ascending q, skipping -1."""
    for plane in range(grad2.shape[0]):
        for position in range(grad2.shape[1]):
            index = argmax2[plane, position]
            if index >= 0:
                grad_x2[plane, index] += grad2[plane, position]


@njit(cache=True)
def _avg_pool2d_forward_fill(x, kh, kw, sh, sw, ph, pw, count_include_pad, out):
    batch, channels, height, width = x.shape
    out_height = out.shape[2]
    out_width = out.shape[3]
    zero = x.dtype.type(0)
    for plane in range(batch * channels):
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
                divisor = _average_divisor(h_lo, h_hi, h_extent, w_lo, w_hi, w_extent, count_include_pad)
                # Summed in the input dtype, in row-major order, as PyTorch does.
                total = zero
                for h in range(h_lo, h_hi):
                    for w in range(w_lo, w_hi):
                        total += source[h, w]
                out[n, c, oh, ow] = total / divisor


@njit(cache=True)
def _avg_pool2d_backward_scatter(grad_out, kh, kw, sh, sw, ph, pw, count_include_pad, grad_x):
    batch, channels, height, width = grad_x.shape
    out_height = grad_out.shape[2]
    out_width = grad_out.shape[3]
    dtype = grad_x.dtype
    for plane in range(batch * channels):
        n = plane // channels
        c = plane - n * channels
        target = grad_x[n, c]
        for oh in range(out_height):
            h_lo, h_hi, h_extent = _average_window(oh * sh - ph, kh, height, ph)
            for ow in range(out_width):
                w_lo, w_hi, w_extent = _average_window(ow * sw - pw, kw, width, pw)
                divisor = _average_divisor(h_lo, h_hi, h_extent, w_lo, w_hi, w_extent, count_include_pad)
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
    geometry = window_geometry(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    out_height, out_width = geometry[-2:]
    out = np.empty((batch, channels, out_height, out_width), dtype=x.dtype)
    argmax = np.empty((batch, channels, out_height, out_width), dtype=np.int64)
    planes = batch * channels
    _max_pool2d_forward_fill(
        x.reshape(planes, height * width),
        out.reshape(planes, out_height * out_width),
        argmax.reshape(planes, out_height * out_width),
        _window_offsets(width, kh, kw, dh, dw),
        geometry,
    )
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
    batch, channels, out_height, out_width = grad_out.shape
    planes = batch * channels
    grad_x = np.zeros((batch, channels, H, W), dtype=grad_out.dtype)
    _max_pool2d_backward_scatter(
        grad_out.reshape(planes, out_height * out_width),
        argmax.reshape(planes, out_height * out_width),
        grad_x.reshape(planes, H * W),
    )
    return grad_x


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
            output_size(height, kh, sh, ph, 1),
            output_size(width, kw, sw, pw, 1),
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
