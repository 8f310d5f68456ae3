"""Per-sample normalization layers: LayerNorm and RMSNorm (see
:func:`qatcore.nn.functional.layer_norm` and :func:`~qatcore.nn.functional.rms_norm`).

Unlike BatchNorm they keep no running statistics: each sample is normalized over its
trailing ``normalized_shape`` axes, in training and in eval alike.
"""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter

__all__ = ["LayerNorm", "RMSNorm"]


def _shape(normalized_shape, layer: str) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    if not shape or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ConfigError(f"{layer}: normalized_shape must be a positive int or a non-empty sequence of positive "
                          f"ints, got {normalized_shape!r}")
    return tuple(int(s) for s in shape)


def _eps(eps, layer: str, allow_none: bool = False):
    if eps is None and allow_none:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps >= 0:
        raise ConfigError(f"{layer}: eps must be a number >= 0{' or None' if allow_none else ''}, got {eps!r}")
    return float(eps)


class LayerNorm(Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing ``normalized_shape`` axes;
    weight starts at 1 and bias at 0 (PyTorch's ``nn.LayerNorm``).

    >>> import numpy as np
    >>> ln = LayerNorm(4)
    >>> y = ln(np.arange(8, dtype=np.float32).reshape(2, 4))
    >>> bool(np.allclose(y.numpy().mean(axis=1), 0, atol=1e-6))
    True
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 dtype=np.float32) -> None:
        super().__init__()
        self.normalized_shape = _shape(normalized_shape, "LayerNorm")
        self.eps = _eps(eps, "LayerNorm")
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        if self.elementwise_affine and bias:
            self.bias = Parameter(np.zeros(self.normalized_shape, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight over the trailing ``normalized_shape`` axes; eps None
    is the input dtype's machine epsilon; weight starts at 1 (PyTorch's ``nn.RMSNorm``).

    >>> import numpy as np
    >>> y = RMSNorm(2)(np.array([[3.0, 4.0]], dtype=np.float32))
    >>> [round(v, 4) for v in y.numpy()[0].tolist()]
    [0.8485, 1.1314]
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 dtype=np.float32) -> None:
        super().__init__()
        self.normalized_shape = _shape(normalized_shape, "RMSNorm")
        self.eps = _eps(eps, "RMSNorm", allow_none=True)
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
