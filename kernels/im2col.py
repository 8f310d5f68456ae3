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
functions allocate the result with NumPy and hand it to a jitted loop. Allocating in NumPy is
deliberate: NumPy asks Linux for transparent huge pages on large arrays and numba's allocator
does not, and for the ~230 MB ``cols`` of a ResNet-sized layer the 4 KiB page faults alone cost
several times the copy itself.

The loops are compiled lazily by numba on first call (one specialisation per dtype) and cached
on disk; under ``NUMBA_DISABLE_JIT=1`` they run unchanged as plain Python. They see ``x`` as
(N*C, H*W) and ``cols`` as (N*C, kh*kw*OH*OW): plane p = n*C + c owns row p of both. There are
two algorithms, chosen by the output width:

* by rows (wide outputs): for each kernel tap (i, j) the range of output rows and columns that
  read inside the input is computed once; each valid output row is then one contiguous copy
  (or add, for col2im) that LLVM vectorises. im2col writes into a zeroed array, so the padding
  needs no work at all.
* by table (narrow outputs, below a measured width): with rows of a few elements the per-row
  setup costs more than the copy, so a table computed once per call, one entry per column
  element of a plane, holds the input element it reads (``h*W + w``, or ``H*W`` for padding),
  and each plane becomes a single loop over that table.

Measuring also decided three details:

