"""Activation layers: thin Modules over :mod:`qatcore.nn.functional`, so a model
can name them and the QAT preparer can find them in the module tree."""

from __future__ import annotations

from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.nn.module import Module

__all__ = ["ReLU", "ReLU6", "LeakyReLU", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Softmax", "LogSoftmax",
           "GELU", "SiLU"]


class ReLU(Module):
    """max(x, 0)"""

    def forward(self, x):
        return F.relu(x)


class ReLU6(Module):
    """min(max(x, 0), 6)"""

    def forward(self, x):
        return F.relu6(x)


class LeakyReLU(Module):
    """x if x > 0 else negative_slope * x"""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class Sigmoid(Module):
    """1 / (1 + e^-x)"""

    def forward(self, x):
        return F.sigmoid(x)


class Tanh(Module):
    """tanh(x)"""

    def forward(self, x):
        return F.tanh(x)


class Hardswish(Module):
    """x * relu6(x + 3) / 6"""

    def forward(self, x):
        return F.hardswish(x)


class Hardsigmoid(Module):
    """relu6(x + 3) / 6"""

    def forward(self, x):
        return F.hardsigmoid(x)


class Softmax(Module):
    """softmax along ``dim``"""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.softmax(x, self.dim)


class LogSoftmax(Module):
    """log-softmax along ``dim``"""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.log_softmax(x, self.dim)


class GELU(Module):
    """x * Phi(x): exact (erf) with approximate="none", the tanh form with "tanh"
    (:func:`qatcore.nn.functional.gelu`)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ConfigError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class SiLU(Module):
    """x * sigmoid(x)"""

    def forward(self, x):
        return F.silu(x)
