import sys

import numpy as np
import pytest

import qatcore
from qatcore.autograd import Function, gradcheck, no_grad, sum_to_shape
from qatcore.errors import GradientError, QATCoreError, ShapeError


def test_chain_of_10000_ops_does_not_recurse():
    x = qatcore.tensor([1.0], requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        y.sum().backward()
    finally:
        sys.setrecursionlimit(limit)
    np.testing.assert_allclose(x.grad, [1.0001 ** 10_000], rtol=1e-3)


def test_gradients_accumulate_across_backward_calls():
    x = qatcore.tensor([2.0, 3.0], requires_grad=True)
    (x * x).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad, [2 * 2 + 3, 2 * 3 + 3])


def test_shared_subexpression_gets_both_paths():
    x = qatcore.tensor([1.5], requires_grad=True)
    y = x * x
    z = y + y * x  # x^2 + x^3
    z.backward(np.ones(1))
    np.testing.assert_allclose(x.grad, [2 * 1.5 + 3 * 1.5**2])


def test_broadcast_gradients_are_summed_back():
    a = qatcore.tensor(np.ones((2, 3, 4)), requires_grad=True)
    b = qatcore.tensor(np.ones((3, 1)), requires_grad=True)
    (a * b).sum().backward()
    assert b.grad.shape == (3, 1)
    np.testing.assert_array_equal(b.grad, np.full((3, 1), 8.0))
    assert a.grad.shape == (2, 3, 4)


def test_sum_to_shape_rejects_incompatible():
    with pytest.raises(ShapeError):
        sum_to_shape(np.ones((2, 3)), (4,))


def test_no_grad_records_nothing_and_restores():
    x = qatcore.tensor([1.0], requires_grad=True)
    with no_grad():
        y = x * 2
    assert not y.requires_grad and y._ctx is None
    z = x * 2
    assert z.requires_grad


def test_no_grad_as_decorator():
    @no_grad()
    def f(t):
        return t * 2

    assert not f(qatcore.tensor([1.0], requires_grad=True)).requires_grad


def test_detach_cuts_graph():
    x = qatcore.tensor([1.0, 2.0], requires_grad=True)
    y = (x * 3).detach()
    assert not y.requires_grad and y.is_leaf
    np.testing.assert_array_equal(y.numpy(), [3.0, 6.0])


def test_backward_errors_are_clear():
    x = qatcore.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(GradientError, match="one-element"):
        (x * 2).backward()
    with pytest.raises(GradientError, match="does not require grad"):
        qatcore.tensor([1.0]).backward()
    with pytest.raises(GradientError, match="shape"):
        (x * 2).backward(np.ones(3))
    assert issubclass(GradientError, QATCoreError)


def test_int_tensor_cannot_require_grad():
    with pytest.raises(QATCoreError):
        qatcore.tensor([1, 2], requires_grad=True)


def test_dtype_rules():
    assert qatcore.tensor([1.0]).dtype == np.float32
    assert qatcore.tensor(np.array([1.0])).dtype == np.float64
    assert qatcore.tensor([1]).dtype == np.int64
    x = qatcore.tensor([1.0])
    assert (x * 0.5).dtype == np.float32
    assert (0.5 - x).dtype == np.float32
    assert (np.float32(2) * x).dtype == np.float32


def test_grad_dtype_matches_data():
    x = qatcore.tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
    (x * np.array([1.0, 1.0])).sum().backward()  # float64 constant promotes the product
    assert x.grad.dtype == np.float32


def test_custom_function_and_gradcheck():
    class Cube(Function):
        def forward(self, a):
            self.a = a
            return a**3

        def backward(self, g):
            return (3 * self.a**2 * g,)

    assert gradcheck(lambda t: Cube.apply(t), [np.array([0.3, -1.2, 2.0])])


def test_gradcheck_catches_a_wrong_backward():
    class Wrong(Function):
        def forward(self, a):
            return a * a

        def backward(self, g):
            return (g,)

    with pytest.raises(GradientError, match="differ"):
        gradcheck(lambda t: Wrong.apply(t), [np.array([1.0, 2.0])])


def test_item_and_repr():
    t = qatcore.tensor([[3.5]])
    assert t.item() == 3.5
    assert "tensor(" in repr(t)
    with pytest.raises(QATCoreError):
        qatcore.tensor([1.0, 2.0]).item()


def test_backward_frees_the_graph_and_a_second_pass_says_so():
    """Like PyTorch without retain_graph: each op's saved state goes once its backward has run."""
    x = qatcore.tensor([1.0, 2.0], requires_grad=True)
    y = x * x
    loss = y.sum()
    loss.backward()
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])
    assert y._ctx.released and y._ctx.inputs == () and not hasattr(y._ctx, "a")
    with pytest.raises(GradientError, match="second time.*run the forward pass again"):
        loss.backward()
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])  # untouched by the refused pass
