"""qatcore.kernels.layout against NumPy's transpose, compiled and as plain Python."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.kernels import layout

shapes = st.tuples(st.integers(0, 3), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9))


def check_channels_last(shape, dtype, seed, transposed_input=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, shape).astype(dtype)
    if transposed_input:  # an NCHW view of channels-last memory
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    got = layout.channels_last(x)
    assert got.dtype == x.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, x.transpose(0, 2, 3, 1).reshape(-1))


@settings(deadline=None, max_examples=60)
@given(shape=shapes, dtype=st.sampled_from([np.uint8, np.int8, np.int32]), seed=st.integers(0, 2**32 - 1),
       transposed_input=st.booleans())
def test_channels_last_matches_numpy(shape, dtype, seed, transposed_input):
    check_channels_last(shape, dtype, seed, transposed_input)


def test_kernels_run_as_plain_python_without_jit(run_without_jit):
    run_without_jit(__file__, """
        assert_plain_python(tests.layout._transpose_images)
        for shape in [(2, 17, 5, 7), (1, 1, 3, 3), (0, 4, 2, 2), (1, 33, 1, 18)]:
            tests.check_channels_last(shape, np.uint8, 1)
            tests.check_channels_last(shape, np.int8, 2, True)
    """)
