"""``lookup``: the integer lookup table of a unary activation, ``y[i] = table[q[i] - offset]``.

The int8 runtime's ``Int8Lookup`` (docs/numerics.md, "Lookup tables") replaces an activation
between two quantizers by a table of its QAT results; this is its gather. NumPy's fancy
indexing (``table[q.astype(np.intp) - offset]``) converts every index to a 64-bit integer
first; this loop reads each 8-bit value, subtracts the offset and gathers in one pass. It is
serial: a parallel version measured slower here (docs/benchmarks.md has the figures).

>>> import numpy as np
>>> lookup(np.array([-128, 0, 127], np.int8), np.arange(256, dtype=np.uint8), -128).tolist()
[0, 128, 255]
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["lookup"]


@njit(cache=True)
def _gather(flat, table, offset, out):
    for i in range(flat.shape[0]):
        out[i] = table[np.int64(flat[i]) - offset]


def lookup(q: np.ndarray, table: np.ndarray, offset: int) -> np.ndarray:
    """``table[q - offset]`` elementwise, in ``q``'s shape and ``table``'s dtype.

    Preconditions (the caller checks them): ``q`` holds integers with
    ``0 <= q - offset < len(table)``; ``table`` is 1-D and C-contiguous.
    """
    flat = np.ascontiguousarray(q).reshape(-1)
    out = np.empty(flat.shape[0], dtype=table.dtype)
    _gather(flat, table, np.int64(offset), out)
    return out.reshape(q.shape)
