"""qatcore.kernels.window against brute force: the sliding-window geometry shared by the kernels."""

from hypothesis import given
from hypothesis import strategies as st

from qatcore.kernels import window

# ----------------------------------------------------------------------------- oracles


def valid_range_oracle(offset, step, size, count):
    """Every k in [0, count) whose element lies inside [0, size), one by one."""
    return [k for k in range(count) if 0 <= offset + k * step < size]


def output_size_oracle(size, kernel, stride, padding, dilation):
    """Count the window positions o*stride whose last tap still lies in the padded axis."""
    padded = size + 2 * padding
    return sum(1 for o in range(padded + 1) if o * stride + dilation * (kernel - 1) < padded)


# Plain checks, shared by the hypothesis tests and the NUMBA_DISABLE_JIT subprocess.


def check_valid_range(offset, step, size, count):
    lo, hi = window.valid_range(offset, step, size, count)
    assert 0 <= lo <= hi <= count
    assert list(range(lo, hi)) == valid_range_oracle(offset, step, size, count)


def check_output_size(size, kernel, stride, padding, dilation):
    assert window.output_size(size, kernel, stride, padding, dilation) == output_size_oracle(
        size, kernel, stride, padding, dilation
    )


# ----------------------------------------------------------------------------- tests


@given(st.integers(-20, 20), st.integers(1, 5), st.integers(0, 12), st.integers(0, 12))
def test_valid_range_matches_brute_force(offset, step, size, count):
    check_valid_range(offset, step, size, count)


@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(1, 3))
def test_output_size_counts_the_window_positions(size, kernel, stride, padding, dilation):
    if size + 2 * padding >= dilation * (kernel - 1) + 1:  # the window fits at least once
        check_output_size(size, kernel, stride, padding, dilation)


def test_window_geometry_appends_the_output_sizes():
    arguments = (7, 6, 3, 2, 2, 1, 1, 0, 1, 2)
    assert window.window_geometry(*arguments) == arguments + (
        output_size_oracle(7, 3, 2, 1, 1),
        output_size_oracle(6, 2, 1, 0, 2),
    )


def test_kernels_run_as_plain_python_without_jit(run_without_jit):
    run_without_jit(__file__, """
        import itertools

        assert_plain_python(tests.window.valid_range)
        for offset, step, size, count in itertools.product(range(-7, 8), (1, 2, 3), (0, 1, 5), (0, 1, 4)):
            tests.check_valid_range(offset, step, size, count)
    """)
