"""Fully connected layer."""

from __future__ import annotations

import math

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.nn import init
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter

__all__ = ["Linear", "default_rng"]


def default_rng(rng: np.random.Generator | None) -> np.random.Generator:
    """The generator a layer initialises from: ``rng`` if given, else a fresh,
    unseeded one (pass an rng for reproducible weights)."""
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


class Linear(Module):
    """y = x @ W^T + b with W of shape (out_features, in_features).

    >>> import numpy as np
    >>> layer = Linear(3, 2, rng=np.random.default_rng(0))
    >>> layer(np.zeros((5, 3), dtype=np.float32)).shape
    (5, 2)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rng: np.random.Generator | None = None, dtype=np.float32) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"Linear: {name} must be a positive int, got {value!r}")
        rng = default_rng(rng)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(np.empty((out_features, in_features), dtype=dtype))
        init.kaiming_uniform_(self.weight, math.sqrt(5), rng)
        if bias:
            self.bias = Parameter(np.empty(out_features, dtype=dtype))
            bound = 1 / math.sqrt(in_features)
            init.uniform_(self.bias, -bound, bound, rng)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
