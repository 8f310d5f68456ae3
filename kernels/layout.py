"""``channels_last``: an (N, C, H, W) array's bytes in (N, H, W, C) order, for the int8 convolutions.

``np.ascontiguousarray(x.transpose(0, 2, 3, 1))`` copies one byte at a time along C with a
stride of H * W bytes; this loop copies 16 x 16 squares of each image's (C, H * W) matrix, so
that both the reads and the writes of a square stay in a few cache lines.

>>> import numpy as np
>>> x = np.arange(12, dtype=np.uint8).reshape(1, 3, 2, 2)
>>> channels_last(x).reshape(-1).tolist() == x.transpose(0, 2, 3, 1).reshape(-1).tolist()
True
"""

import numpy as np
from numba import njit

__all__ = ["channels_last"]

_SQUARE = 16


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
