"""The primitive differentiable ops, one :class:`~qatcore.autograd.Function` each.

Everything else in :mod:`qatcore.nn.functional` is composed from these; a new
primitive is added only when composing would be slow or numerically poor
(log-softmax, batch norm, layer and RMS norm, GELU, SiLU, erf, where, embedding lookup,
conv, depthwise conv, pooling).
"""

from qatcore.ops.conv import Conv2d, conv_output_size
from qatcore.ops.depthwise_conv import DepthwiseConv2d
from qatcore.ops.elementwise import (
    Add,
    Cast,
    Clamp,
    Div,
    Erf,
    Exp,
    Gelu,
    GeluTanh,
    Log,
    Mul,
    Neg,
    Pow,
    Relu,
    Sigmoid,
    Silu,
    Sqrt,
    Sub,
    Tanh,
    Where,
)
from qatcore.ops.embedding import Embedding
from qatcore.ops.layer_norm import LayerNorm, RMSNorm
from qatcore.ops.linalg import MatMul
from qatcore.ops.normalization import BatchNorm
from qatcore.ops.pooling import AvgPool2d, MaxPool2d
from qatcore.ops.reduction import Max, Sum, normalize_dims
from qatcore.ops.shape import Cat, GetItem, Permute, Reshape
from qatcore.ops.softmax import LogSoftmax

__all__ = [
    "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Exp", "Log", "Sqrt", "Relu", "Sigmoid",
    "Tanh", "Clamp", "Cast", "Sum", "Max", "Reshape", "Permute", "GetItem", "Cat",
    "MatMul", "LogSoftmax", "Conv2d", "DepthwiseConv2d", "MaxPool2d", "AvgPool2d", "BatchNorm",
    "conv_output_size", "normalize_dims", "Gelu", "GeluTanh", "Silu", "LayerNorm", "RMSNorm", "Embedding",
    "Erf", "Where",
]
