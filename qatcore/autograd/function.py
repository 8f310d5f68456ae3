"""The primitive-op protocol: one :class:`Function` per differentiable op.

A Function subclass implements two methods over plain numpy arrays:

``forward(*arrays, **params) -> ndarray``
    computes the output and keeps, on ``self``, exactly what backward needs
    (the "saved state"; named attributes rather than an anonymous tuple, so a
    reader sees what each op remembers).
``backward(grad_output) -> tuple``
    returns dL/d(input) for each positional input, in order (``None`` for an
    input that needs no gradient). A gradient may have the *broadcast* shape of
    the output; the engine sums it back to the input's shape.

``Function.apply(*tensors, **params)`` runs forward and, when any input
requires a gradient and recording is on, links the output to this Function so
that :func:`qatcore.autograd.engine.backward` can find it. Positional arguments
are the differentiable inputs (Tensors or ``None``); keyword arguments are
constant parameters (axes, strides, ...).

>>> import numpy as np
>>> import qatcore
>>> class Square(Function):
...     def forward(self, a):
...         self.a = a
...         return a * a
...     def backward(self, grad):
...         return (2 * self.a * grad,)
>>> x = qatcore.tensor([3.0], requires_grad=True)
>>> Square.apply(x).backward()
>>> x.grad
array([6.], dtype=float32)
"""

from __future__ import annotations

import abc

import numpy as np

from qatcore.autograd.grad_mode import is_grad_enabled
from qatcore.tensor import Tensor

__all__ = ["Function"]


class Function(abc.ABC):
    """Base of every primitive op (abstract: subclasses define forward/backward)."""

    def __init__(self) -> None:
        self.inputs: tuple = ()
        # Known before forward runs, so forward can skip saving what no one needs.
        self.needs_input_grad: tuple[bool, ...] = ()
        self.released = False

    def release(self) -> None:
        """Drop the saved state and the inputs: the engine calls this once this op's backward
        has run, so a training step's memory shrinks as the backward pass goes (PyTorch's
        default, ``retain_graph=False``). A second backward through the op then raises."""
        self.__dict__.clear()
        self.inputs = ()
        self.needs_input_grad = ()
        self.released = True

    @abc.abstractmethod
    def forward(self, *arrays: np.ndarray, **params) -> np.ndarray:
        """Compute the output from input arrays; save what backward needs on self."""

    @abc.abstractmethod
    def backward(self, grad_output: np.ndarray) -> tuple:
        """Return one gradient (or None) per positional input of forward."""

    @classmethod
    def apply(cls, *inputs: Tensor | None, **params) -> Tensor:
        fn = cls()
        record = is_grad_enabled()
        needs = tuple(t is not None and t.requires_grad and record for t in inputs)
        fn.needs_input_grad = needs
        arrays = [None if t is None else t.data for t in inputs]
        out = fn.forward(*arrays, **params)
        if any(needs):
            fn.inputs = inputs
            result = Tensor._from_array(out, requires_grad=True)
            result._ctx = fn
            return result
        return Tensor._from_array(out, requires_grad=False)