* Indices into the planes are unsigned (``np.uintp``). numba tests every signed index for a
  negative value (Python's wraparound), and that test keeps LLVM from vectorising a copy.
* The loops index the 2-d arrays directly and never slice a view per row or per plane: in a
  serial numba function every view (and every call that passes an array) updates a reference
  count with an atomic operation, which costs more than copying a short row.
* The loops are serial. A convolution calls BLAS right before and after them, and OpenBLAS's
  worker threads keep spinning for a while after each multithreaded GEMM; a numba
  ``parallel=True`` loop there competes with them for the cores, runs slower than the serial
  loop, and its own threads, spinning in turn, slow the next GEMM. With parallel loops conv2d
  forward+backward was slower on both layers measured, several times slower on the small one;
  only layers whose GEMMs all run on one thread gained, a little (figures in
  docs/benchmarks.md, "Measurements behind the code").
"""

import numpy as np
from numba import njit

from .window import valid_range, window_geometry

__all__ = ["im2col", "col2im"]

# Below these output widths the table loops beat the row loops; at and above them the row
# loops win (their copies vectorise). Measured on 3x3 convolutions, 32 samples of 32 channels.
_IM2COL_TABLE_BELOW_WIDTH = 16
_COL2IM_TABLE_BELOW_WIDTH = 10


@njit(cache=True)
def _tap_rows(i, j, geometry):
    """Where kernel tap (i, j) reads inside the input, for the row loops of im2col and col2im.

    Returns (oh_lo, oh_hi, count, column, element): the tap reads inside the input at output
    rows [oh_lo, oh_hi) and, in each of them, at the ``count`` outputs from ow_lo on
    (:func:`valid_range` along each axis). Row oh's run starts at ``column + oh*OW`` in a
    plane of cols, where it is contiguous, and at ``element + oh*sh*W`` in a plane of x, where
    it steps by sw.
    """
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    h_offset = i * dh - ph
    w_offset = j * dw - pw
    oh_lo, oh_hi = valid_range(h_offset, sh, height, out_height)
    ow_lo, ow_hi = valid_range(w_offset, sw, width, out_width)
    column = (i * kw + j) * out_height * out_width + ow_lo
    element = h_offset * width + ow_lo * sw + w_offset
    return oh_lo, oh_hi, np.uintp(ow_hi - ow_lo), column, element


# ----------------------------------------------------------------------------- im2col


@njit(cache=True)
def _im2col_by_table(x2, cols2, table, fill):
    """cols2[p, k] = x2[p, table[k]] for every plane p, or fill where the table points past it."""
    plane_size = np.uintp(x2.shape[1])
    for plane in range(x2.shape[0]):
        for k in range(table.size):
            index = table[k]
            cols2[plane, k] = x2[plane, index] if index < plane_size else fill


@njit(cache=True)
def _im2col_by_rows(x2, cols2, geometry):
    """Copy the valid part of every output row of every tap of every plane; cols2 holds the
    padding value already."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    stride = np.uintp(sw)
    for plane in range(x2.shape[0]):
        for i in range(kh):
            for j in range(kw):
                oh_lo, oh_hi, count, column, element = _tap_rows(i, j, geometry)
                for oh in range(oh_lo, oh_hi):
                    target = np.uintp(column + oh * out_width)
                    source = np.uintp(element + oh * sh * width)
                    if sw == 1:
                        for k in range(count):
                            cols2[plane, target + k] = x2[plane, source + k]
                    else:
                        for k in range(count):
                            cols2[plane, target + k] = x2[plane, source + k * stride]


def _column_table(geometry):
    """For one plane: ``table[(i*kw + j)*OH*OW + oh*OW + ow]`` is the flat index ``h*W + w`` of
    the input element that column entry reads, or ``H*W`` (one past the plane) for padding.

    That is the im2col of a plane that holds its own indices, padded with ``H*W``, so the row
    loop computes it and the two algorithms share one index rule."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    indices = np.arange(height * width, dtype=np.uintp).reshape(1, height * width)
    table = np.full((1, kh * kw * out_height * out_width), height * width, dtype=np.uintp)
    _im2col_by_rows(indices, table, geometry)
    return table[0]


@njit(cache=True)
def _im2col_fill(x2, cols2, table, geometry, fill):
    """im2col of every plane of x2 into cols2: by table when one is given, else by rows."""
    if table.size > 0:
        _im2col_by_table(x2, cols2, table, fill)
    else:
        _im2col_by_rows(x2, cols2, geometry)


# ----------------------------------------------------------------------------- col2im


@njit(cache=True)
def _col2im_by_table(cols2, x_grad2, table):
    """x_grad2[p, table[k]] += cols2[p, k] in ascending k for every plane p, skipping the
    entries that point past the plane (padding)."""
    plane_size = np.uintp(x_grad2.shape[1])
    for plane in range(x_grad2.shape[0]):
        for k in range(table.size):
            index = table[k]
            if index < plane_size:
                x_grad2[plane, index] += cols2[plane, k]


@njit(cache=True)
def _col2im_by_rows(cols2, x_grad2, geometry):
    """Add the valid part of every output row of every tap onto its input row."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    stride = np.uintp(sw)
    for plane in range(x_grad2.shape[0]):
        for i in range(kh):
            for j in range(kw):
                oh_lo, oh_hi, count, column, element = _tap_rows(i, j, geometry)
                for oh in range(oh_lo, oh_hi):
                    source = np.uintp(column + oh * out_width)
                    target = np.uintp(element + oh * sh * width)
                    if sw == 1:
                        for k in range(count):
                            x_grad2[plane, target + k] += cols2[plane, source + k]
                    else:
                        for k in range(count):
                            x_grad2[plane, target + k * stride] += cols2[plane, source + k]


@njit(cache=True)
def _col2im_accumulate(cols2, x_grad2, table, geometry):
    """Add every plane of cols2 onto the zeroed x_grad2: by table when one is given."""
    if table.size > 0:
        _col2im_by_table(cols2, x_grad2, table)
    else:
        _col2im_by_rows(cols2, x_grad2, geometry)


# ----------------------------------------------------------------------------- public


def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, fill=0):
    """Unfold the receptive fields of ``x`` into columns.

    Args:
        x: C-contiguous array of shape (N, C, H, W): float32 or float64 for the float conv,
            uint8 for the int8 conv's short-depth path (``kernels/int8_conv.py``).
        kh, kw: kernel height and width (>= 1).
        sh, sw: stride (>= 1).
        ph, pw: padding on both sides (>= 0).
        dh, dw: dilation (>= 1).
        fill: the value read in the padding (0; an int8 conv pads with its input's zero point).

    Returns:
        cols, a new array of x's dtype with shape (N, C*kh*kw, OH*OW), where
        ``OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1`` (OW likewise) and

            cols[n, (c*kh + i)*kw + j, oh*OW + ow] = x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]

        or ``fill`` where that position lies outside [0, H) x [0, W).

    Preconditions, checked by the caller and not here: the integer ranges above, OH >= 1 and
    OW >= 1.

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
    geometry = window_geometry(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    out_height, out_width = geometry[-2:]
    shape = (batch, channels * kh * kw, out_height * out_width)
    plane_columns = kh * kw * out_height * out_width
    fill = x.dtype.type(fill)
    if out_width < _IM2COL_TABLE_BELOW_WIDTH:
        table = _column_table(geometry)
        cols = np.empty(shape, dtype=x.dtype)  # the table loop writes every element
    else:
        table = np.empty(0, dtype=np.uintp)
        # the row loop leaves the padding untouched (np.zeros: calloc'd pages, no write pass)
        cols = np.zeros(shape, dtype=x.dtype) if fill == 0 else np.full(shape, fill, dtype=x.dtype)
    x2 = x.reshape(batch * channels, height * width)
    _im2col_fill(x2, cols.reshape(batch * channels, plane_columns), table, geometry, fill)
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
    reshape).

    Example:
        >>> import numpy as np
        >>> cols = np.ones((1, 4, 4))  # a 2x2 kernel at the 4 positions of a 3x3 input
        >>> col2im(cols, 1, 3, 3, 2, 2, 1, 1, 0, 0, 1, 1)[0, 0]
        array([[1., 2., 1.],
               [2., 4., 2.],
               [1., 2., 1.]])
    """
    batch = cols.shape[0]
    geometry = window_geometry(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    out_height, out_width = geometry[-2:]
    if out_width < _COL2IM_TABLE_BELOW_WIDTH:
        table = _column_table(geometry)
    else:
        table = np.empty(0, dtype=np.uintp)
    x_grad = np.zeros((batch, C, H, W), dtype=cols.dtype)
    cols2 = cols.reshape(batch * C, kh * kw * out_height * out_width)
    _col2im_accumulate(cols2, x_grad.reshape(batch * C, H * W), table, geometry)
    return x_grad
