"""``Tensor``: a numpy array that remembers how it was computed.

A Tensor holds

- ``data``: the numpy array (float32 by default; float64 for gradient checks),
- ``requires_grad``: whether gradients flow to it,
- ``grad``: a numpy array of ``data``'s shape and dtype once backward has reached
  it (leaves only; gradients accumulate across backward calls until zeroed),
- ``_ctx``: the :class:`~qatcore.autograd.Function` that produced it, or None for
  a leaf.

Arithmetic follows numpy broadcasting; backward sums each gradient back to its
input's shape. Python scalars take the tensor's dtype (``x * 0.5`` stays
float32); two tensors of different float dtypes promote as numpy does.

Tensor is the lowest layer that computes: it imports neither the backward
engine nor the ops, which both build on it. Its computing methods call the
functional API through ``F`` and ``backward`` calls the engine; those two layers
bind themselves here when they are imported (:func:`bind_functional`, called by
:mod:`qatcore.nn`, and :func:`bind_backward`, called by
:mod:`qatcore.autograd.engine`), and ``import qatcore`` imports both.

>>> import qatcore
>>> x = qatcore.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
>>> y = (x * x).sum()
>>> y.backward()
>>> x.grad
array([[2., 4.],
       [6., 8.]], dtype=float32)
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import numpy as np

from qatcore.errors import DTypeError, GradientError, QATCoreError
from qatcore.symbolic import SymbolicValue

__all__ = ["Tensor", "tensor", "bind_functional", "bind_backward"]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _as_array(data: Any, dtype: Any = None) -> np.ndarray:
    """numpy array for ``data``: numpy input keeps its dtype, Python floats become
    float32, Python ints int64, unless ``dtype`` says otherwise."""
    if isinstance(data, Tensor):
        data = data.data
    if dtype is not None:
        return np.array(data, dtype=dtype)
    if isinstance(data, (np.ndarray, np.generic)):
        return np.array(data)
    arr = np.array(data)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype.kind in "iub":
        return arr
    raise DTypeError(
        f"tensor(): cannot make a tensor from {type(data).__name__} "
        f"(numpy dtype {arr.dtype}); expected numbers, nested lists of numbers or an array"
    )


class Tensor:
    """An n-dimensional array with reverse-mode automatic differentiation."""

    __slots__ = ("data", "requires_grad", "grad", "_ctx", "__weakref__")

    # numpy defers to our reflected operators (np.float32(2) * t -> t.__rmul__).
    __array_ufunc__ = None

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None) -> None:
        arr = _as_array(data, dtype)
        if requires_grad and arr.dtype not in _FLOAT_DTYPES:
            raise DTypeError(
                f"only floating-point tensors can require grad; got dtype {arr.dtype}"
            )
        self.data: np.ndarray = arr
        self.requires_grad: bool = bool(requires_grad)
        self.grad: np.ndarray | None = None
        self._ctx = None

    @classmethod
    def _from_array(cls, arr: np.ndarray, requires_grad: bool) -> Tensor:
        """Wrap an array produced by an op, without copying or checking."""
        t = cls.__new__(cls)
        t.data = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
        t.requires_grad = requires_grad
        t.grad = None
        t._ctx = None
        return t

    # ---- basic properties -------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def numel(self) -> int:
        return int(self.data.size)

    def size(self, dim: int | None = None):
        return self.data.shape if dim is None else self.data.shape[dim]

    def __len__(self) -> int:
        return len(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def numpy(self) -> np.ndarray:
        """The underlying array (shared, not copied)."""
        return self.data

    def item(self) -> float | int | bool:
        if self.data.size != 1:
            raise DTypeError(f"item() needs a tensor with one element; this one has shape {self.shape}")
        return self.data.reshape(()).item()

    def detach(self) -> Tensor:
        """A new leaf sharing this tensor's data, cut off from the graph."""
        return Tensor._from_array(self.data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        if requires_grad and self.data.dtype not in _FLOAT_DTYPES:
            raise DTypeError(f"only floating-point tensors can require grad; got dtype {self.dtype}")
        self.requires_grad = requires_grad
        return self

    def astype(self, dtype: Any) -> Tensor:
        """Differentiable dtype conversion (the gradient converts back)."""
        return F.cast(self, dtype)

    def float(self) -> Tensor:
        return F.cast(self, np.float32)

    def double(self) -> Tensor:
        return F.cast(self, np.float64)

    def __repr__(self) -> str:
        body = np.array2string(self.data, separator=", ", prefix="tensor(")
        extra = ""
        if self.dtype != np.float32:
            extra += f", dtype={self.dtype}"
        if self._ctx is not None:
            extra += f", grad_fn={type(self._ctx).__name__}"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    # ---- autograd -----------------------------------------------------------------
    def backward(self, grad: Any = None) -> None:
        """Accumulate d(self)/d(leaf) into ``.grad`` of every leaf that requires it.

        ``grad`` is dL/d(self); it may be omitted only for a one-element tensor
        (a loss), where it is 1.
        """
        if grad is None:
            if self.data.size != 1:
                raise GradientError(
                    f"backward() without a gradient needs a one-element tensor; this one "
                    f"has shape {self.shape}: pass grad= of that shape"
                )
            g = np.ones(self.shape, dtype=self.dtype)
        else:
            g = np.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if g.shape != self.shape:
                raise GradientError(
                    f"backward(grad): grad has shape {g.shape}, expected {self.shape}"
                )
        _backward(self, g)

    def _accumulate_grad(self, g: np.ndarray) -> None:
        if self.grad is None:
            # Copy: g may be a read-only broadcast view or shared with another leaf.
            self.grad = np.array(g, dtype=self.dtype, copy=True)
        else:
            self.grad += g

    def zero_grad(self) -> None:
        self.grad = None

    # ---- arithmetic -------------------------------------------------------------
    def _other(self, other: Any) -> Tensor | None:
        """``other`` as an operand; None for a symbolic (traced) value, which then
        handles the operator itself (its reflected method)."""
        if isinstance(other, Tensor):
            return other
        if isinstance(other, SymbolicValue):
            return None
        if isinstance(other, (np.ndarray, np.generic)):
            return Tensor._from_array(np.asarray(other), requires_grad=False)
        return Tensor._from_array(np.asarray(other, dtype=self.dtype), requires_grad=False)

    def __add__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.add(self, o)

    def __radd__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.add(o, self)

    def __sub__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.sub(self, o)

    def __rsub__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.sub(o, self)

    def __mul__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.mul(self, o)

    def __rmul__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.mul(o, self)

    def __truediv__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.div(self, o)

    def __rtruediv__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.div(o, self)

    def __neg__(self):
        return F.neg(self)

    def __pow__(self, exponent):
        return F.pow(self, exponent)

    def __matmul__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.matmul(self, o)

    def __rmatmul__(self, other):
        o = self._other(other)
        return NotImplemented if o is None else F.matmul(o, self)

    def __getitem__(self, index):
        return F.getitem(self, index)

    # ---- methods that delegate to the functional API (F) ----------------------
    def sum(self, dim=None, keepdim: bool = False):
        return F.sum(self, dim, keepdim)

    def mean(self, dim=None, keepdim: bool = False):
        return F.mean(self, dim, keepdim)

    def max(self, dim=None, keepdim: bool = False):
        return F.max(self, dim, keepdim)

    def var(self, dim=None, keepdim: bool = False, correction: int = 1):
        return F.var(self, dim, keepdim, correction)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return F.reshape(self, shape)

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1):
        return F.flatten(self, start_dim, end_dim)

    def transpose(self, dim0: int, dim1: int):
        return F.transpose(self, dim0, dim1)

    def permute(self, *dims):
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        return F.permute(self, dims)

    @property
    def T(self):
        return F.permute(self, tuple(reversed(range(self.ndim))))

    def exp(self):
        return F.exp(self)

    def log(self):
        return F.log(self)

    def sqrt(self):
        return F.sqrt(self)

    def relu(self):
        return F.relu(self)

    def sigmoid(self):
        return F.sigmoid(self)

    def tanh(self):
        return F.tanh(self)

    def clamp(self, min=None, max=None):
        return F.clamp(self, min, max)

    def softmax(self, dim: int = -1):
        return F.softmax(self, dim)

    def log_softmax(self, dim: int = -1):
        return F.log_softmax(self, dim)

    def argmax(self, dim: int | None = None, keepdim: bool = False) -> Tensor:
        """Index of the maximum (not differentiable)."""
        out = np.argmax(self.data, axis=dim, keepdims=keepdim)
        return Tensor._from_array(np.asarray(out), requires_grad=False)


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """Make a leaf Tensor from numbers, nested lists or a numpy array (copied).

    Python floats become float32, Python ints int64; a numpy array keeps its
    dtype unless ``dtype`` is given.

    >>> tensor([1, 2]).dtype
    dtype('int64')
    >>> tensor([1.5, 2.0], requires_grad=True)
    tensor([1.5, 2. ], requires_grad=True)
    """
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


# ---- the layers above, bound when they are imported --------------------------------
class _FunctionalNotImported:
    """What ``F`` is until qatcore.nn.functional binds itself: every use is an error."""

    def __getattr__(self, name: str):
        raise QATCoreError(f"Tensor methods call qatcore.nn.functional.{name}, which is not imported yet: "
                           "import qatcore")


def _engine_not_imported(root: Tensor, grad: np.ndarray) -> None:
    raise QATCoreError("Tensor.backward needs qatcore.autograd, which is not imported yet: import qatcore")


# The functional API (qatcore.nn.functional), which every computing method calls.
F: Any = _FunctionalNotImported()
# The backward engine (qatcore.autograd.engine.backward).
_backward: Callable[[Tensor, np.ndarray], None] = _engine_not_imported


def bind_functional(functional: ModuleType) -> None:
    """Make ``functional`` the module Tensor's operators and methods call (qatcore.nn does this)."""
    global F
    F = functional


def bind_backward(backward: Callable[[Tensor, np.ndarray], None]) -> None:
    """Make ``backward(root, grad)`` the engine behind ``Tensor.backward`` (the engine does this)."""
    global _backward
    _backward = backward
