"""qatcore.kernels.erf against its NumPy oracle (math.erf elementwise)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qatcore.kernels import erf

# ----------------------------------------------------------------------------- oracle


def erf_oracle(x):
    """math.erf on every element, in float64, rounded once to x's dtype."""
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64)).astype(x.dtype)


def check(x):
    out = erf.erf(x)
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, erf_oracle(x))


# ----------------------------------------------------------------------------- tests


@given(hnp.arrays(st.sampled_from([np.float32, np.float64]), hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
                  elements=st.floats(-10, 10, width=32)))
def test_erf_equals_math_erf(x):
    check(x)


def test_special_values_and_non_contiguous_input():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-300, 6.0, -30.0])
    out = erf.erf(x)
    np.testing.assert_array_equal(out[:4], [0.0, -0.0, 1.0, -1.0])
    assert np.isnan(out[4]) and out[5] > 0 and out[6] == 1.0 and out[7] == -1.0
    check(np.linspace(-4, 4, 60).reshape(6, 10).T)


@pytest.mark.parametrize("count", [1, 4093, 1 << 18])
def test_long_inputs_agree_with_the_oracle(count):
    check(np.random.default_rng(count).normal(size=count) * 3)


def test_kernels_run_as_plain_python_without_jit(run_without_jit):
    run_without_jit(__file__, """
        from qatcore.kernels import erf
        assert_plain_python(erf._erf_loop)
        tests.check(np.linspace(-5, 5, 101))
        tests.check(np.linspace(-5, 5, 101, dtype=np.float32).reshape(101, 1))
    """)
