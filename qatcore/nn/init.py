"""Weight initialisers. Each fills a Parameter in place from an explicit
``np.random.Generator`` (no hidden global random state) and returns it.

The defaults of Linear and Conv2d follow PyTorch: ``kaiming_uniform_`` with
a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias from the same
range.

>>> import numpy as np
>>> from qatcore.nn import Parameter
>>> w = Parameter(np.empty((4, 3), dtype=np.float32))
>>> _ = uniform_(w, -0.5, 0.5, rng=np.random.default_rng(0))
>>> bool(np.all(np.abs(w.data) <= 0.5))
True
"""

from __future__ import annotations

import math

import numpy as np

from qatcore.errors import ConfigError
from qatcore.tensor import Tensor

__all__ = [
    "fan_in_and_fan_out", "uniform_", "normal_", "zeros_", "ones_",
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
]


def fan_in_and_fan_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """fan_in = shape[1] * receptive field, fan_out = shape[0] * receptive field."""
    if len(shape) < 2:
        raise ConfigError(f"fan in/out needs a weight with at least 2 dimensions, got shape {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _fill(t: Tensor, values: np.ndarray) -> Tensor:
    t.data[...] = values.astype(t.dtype, copy=False)
    return t


def uniform_(t: Tensor, low: float, high: float, rng: np.random.Generator) -> Tensor:
    """Fill with U(low, high)."""
    return _fill(t, rng.uniform(low, high, size=t.shape))


def normal_(t: Tensor, mean: float, std: float, rng: np.random.Generator) -> Tensor:
    """Fill with N(mean, std^2)."""
    return _fill(t, rng.normal(mean, std, size=t.shape))


def zeros_(t: Tensor) -> Tensor:
    t.data[...] = 0
    return t


def ones_(t: Tensor) -> Tensor:
    t.data[...] = 1
    return t


def _gain(a: float) -> float:
    return math.sqrt(2.0 / (1 + a * a))


def kaiming_uniform_(t: Tensor, a: float, rng: np.random.Generator) -> Tensor:
    """U(-b, b) with b = gain(a) * sqrt(3 / fan_in), gain(a) = sqrt(2 / (1 + a^2))."""
    fan_in, _ = fan_in_and_fan_out(t.shape)
    bound = _gain(a) * math.sqrt(3.0 / fan_in)
    return uniform_(t, -bound, bound, rng)


def kaiming_normal_(t: Tensor, a: float, rng: np.random.Generator) -> Tensor:
    """N(0, std^2) with std = gain(a) / sqrt(fan_in)."""
    fan_in, _ = fan_in_and_fan_out(t.shape)
    return normal_(t, 0.0, _gain(a) / math.sqrt(fan_in), rng)


def xavier_uniform_(t: Tensor, gain: float, rng: np.random.Generator) -> Tensor:
    """U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fan_in_and_fan_out(t.shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(t, -bound, bound, rng)
