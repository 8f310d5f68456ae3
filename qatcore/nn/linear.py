"""Fully connected layer."""

from __future__ import annotations

import math

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.nn import init
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter
from qatcore.random import generator_or_default

__all__ = ["Linear"]


class Linear(Module):
    """y = x @ W^T + b with W of shape (out_features, in_features).

    The weights are drawn from ``rng``, or without one from qatcore's default generator
    (:func:`qatcore.manual_seed` fixes it).

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
        rng = generator_or_default(rng, "Linear: rng")
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
