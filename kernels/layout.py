"""Memory layouts of activations: the two the float kernels read as they are, and the
channels-last copy of the int8 convolutions.

C-contiguous is NumPy's default. Channel-major is the same (N, C, ...) array stored in
(C, N, ...) order: what a convolution computed as one GEMM over the batch produces
(``qatcore/ops/conv.py``), and what the ops after it keep, so that a network's activations
go from one convolution to the next without a transpose. For N == 1 (or C == 1) the two are
the same memory, and :func:`is_channel_major` says False.

Example:
    >>> import numpy as np
    >>> x = np.arange(12.0).reshape(3, 2, 2)       # (C, N, M) memory ...
    >>> y = x.swapaxes(0, 1)                       # ... seen as (N, C, M)
    >>> is_channel_major(y), y[1, 2].tolist()
    (True, [10.0, 11.0])
    >>> channel_rows(y).shape                      # channel c's N*M values in row c
    (3, 4)

``channels_last`` is the int8 convolutions' input layout, (N, H, W, C) bytes.
``np.ascontiguousarray(x.transpose(0, 2, 3, 1))`` copies one byte at a time along C with a
stride of H * W bytes; its loop copies 16 x 16 squares of each image's (C, H * W) matrix, so
that both the reads and the writes of a square stay in a few cache lines.

    >>> x = np.arange(12, dtype=np.uint8).reshape(1, 3, 2, 2)
    >>> channels_last(x).reshape(-1).tolist() == x.transpose(0, 2, 3, 1).reshape(-1).tolist()
    True
"""

import numpy as np
from numba import njit

__all__ = ["is_channel_major", "channel_rows", "from_channel_rows", "planes", "empty", "channels_last"]

_SQUARE = 16


def is_channel_major(x) -> bool:
    """True when the (N, C, ...) array ``x`` (N > 1) is stored in (C, N, ...) order, contiguously.

    Example:
        >>> import numpy as np
        >>> is_channel_major(np.zeros((3, 2, 4, 4)).transpose(1, 0, 2, 3))
        True
        >>> is_channel_major(np.zeros((2, 3, 4, 4)))
        False
    """
    return x.ndim >= 2 and x.shape[0] > 1 and x.swapaxes(0, 1).flags.c_contiguous


def channel_rows(x):
    """The channel-major (or N == 1) array ``x`` as (C, N*M): a view, row c holding channel c.

    Precondition: ``is_channel_major(x)`` or ``x.shape[0] == 1`` with x C-contiguous."""
    return x.swapaxes(0, 1).reshape(x.shape[1], -1)


def from_channel_rows(rows, shape):
    """The inverse of :func:`channel_rows`: (C, N*M) rows as the channel-major array ``shape``.

    Example:
        >>> import numpy as np
        >>> x = np.zeros((3, 2, 4)).swapaxes(0, 1)
        >>> from_channel_rows(channel_rows(x), x.shape).shape
        (2, 3, 4)
    """
    batch, channels = shape[:2]
    return rows.reshape((channels, batch) + tuple(shape[2:])).swapaxes(0, 1)


def planes(x):
    """(planes, channel_major): the (H, W) planes of the 4-d array x as a C-contiguous
    (N*C, H*W) array in memory order, plane ``c*N + n`` (channel-major x) or ``n*C + c``
    (otherwise), and which. Copies only an x that is neither C-contiguous nor channel-major.

    Example:
        >>> import numpy as np
        >>> x = np.arange(8.0).reshape(2, 2, 2, 1)
        >>> planes(x)[0][1].tolist(), planes(x.swapaxes(0, 1).copy().swapaxes(0, 1))[0][1].tolist()
        ([2.0, 3.0], [4.0, 5.0])
    """
    batch, channels = x.shape[:2]
    if is_channel_major(x):
        return x.swapaxes(0, 1).reshape(channels * batch, -1), True
    return np.ascontiguousarray(x).reshape(batch * channels, -1), False


def empty(shape, dtype, channel_major):
    """A new (N, C, ...) array, channel-major or C-contiguous."""
    if channel_major:
        return np.empty((shape[1], shape[0]) + tuple(shape[2:]), dtype).swapaxes(0, 1)
    return np.empty(shape, dtype)


@njit(cache=True)
def _transpose_images(x, out):
    """out[n, p, c] = x[n, c, p] for x (N, C, P) and out (N, P, C), in squares."""
    batch, channels, pixels = x.shape
    for n in range(batch):
        for c0 in range(0, channels, _SQUARE):
            c1 = min(c0 + _SQUARE, channels)
            for p0 in range(0, pixels, _SQUARE):
                p1 = min(p0 + _SQUARE, pixels)
                for p in range(np.uintp(p0), np.uintp(p1)):
                    for c in range(np.uintp(c0), np.uintp(c1)):
                        out[n, p, c] = x[n, c, p]


def channels_last(x, out=None):
    """A C-contiguous array of x's dtype holding ``x.transpose(0, 2, 3, 1)``, flattened.

    Args:
        x: a 4-d array (N, C, H, W), any strides (made C-contiguous first if it is not).
        out: None (a new array), or a 1-d C-contiguous array of x's dtype and size to fill.

    Returns:
        ``out`` or a new 1-d array of N * H * W * C elements, in (N, H, W, C) order.
    """
    batch, channels, height, width = x.shape
    if out is None:
        out = np.empty(batch * height * width * channels, x.dtype)
    if channels == 1:  # nothing moves
        out[:] = np.asarray(x).reshape(-1)
        return out
    _transpose_images(np.ascontiguousarray(x).reshape(batch, channels, height * width),
                      out.reshape(batch, height * width, channels))
    return out
