"""The functional ops added for ONNX import (issue 20): erf, where, take, slice_axis, unsqueeze,
squeeze, expand, pad. Float64 gradient checks, values against NumPy (and math.erf), errors."""

import math

import numpy as np
import pytest

import qatcore.nn.functional as F
from qatcore.autograd import gradcheck
from qatcore.errors import ConfigError, DTypeError, ShapeError

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3, 4))
MASK = RNG.random((3, 1)) > 0.5


@pytest.mark.parametrize("name, fn, inputs", [
    ("erf", F.erf, [X]),
    ("where", lambda a, b: F.where(MASK, a, b), [X, RNG.standard_normal(4)]),
    ("where_scalar", lambda a: F.where(MASK, a, -1.5), [X]),
    ("take_matrix_of_indices", lambda a: F.take(a, np.array([[0, 2], [2, 2]]), 1), [X]),
    ("take_one_negative_index", lambda a: F.take(a, -1, 2), [X]),
    ("slice_axis", lambda a: F.slice_axis(a, 1, 1, None), [X]),
    ("slice_axis_reversed", lambda a: F.slice_axis(a, -1, -1, None, -2), [X]),
    ("unsqueeze", lambda a: F.unsqueeze(a, (0, -1)), [X]),
    ("squeeze", lambda a: F.squeeze(a, (0, 2)), [RNG.standard_normal((1, 3, 1))]),
    ("expand", lambda a: F.expand(a, (2, 1, 3, 1)), [RNG.standard_normal((3, 1))]),
    ("pad", lambda a: F.pad(a, (1, 2, 0, 1), -1.0), [X]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_gradients(name, fn, inputs):
    assert gradcheck(fn, inputs)


def test_values_against_numpy():
    np.testing.assert_allclose(F.erf(X).numpy(), np.vectorize(math.erf)(X), rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(F.where(MASK, X, 0.0).numpy(), np.where(MASK, X, 0.0))
    index = np.array([[1, 0], [-1, 2]])
    np.testing.assert_array_equal(F.take(X, index, 2).numpy(), np.take(X, index, axis=2))
    assert F.take(X, np.array(1), 0).shape == (3, 4)  # a single index removes the axis
    np.testing.assert_array_equal(F.slice_axis(X, 2, -3, 100, 2).numpy(), X[:, :, -3:100:2])
    np.testing.assert_array_equal(F.slice_axis(X, 1, None, None, -1).numpy(), X[:, ::-1])
    assert F.unsqueeze(X, 1).shape == (2, 1, 3, 4) and F.unsqueeze(X, (0, 4)).shape == (1, 2, 3, 4, 1)
    assert F.squeeze(np.ones((1, 2, 1)), None).shape == (2,)
    np.testing.assert_array_equal(F.expand(np.arange(3.0), (2, 1)).numpy(), np.broadcast_to(np.arange(3.0), (2, 3)))
    np.testing.assert_array_equal(F.pad(X, (1, 0, 2, 1), 7.0).numpy(),
                                  np.pad(X, ((0, 0), (2, 1), (1, 0)), constant_values=7.0))
    assert F.pad(X, ()).shape == X.shape


def test_dtypes_are_kept():
    x32 = X.astype(np.float32)
    for y in (F.erf(x32), F.where(MASK, x32, 0.5), F.take(x32, 0, 1), F.slice_axis(x32, 0, 1, 2),
              F.unsqueeze(x32, 0), F.expand(x32, (2, 1, 1, 1)), F.pad(x32, (1, 1), -np.inf)):
        assert y.dtype == np.float32


@pytest.mark.parametrize("call, error, message", [
    (lambda: F.erf(np.arange(3)), DTypeError, "erf: input must be a floating-point tensor"),
    (lambda: F.where(np.array([1, 0]), X, X), DTypeError, "where: condition must be boolean"),
    (lambda: F.where(np.ones(5, bool), X, X), ShapeError, "do not broadcast"),
    (lambda: F.where(MASK, X, X.astype(np.float32)), DTypeError, "differ in dtype"),
    (lambda: F.take(X, np.array([0.5]), 0), DTypeError, "indices must be integers"),
    (lambda: F.take(X, np.array([3]), 1), ShapeError, r"must lie in \[-3, 2\]"),
    (lambda: F.take(X, 0, 3), ShapeError, "dim 3 is out of range"),
    (lambda: F.slice_axis(X, 0, 0, 1, 0), ConfigError, "step must not be 0"),
    (lambda: F.slice_axis(X, 0, 0.5, 1), ConfigError, "start must be an int or None"),
    (lambda: F.unsqueeze(X, (0, 0)), ShapeError, "name an axis twice"),
    (lambda: F.squeeze(X, 1), ShapeError, r"axes \[1\] .* do not have size 1"),
    (lambda: F.expand(X, (5, 1)), ShapeError, "does not broadcast"),
    (lambda: F.pad(X, (1,)), ConfigError, "non-negative \\(before, after\\) pairs"),
    (lambda: F.pad(X, (1, -1)), ConfigError, "non-negative"),
])
def test_bad_arguments_are_refused_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call()
