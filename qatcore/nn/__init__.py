"""Neural-network layers, the Module base, initialisers and the functional API."""

from qatcore.nn import functional, init
from qatcore.nn.activation import Hardsigmoid, Hardswish, LeakyReLU, LogSoftmax, ReLU, ReLU6, Sigmoid, Softmax, Tanh
from qatcore.nn.batchnorm import BatchNorm1d, BatchNorm2d
from qatcore.nn.container import ModuleList, Sequential
from qatcore.nn.conv import Conv2d
from qatcore.nn.dropout import Dropout
from qatcore.nn.flatten import Flatten, Identity
from qatcore.nn.fused import ConvReLU2d, LinearReLU, fold_conv_batch_norm, fold_linear_batch_norm
from qatcore.nn.linear import Linear
from qatcore.nn.loss import CrossEntropyLoss, MSELoss
from qatcore.nn.module import IncompatibleKeys, Module, RemovableHandle
from qatcore.nn.parameter import Parameter
from qatcore.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d

__all__ = [
    "functional", "init", "Module", "Parameter", "RemovableHandle", "IncompatibleKeys",
    "Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "ReLU", "ReLU6", "LeakyReLU",
    "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Softmax", "LogSoftmax", "Sequential", "ModuleList", "Flatten",
    "Identity", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Dropout",
    "CrossEntropyLoss", "MSELoss", "ConvReLU2d", "LinearReLU", "fold_conv_batch_norm",
    "fold_linear_batch_norm",
]
