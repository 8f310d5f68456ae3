"""qatcore: quantization-aware training on a small, readable autograd core.

The public surface at the top level is the Tensor, grad mode, save/load, the seed of
the default generator (``manual_seed``, :mod:`qatcore.random`) and the error hierarchy;
layers live in :mod:`qatcore.nn`, optimizers in :mod:`qatcore.optim`, datasets in
:mod:`qatcore.data`, reference models in :mod:`qatcore.models`, quantization in
:mod:`qatcore.quantization`.

``import qatcore`` loads the core (Tensor, autograd, the primitive ops and the
functional API that Tensor's operators call); every other subpackage is imported
the first time it is used, as an attribute (``qatcore.optim.SGD``) or by an
import statement. Neither numba nor onnx is imported.

>>> import qatcore
>>> x = qatcore.tensor([1.0, 2.0], requires_grad=True)
>>> (x * x).sum().backward()
>>> x.grad
array([2., 4.], dtype=float32)
>>> qatcore.optim.SGD([qatcore.nn.Parameter(x.data)], lr=0.1).defaults["lr"]
0.1
"""

from qatcore import nn  # the package binds the functional API behind Tensor's operators
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
from qatcore.lazy_exports import lazy_exports
from qatcore.random import initial_seed, manual_seed
from qatcore.serialization import dumps, load, loads, save
from qatcore.tensor import Tensor, tensor  # ``qatcore.tensor`` is this function, not the submodule

__all__ = [
    "Tensor",
    "tensor",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "gradcheck",
    "manual_seed",
    "initial_seed",
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
    # subpackages
    "autograd",
    "ops",
    "nn",
    "optim",
    "data",
    "models",
    "graph",
    "quantization",
    "interop",
    "distributed",
    "training",
    "pipeline",
    "kernels",
    "errors",
    "serialization",
    "random",
]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(__name__, submodules=(
    "autograd", "ops", "nn", "optim", "data", "models", "graph", "quantization", "interop", "distributed",
    "training", "pipeline", "kernels", "errors", "serialization", "random",
))
