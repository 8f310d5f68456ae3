"""Neural-network layers, the Module base, initialisers and the functional API.

Importing this package imports :mod:`qatcore.nn.functional` and binds it as the
API behind Tensor's operators and methods (see :mod:`qatcore.tensor`). The layers
and initialisers are imported on first use (``qatcore.nn.Linear``), so that the
functional layer can be imported without the layers built on it.
"""

from qatcore.lazy_exports import lazy_exports
from qatcore.nn import functional
from qatcore.tensor import bind_functional

bind_functional(functional)

__all__ = [
    "functional", "init", "Module", "Parameter", "RemovableHandle", "IncompatibleKeys",
    "Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "ReLU", "ReLU6", "LeakyReLU",
    "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Softmax", "LogSoftmax", "Sequential", "ModuleList",
    "Flatten", "Identity", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Dropout",
    "CrossEntropyLoss", "MSELoss", "ConvReLU2d", "LinearReLU", "fold_conv_batch_norm",
    "fold_linear_batch_norm", "GELU", "SiLU", "LayerNorm", "RMSNorm", "Embedding", "MultiheadAttention",
]

__getattr__, __dir__ = lazy_exports(__name__, submodules=("init",), names={
    "qatcore.nn.activation": ("Hardsigmoid", "Hardswish", "LeakyReLU", "LogSoftmax", "ReLU", "ReLU6", "Sigmoid",
                              "Softmax", "Tanh", "GELU", "SiLU"),
    "qatcore.nn.attention": ("MultiheadAttention",),
    "qatcore.nn.batchnorm": ("BatchNorm1d", "BatchNorm2d"),
    "qatcore.nn.container": ("ModuleList", "Sequential"),
    "qatcore.nn.conv": ("Conv2d",),
    "qatcore.nn.dropout": ("Dropout",),
    "qatcore.nn.embedding": ("Embedding",),
    "qatcore.nn.flatten": ("Flatten", "Identity"),
    "qatcore.nn.fused": ("ConvReLU2d", "LinearReLU", "fold_conv_batch_norm", "fold_linear_batch_norm"),
    "qatcore.nn.linear": ("Linear",),
    "qatcore.nn.loss": ("CrossEntropyLoss", "MSELoss"),
    "qatcore.nn.module": ("IncompatibleKeys", "Module", "RemovableHandle"),
    "qatcore.nn.normalization": ("LayerNorm", "RMSNorm"),
    "qatcore.nn.parameter": ("Parameter",),
    "qatcore.nn.pooling": ("AdaptiveAvgPool2d", "AvgPool2d", "MaxPool2d"),
})
