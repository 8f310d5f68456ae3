"""2-D convolution layer."""

from __future__ import annotations

import math

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.nn import init
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter
from qatcore.random import generator_or_default

__all__ = ["Conv2d"]


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2:
        raise ConfigError(f"Conv2d: {name} must be an int or a pair, got {value!r}")
    return int(pair[0]), int(pair[1])


class Conv2d(Module):
    """Cross-correlation of (N, C, H, W) input with (K, C/groups, kh, kw) weights;
    see :func:`qatcore.nn.functional.conv2d` for the formula. The weights are drawn from
    ``rng``, or without one from qatcore's default generator (:func:`qatcore.manual_seed`).

    >>> import numpy as np
    >>> conv = Conv2d(1, 4, 3, padding=1, rng=np.random.default_rng(0))
    >>> conv(np.zeros((2, 1, 8, 8), dtype=np.float32)).shape
    (2, 4, 8, 8)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True,
                 rng: np.random.Generator | None = None, dtype=np.float32) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ConfigError(
                f"Conv2d: groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        rng = generator_or_default(rng, "Conv2d: rng")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = Parameter(np.empty(shape, dtype=dtype))
        init.kaiming_uniform_(self.weight, math.sqrt(5), rng)
        if bias:
            fan_in, _ = init.fan_in_and_fan_out(shape)
            self.bias = Parameter(np.empty(out_channels, dtype=dtype))
            init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), rng)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
