"""im2col and col2im: the layout that turns a 2-d convolution into one GEMM per layer.

For an input ``x`` of shape (N, C, H, W) and a kernel of size (kh, kw) with stride (sh, sw),
zero padding (ph, pw) and dilation (dh, dw), the output spatial size is

    OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1
    OW = (W + 2*pw - dw*(kw - 1) - 1) // sw + 1

``im2col`` unfolds every receptive field of every sample into a column of one matrix, with
P = OH*OW:

    cols[(c*kh + i)*kw + j, n*P + oh*OW + ow] = x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]

(0 where that position lies in the padding), so a convolution with weight (K, C, kh, kw) is a
single GEMM over the whole batch, ``weight.reshape(K, C*kh*kw) @ cols``, whose (K, N*P) result
is the output in channel-major order: ``out.reshape(K, N, OH, OW).transpose(1, 0, 2, 3)``.
``col2im`` is the adjoint of that linear map: it adds every column entry back onto the input
position it was read from and drops the entries that were read from padding, so the input
gradient is ``col2im(weight.reshape(K, -1).T @ grad.reshape(K, N*P), C, H, W, ...)``.

One GEMM per layer, not one per sample, is the point of the layout: a per-sample GEMM of a
16-channel layer multiplies a (16, 144) matrix by (144, 1024) columns N times, which BLAS runs
far below its speed on one (16, 144) by (144, N*1024) product. Channel-major activations,
``(N, C, H, W)`` arrays whose memory is ordered (C, N, H, W), are what the GEMM produces; the
kernels here read them as they are (and C-contiguous ones too), so the conv -> BatchNorm ->
ReLU -> conv chain of a network never transposes.

The public functions allocate with NumPy and hand the arrays to a jitted loop. Allocating in
NumPy is deliberate: NumPy asks Linux for transparent huge pages on large arrays and numba's
allocator does not, and for the tens of MB of ``cols`` of a ResNet-sized layer the 4 KiB page
faults alone cost several times the copy itself.

The loops are compiled lazily by numba on first call (one specialisation per dtype) and cached
on disk; under ``NUMBA_DISABLE_JIT=1`` they run unchanged as plain Python. They see ``x`` as
a stack of (H*W) planes, plane ``c*N + n`` (channel-major) or ``n*C + c`` (C-contiguous), and
``cols`` as a 2-d array. There are two algorithms, chosen by the output width:

* by rows (wide outputs): for each kernel tap (i, j) the range of output rows and columns that
  read inside the input is computed once; each valid output row is then one contiguous copy
  (or add, for col2im) that LLVM vectorises. im2col writes into a zeroed array, so the padding
  needs no work at all.
* by table (narrow outputs, below a measured width): with rows of a few elements the per-row
  setup costs more than the copy, so a table computed once per call, one entry per (tap,
  output position), holds the input element it reads (``h*W + w``, or ``H*W`` for padding),
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

from qatcore.errors import ShapeError

from .layout import is_channel_major, planes
from .window import valid_range, window_geometry

__all__ = ["im2col", "col2im", "col2im_add"]

# Below these output widths the table loops beat the row loops; at and above them the row
# loops win (their copies vectorise). Measured on 3x3 convolutions, 32 samples of 32 channels.
_IM2COL_TABLE_BELOW_WIDTH = 16
_COL2IM_TABLE_BELOW_WIDTH = 10


@njit(cache=True)
def _plane_index(n, c, batch, channels, channel_major):
    return c * batch + n if channel_major else n * channels + c


@njit(cache=True)
def _tap_rows(i, j, geometry):
    """Where kernel tap (i, j) reads inside the input, for the row loops of im2col and col2im.

    Returns (oh_lo, oh_hi, count, ow_lo, element): the tap reads inside the input at output
    rows [oh_lo, oh_hi) and, in each of them, at the ``count`` outputs from ow_lo on
    (:func:`valid_range` along each axis). Row oh's run starts at output position
    ``oh*OW + ow_lo`` of a sample, where it is contiguous in cols, and at element
    ``element + oh*sh*W`` of an input plane, where it steps by sw.
    """
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    h_offset = i * dh - ph
    w_offset = j * dw - pw
    oh_lo, oh_hi = valid_range(h_offset, sh, height, out_height)
    ow_lo, ow_hi = valid_range(w_offset, sw, width, out_width)
    element = h_offset * width + ow_lo * sw + w_offset
    return oh_lo, oh_hi, np.uintp(ow_hi - ow_lo), ow_lo, element


# ----------------------------------------------------------------------------- im2col


@njit(cache=True)
def _im2col_by_table(x2, cols, table, fill, layout):
    """cols[c*taps + t, s*P + p] = x2[plane(first + s, c), table[t, p]] for every channel c and
    sample s of the range, or fill where the table points past the plane."""
    batch, channels, channel_major, first, samples = layout
    taps, positions = table.shape
    plane_size = np.uintp(x2.shape[1])
    for c in range(channels):
        for s in range(samples):
            plane = _plane_index(first + s, c, batch, channels, channel_major)
            start = np.uintp(s * positions)
            for t in range(taps):
                row = c * taps + t
                for p in range(positions):
                    index = table[t, p]
                    cols[row, start + p] = x2[plane, index] if index < plane_size else fill


@njit(cache=True)
def _im2col_by_rows(x2, cols, geometry, layout):
    """Copy the valid part of every output row of every tap of every plane; cols holds the
    padding value already."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    batch, channels, channel_major, first, samples = layout
    positions = out_height * out_width
    stride = np.uintp(sw)
    for c in range(channels):
        for s in range(samples):
            plane = _plane_index(first + s, c, batch, channels, channel_major)
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    oh_lo, oh_hi, count, ow_lo, element = _tap_rows(i, j, geometry)
                    for oh in range(oh_lo, oh_hi):
                        target = np.uintp(s * positions + oh * out_width + ow_lo)
                        source = np.uintp(element + oh * sh * width)
                        if sw == 1:
                            for k in range(count):
                                cols[row, target + k] = x2[plane, source + k]
                        else:
                            for k in range(count):
                                cols[row, target + k] = x2[plane, source + k * stride]


