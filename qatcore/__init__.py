"""qatcore: quantization-aware training on a small, readable autograd core.

The public surface at the top level is the Tensor, grad mode, save/load and the
error hierarchy; layers live in :mod:`qatcore.nn`, optimizers in
:mod:`qatcore.optim`, datasets in :mod:`qatcore.data`, reference models in
:mod:`qatcore.models`.

>>> import qatcore
>>> x = qatcore.tensor([1.0, 2.0], requires_grad=True)
>>> (x * x).sum().backward()
>>> x.grad
array([2., 4.], dtype=float32)
"""

from qatcore.autograd import enable_grad, gradcheck, is_grad_enabled, no_grad
from qatcore.errors import (
    ConfigError,
    DataError,
    DTypeError,
    GradientError,
    QATCoreError,
    SerializationError,
    ShapeError,
    StateDictError,
)
from qatcore.serialization import dumps, load, loads, save
from qatcore.tensor import Tensor, tensor

__all__ = [
    "Tensor",
    "tensor",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "gradcheck",
    "save",
    "load",
    "dumps",
    "loads",
    "QATCoreError",
    "ShapeError",
    "DTypeError",
    "GradientError",
    "StateDictError",
    "SerializationError",
    "ConfigError",
    "DataError",
]
__version__ = "0.1.0"
