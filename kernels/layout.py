"""The two memory layouts of an (N, C, ...) activation that the kernels read as they are.

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
"""


__all__ = ["is_channel_major", "channel_rows", "from_channel_rows"]


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