def _column_table(geometry):
    """``table[i*kw + j, oh*OW + ow]`` is the flat index ``h*W + w`` of the input element that
    tap (i, j) reads at output (oh, ow), or ``H*W`` (one past the plane) for padding.

    That is the im2col of one plane that holds its own indices, padded with ``H*W``, so the
    row loop computes it and the two algorithms share one index rule."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    indices = np.arange(height * width, dtype=np.uintp).reshape(1, height * width)
    table = np.full((kh * kw, out_height * out_width), height * width, dtype=np.uintp)
    _im2col_by_rows(indices, table, geometry, (1, 1, False, 0, 1))
    return table


@njit(cache=True)
def _im2col_fill(x2, cols, table, geometry, fill, layout):
    """im2col of the planes of x2 into cols: by table when one is given, else by rows."""
    if table.size > 0:
        _im2col_by_table(x2, cols, table, fill, layout)
    else:
        _im2col_by_rows(x2, cols, geometry, layout)


# ----------------------------------------------------------------------------- col2im


@njit(cache=True)
def _col2im_by_table(cols, x_grad3, table, first):
    """x_grad3[c, first + s, table[t, p]] += cols[c*taps + t, s*P + p] in ascending t, skipping
    the entries that point past the plane (padding)."""
    channels, batch, plane_size = x_grad3.shape
    taps, positions = table.shape
    samples = cols.shape[1] // positions
    limit = np.uintp(plane_size)
    for c in range(channels):
        for s in range(samples):
            start = np.uintp(s * positions)
            for t in range(taps):
                row = c * taps + t
                for p in range(positions):
                    index = table[t, p]
                    if index < limit:
                        x_grad3[c, first + s, index] += cols[row, start + p]


@njit(cache=True)
def _col2im_by_rows(cols, x_grad3, geometry, first):
    """Add the valid part of every output row of every tap onto its input row."""
    height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_height, out_width = geometry
    channels = x_grad3.shape[0]
    positions = out_height * out_width
    samples = cols.shape[1] // positions
    stride = np.uintp(sw)
    for c in range(channels):
        for s in range(samples):
            n = first + s
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    oh_lo, oh_hi, count, ow_lo, element = _tap_rows(i, j, geometry)
                    for oh in range(oh_lo, oh_hi):
                        source = np.uintp(s * positions + oh * out_width + ow_lo)
                        target = np.uintp(element + oh * sh * width)
                        if sw == 1:
                            for k in range(count):
                                x_grad3[c, n, target + k] += cols[row, source + k]
                        else:
                            for k in range(count):
                                x_grad3[c, n, target + k * stride] += cols[row, source + k]


@njit(cache=True)
def _col2im_accumulate(cols, x_grad3, table, geometry, first):
    """Add cols onto samples [first, ...) of x_grad3: by table when one is given."""
    if table.size > 0:
        _col2im_by_table(cols, x_grad3, table, first)
    else:
        _col2im_by_rows(cols, x_grad3, geometry, first)


# ----------------------------------------------------------------------------- public


def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, fill=0, first_sample=0, samples=None, out=None):
    """Unfold the receptive fields of ``x`` into the columns of one matrix.

    Args:
        x: array of shape (N, C, H, W), C-contiguous or channel-major (``kernels.layout``;
            any other layout is copied first): float32 or float64 for the float conv, uint8
            for the int8 conv's short-depth path (``kernels/int8_conv.py``).
        kh, kw: kernel height and width (>= 1).
        sh, sw: stride (>= 1).
        ph, pw: padding on both sides (>= 0).
        dh, dw: dilation (>= 1).
        fill: the value read in the padding (0; an int8 conv pads with its input's zero point).
        first_sample, samples: unfold samples [first_sample, first_sample + samples) only
            (default: all of them), so a caller can work through a batch a few samples at a time.
        out: None, or the array an earlier call with the same arguments except x and
            first_sample returned: its padding holds ``fill`` already, so it is reused as it is
            and returned (a caller working through a batch in chunks fills one buffer, not
            a fresh zeroed array per chunk).

    Returns:
        cols, a new C-contiguous array of x's dtype with shape (C*kh*kw, S*OH*OW) for the S
        samples, where ``OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1`` (OW likewise) and

            cols[(c*kh + i)*kw + j, s*OH*OW + oh*OW + ow]
                = x[first_sample + s, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]

        or ``fill`` where that position lies outside [0, H) x [0, W).

    Preconditions, checked by the caller and not here: the integer ranges above, OH >= 1,
    OW >= 1 and the sample range inside [0, N).

    Example:
        >>> import numpy as np
        >>> x = np.arange(8.0).reshape(2, 1, 2, 2)
        >>> im2col(x, 2, 2, 1, 1, 0, 0, 1, 1)   # one column per sample
        array([[0., 4.],
               [1., 5.],
               [2., 6.],
               [3., 7.]])
        >>> im2col(x, 1, 1, 1, 1, 1, 1, 1, 1, samples=1).reshape(4, 4)
        array([[0., 0., 0., 0.],
               [0., 0., 1., 0.],
               [0., 2., 3., 0.],
               [0., 0., 0., 0.]])
    """
    batch, channels, height, width = x.shape
    samples = batch - first_sample if samples is None else samples
    geometry = window_geometry(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    out_height, out_width = geometry[-2:]
    shape = (channels * kh * kw, samples * out_height * out_width)
    fill = x.dtype.type(fill)
    if out_width < _IM2COL_TABLE_BELOW_WIDTH:
        table = _column_table(geometry)
        cols = np.empty(shape, dtype=x.dtype) if out is None else out  # the table loop writes every element
    else:
        table = np.empty((0, 0), dtype=np.uintp)
        # the row loop leaves the padding untouched
        if out is not None:
            cols = out
        else:
            cols = np.zeros(shape, dtype=x.dtype) if fill == 0 else np.full(shape, fill, dtype=x.dtype)
    if cols.shape != shape or cols.dtype != x.dtype or not cols.flags.c_contiguous:
        raise ShapeError(f"im2col: out must be a C-contiguous {shape} array of {x.dtype}")
    x2, channel_major = planes(x)
    layout = (batch, channels, channel_major, first_sample, samples)
    _im2col_fill(x2, cols, table, geometry, fill, layout)
    return cols


def col2im_add(cols, x_grad, first_sample, kh, kw, sh, sw, ph, pw, dh, dw):
    """Add the adjoint of :func:`im2col` of ``cols`` onto samples [first_sample, ...) of
    ``x_grad``, in place: the chunked form of :func:`col2im`.

    Args:
        cols: C-contiguous float32 or float64 array of shape (C*kh*kw, S*OH*OW) for S samples,
            with OH and OW given by the formula in :func:`im2col` for an (H, W) input.
        x_grad: channel-major (N, C, H, W) array of cols' dtype (``kernels.layout``, or N == 1
            and C-contiguous), modified in place.
        first_sample: where the S samples of cols start in x_grad.
        kh, kw, sh, sw, ph, pw, dh, dw: as in :func:`im2col`.

    Preconditions, checked by the caller and not here: the integer ranges of :func:`im2col`
    and first_sample + S <= N.
    """
    batch, channels, height, width = x_grad.shape
    geometry = window_geometry(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    out_height, out_width = geometry[-2:]
    if out_width < _COL2IM_TABLE_BELOW_WIDTH:
        table = _column_table(geometry)
    else:
        table = np.empty((0, 0), dtype=np.uintp)
    if not (is_channel_major(x_grad) or (batch == 1 and x_grad.flags.c_contiguous)):
        raise ShapeError("col2im_add: x_grad must be channel-major (kernels.layout), or one C-contiguous sample")
    x_grad3 = x_grad.swapaxes(0, 1).reshape(channels, batch, height * width)
    _col2im_accumulate(cols, x_grad3, table, geometry, first_sample)


def col2im(cols, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    """Fold columns back onto the input: the adjoint of :func:`im2col`.

    Args:
        cols: C-contiguous float32 or float64 array of shape (C*kh*kw, N*OH*OW), with OH and OW
            given by the formula in :func:`im2col` for an (H, W) input.
        C, H, W: channels, height and width of the input that ``cols`` was unfolded from.
        kh, kw, sh, sw, ph, pw, dh, dw: kernel size, stride, padding and dilation, as in
            :func:`im2col`.

    Returns:
        x_grad, a new channel-major array of cols' dtype with shape (N, C, H, W):

            x_grad[n, c, h, w] = sum of cols[(c*kh + i)*kw + j, n*OH*OW + oh*OW + ow]
                                 over all (i, j, oh, ow) with oh*sh - ph + i*dh == h
                                 and ow*sw - pw + j*dw == w.

        Entries that im2col read from the padding are dropped. Each element receives its terms
        in ascending (i, j) order (for a fixed (i, j) at most one (oh, ow) lands on it), so the
        result is reproducible and equals a NumPy scatter done in the same order.

    Preconditions, checked by the caller and not here: the integer ranges of :func:`im2col`
    and ``cols.shape == (C*kh*kw, N*OH*OW)``.

    Example:
        >>> import numpy as np
        >>> cols = np.ones((4, 4))  # a 2x2 kernel at the 4 positions of a 3x3 input
        >>> col2im(cols, 1, 3, 3, 2, 2, 1, 1, 0, 0, 1, 1)[0, 0]
        array([[1., 2., 1.],
               [2., 4., 2.],
               [1., 2., 1.]])
    """
    geometry = window_geometry(H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    positions = geometry[-2] * geometry[-1]
    batch = cols.shape[1] // positions
    x_grad = np.zeros((C, batch, H, W), dtype=cols.dtype).swapaxes(0, 1)
    col2im_add(cols, x_grad, 0, kh, kw, sh, sw, ph, pw, dh, dw)
    return x_grad
