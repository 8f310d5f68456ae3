"""qatcore.kernels.lookup against its NumPy oracle."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qatcore.errors import ShapeError
from qatcore.kernels import lookup

# ----------------------------------------------------------------------------- oracle


def lookup_oracle(q, table, offset):
    """table[q - offset] with NumPy's fancy indexing."""
    return table[q.astype(np.int64) - offset]


def check(q, table, offset):
    out = lookup.lookup(q, table, offset)
    assert out.dtype == table.dtype and out.shape == q.shape
    np.testing.assert_array_equal(out, lookup_oracle(q, table, offset))


# ----------------------------------------------------------------------------- tests

DTYPES = {np.uint8: (0, 255), np.int8: (-128, 127), np.int16: (-300, 300), np.int32: (-5, 9)}


@given(st.sampled_from(sorted(DTYPES, key=str)), hnp.array_shapes(min_dims=0, max_dims=4, max_side=7),
       st.sampled_from([np.uint8, np.int8, np.int32]), st.integers(0, 2**16))
def test_lookup_equals_numpy_indexing(q_dtype, shape, table_dtype, seed):
    lo, hi = DTYPES[q_dtype]
    rng = np.random.default_rng(seed)
    q = rng.integers(lo, hi + 1, shape).astype(q_dtype)
    info = np.iinfo(table_dtype)
    table = rng.integers(max(info.min, -1000), min(info.max, 1000) + 1, hi - lo + 1).astype(table_dtype)
    check(q, table, lo)


@pytest.mark.parametrize("count", [1, 4093, 1 << 20])
def test_long_inputs_agree_with_the_oracle(count):
    q = np.random.default_rng(count).integers(-128, 128, count).astype(np.int8)
    check(q, np.arange(256, dtype=np.int32) * 3 - 100, -128)


def test_extremes_and_non_contiguous_input():
    table = np.arange(256, dtype=np.uint8)[::-1].copy()
    q = np.array([[0, 255, 7], [255, 0, 128]], np.uint8).T  # a transposed (non-contiguous) view
    check(q, table, 0)


def test_int8_lookup_refuses_integers_off_its_input_grid():
    from qatcore.quantization.qat.operators.activation import Int8Lookup

    layer = Int8Lookup(np.arange(10), 3, 0.1, 0, 0, 255)
    np.testing.assert_array_equal(layer(np.array([3, 12], np.int16)), [0, 9])
    with pytest.raises(ShapeError, match=r"must lie in \[3, 12\]"):
        layer(np.array([2], np.int16))


def test_kernels_run_as_plain_python_without_jit(run_without_jit):
    run_without_jit(__file__, """
        from qatcore.kernels import lookup
        assert_plain_python(lookup._gather)
        tests.check(np.arange(-128, 128, dtype=np.int8), np.arange(256, dtype=np.int32), -128)
        tests.check(np.arange(1000, dtype=np.int64) % 7, np.arange(7, dtype=np.uint8), 0)
    """)
