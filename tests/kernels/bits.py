"""``assert_same_bits``, the bit-for-bit comparison the kernel tests share (loaded by file path,
as ``geometries.py`` is, so that the tests also run as plain Python under NUMBA_DISABLE_JIT)."""

import numpy as np


def assert_same_bits(actual, expected):
    """Same dtype, shape and bits; NaN matching NaN (its sign is not part of any contract);
    arrays that are not floating point (integers, masks) simply equal."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        (actual.dtype, actual.shape), (expected.dtype, expected.shape))
    if actual.dtype.kind != "f":
        np.testing.assert_array_equal(actual, expected)
        return
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    integer = np.dtype(f"int{8 * actual.dtype.itemsize}")
    np.testing.assert_array_equal(actual.view(integer)[~nan], expected.view(integer)[~nan])
