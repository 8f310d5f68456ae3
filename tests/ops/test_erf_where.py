"""The two primitives added for ONNX import (issue 20), called directly: ``ops.Erf`` and
``ops.Where``. Float64 central-difference gradient checks, and NumPy / math.erf oracles of the
forward values; the functional ops over them are tested in tests/nn/test_onnx_import_ops.py."""

import math

import numpy as np
import pytest

from qatcore import ops
from qatcore.autograd import gradcheck
from qatcore.tensor import Tensor

RNG = np.random.default_rng(7)


def test_erf_gradient_and_values():
    x = RNG.uniform(-3, 3, (4, 5))
    assert gradcheck(lambda t: ops.Erf.apply(t), [x])
    np.testing.assert_allclose(ops.Erf.apply(Tensor(x)).numpy(), np.vectorize(math.erf)(x), rtol=0, atol=1e-15)
    x32 = x.astype(np.float32)
    assert ops.Erf.apply(Tensor(x32)).dtype == np.float32


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4), (3, 4)), ((3, 1), (4,), (1, 4)), ((2, 1, 4), (3, 1), ())])
def test_where_gradients_reach_the_chosen_input_only(shapes):
    condition_shape, a_shape, b_shape = shapes
    condition = RNG.random(condition_shape) > 0.5
    a, b = RNG.standard_normal(a_shape), RNG.standard_normal(b_shape)
    assert gradcheck(lambda x, y: ops.Where.apply(x, y, condition=condition), [a, b])
    np.testing.assert_array_equal(ops.Where.apply(Tensor(a), Tensor(b), condition=condition).numpy(),
                                  np.where(condition, a, b))


def test_where_passes_infinities_without_nan_gradients():
    condition = np.array([True, False, True])
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    y = ops.Where.apply(x, Tensor(np.array(-np.inf)), condition=condition)
    assert y.numpy().tolist() == [1.0, -np.inf, 3.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0]
