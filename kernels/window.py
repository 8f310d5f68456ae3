"""The geometry of a window sliding over one axis, shared by im2col, pooling and the int8 conv.

A window of ``kernel`` taps, ``dilation`` apart, slides with ``stride`` over an axis of ``size``
elements padded by ``padding`` on both sides. Output ``o`` places the window's first tap at
``o*stride - padding``, so tap ``t`` of output ``o`` reads input element

    e = o*stride - padding + t*dilation        (in the padding unless 0 <= e < size)

and the window fits ``output_size`` times:

    O = (size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1

Seen from a fixed output the taps step by ``dilation`` (pooling walks its windows that way);
seen from a fixed tap the outputs step by ``stride`` (im2col copies one tap's row at a time).
Either way the elements read form an arithmetic sequence ``offset + k*step``, and
:func:`valid_range` gives the k for which it lies inside the input, so that the loops run over
exactly those and never test for padding element by element.
"""

from numba import njit

__all__ = ["output_size", "window_geometry", "valid_range"]


def output_size(size, kernel, stride, padding, dilation):
    """How many times the window fits along one axis: the formula in the module docstring.

    Example:
        >>> output_size(5, 3, 2, 1, 1)   # positions -1, 1, 3 of a 5-element axis
        3
        >>> output_size(5, 3, 1, 0, 2)   # taps 0, 2, 4: the window spans the whole axis
        1
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def window_geometry(H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    """The integer tuple the jitted 2-d loops take: the arguments followed by (OH, OW).

    Example:
        >>> window_geometry(5, 4, 3, 3, 1, 2, 1, 1, 1, 1)
        (5, 4, 3, 3, 1, 2, 1, 1, 1, 1, 5, 2)
    """
    return (H, W, kh, kw, sh, sw, ph, pw, dh, dw,
            output_size(H, kh, sh, ph, dh), output_size(W, kw, sw, pw, dw))


@njit(cache=True)
def valid_range(offset, step, size, count):
    """Return (lo, hi) such that ``0 <= offset + k*step < size`` exactly for k in [lo, hi).

    k is limited to [0, count) and ``lo <= hi`` always holds (the range may be empty).
    Requires step >= 1.

    Example:
        >>> valid_range(-1, 2, 5, 3)   # -1, 1, 3: the first lies in the padding
        (1, 3)
        >>> valid_range(-3, 2, 1, 2)   # -3, -1: all in the padding
        (2, 2)
    """
    if offset >= 0:
        lo = 0
    else:
        lo = (-offset + step - 1) // step  # ceil(-offset / step); numerator > 0
    if offset >= size:
        hi = 0
    else:
        hi = (size - offset + step - 1) // step  # ceil((size - offset) / step)
    lo = min(lo, count)
    hi = max(min(hi, count), lo)
    return lo, hi
