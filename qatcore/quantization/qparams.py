"""``QParams``: the scale and zero point that map reals to integers, and how they
are computed from an observed range (docs/numerics.md, "Scale and zero point from an
observed range").

    quantize:    q = clamp(z + rne(x * float32(1/s)), qmin, qmax)
    dequantize:  x' = (q - z) * s

From an observed range (min, max), with zero always representable:

    mn = min(min, 0),  mx = max(max, 0)
    symmetric:  s = max(max(-mn, mx) / ((qmax - qmin) / 2), eps)
                z = 0 (signed) or (qmin + qmax + 1) // 2 (unsigned)
    affine:     s = max((mx - mn) / (qmax - qmin), eps)
                z = clamp(qmin - rne(mn / s), qmin, qmax)
    eps = float32 machine epsilon (1.1920929e-07)

The arithmetic is float32, as PyTorch's observers do it; a range so wide that a
float32 difference overflows gives the largest finite float32 scale instead of
inf, so scales are always finite and positive.

>>> from qatcore.quantization.dtypes import INT8_NARROW, UINT8
>>> from qatcore.quantization.qscheme import QScheme
>>> p = QParams.from_range(-1.0, 3.0, UINT8, QScheme.PER_TENSOR_AFFINE)
>>> float(p.scale[0]), int(p.zero_point[0])
(0.01568627543747425, 64)
>>> w = QParams.from_range([-0.5, -2.0], [1.27, 0.1], INT8_NARROW, QScheme.PER_CHANNEL_SYMMETRIC, axis=0)
>>> w.scale.tolist(), w.zero_point.tolist()
([0.009999999776482582, 0.015748031437397003], [0, 0])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qatcore.errors import ConfigError
from qatcore.quantization.dtypes import QuantDType
from qatcore.quantization.qscheme import QScheme

__all__ = ["QParams", "FLOAT32_EPS", "scale_zero_point_from_range"]

FLOAT32_EPS = np.float32(np.finfo(np.float32).eps)
_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


def scale_zero_point_from_range(min_val, max_val, dtype: QuantDType, symmetric: bool,
                                eps: float = FLOAT32_EPS) -> tuple[np.ndarray, np.ndarray]:
    """Per-element (scale float32, zero_point int32) for arrays of minima and maxima."""
    mn_in = np.atleast_1d(np.asarray(min_val, dtype=np.float32))
    mx_in = np.atleast_1d(np.asarray(max_val, dtype=np.float32))
    if mn_in.shape != mx_in.shape:
        raise ConfigError(f"qparams: min has shape {mn_in.shape} but max has shape {mx_in.shape}")
    if not (np.all(np.isfinite(mn_in)) and np.all(np.isfinite(mx_in))):
        raise ConfigError("qparams: the observed range must be finite (was anything observed?)")
    if np.any(mn_in > mx_in):
        raise ConfigError("qparams: an observed minimum exceeds its maximum")
    qmin, qmax = dtype.qmin, dtype.qmax
    eps32 = np.float32(eps)
    mn = np.minimum(mn_in, np.float32(0))
    mx = np.maximum(mx_in, np.float32(0))
    if symmetric:
        numerator, denominator = np.maximum(-mn, mx), np.float32((qmax - qmin) / 2)
    else:
        # mx - mn overflows float32 only beyond ~1.7e38; entering np.errstate costs more than
        # the arithmetic, so only ranges that large pay for it (the training step calls this)
        if np.float64(mx.max()) - np.float64(mn.min()) <= 1e38:  # float64: the check cannot overflow
            numerator = mx - mn
        else:
            with np.errstate(over="ignore"):
                numerator = mx - mn
        denominator = np.float32(qmax - qmin)
    scale = numerator / denominator
    scale = np.maximum(np.minimum(scale.astype(np.float32), _FLOAT32_MAX), eps32)
    if symmetric:
        zero = 0 if dtype.signed else (qmin + qmax + 1) // 2
        zero_point = np.full(scale.shape, zero, dtype=np.int32)
    else:
        zero_point = np.clip(qmin - np.rint(mn / scale), qmin, qmax).astype(np.int32)
    return scale.astype(np.float32), zero_point


@dataclass(frozen=True, eq=False)
class QParams:
    """Validated quantization parameters of one tensor.

    ``scale`` (float32) and ``zero_point`` (int32) are 1-D: length 1 per tensor,
    one entry per channel along ``axis`` per channel. Both are read-only copies.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: QuantDType
    axis: int | None = None

    def __post_init__(self) -> None:
        scale = np.array(self.scale, dtype=np.float32, copy=True).reshape(-1)
        zero_point = np.array(self.zero_point, copy=True).reshape(-1)
        if not isinstance(self.dtype, QuantDType):
            raise ConfigError(f"QParams.dtype must be a QuantDType, got {type(self.dtype).__name__}")
        if scale.size == 0 or scale.shape != zero_point.shape:
            raise ConfigError(
                f"QParams: scale {scale.shape} and zero_point {zero_point.shape} must be non-empty and match"
            )
        if self.axis is None and scale.size != 1:
            raise ConfigError(f"QParams: per-tensor parameters need one scale, got {scale.size} (set axis)")
        if self.axis is not None and (type(self.axis) is not int or self.axis < 0):
            raise ConfigError(f"QParams.axis must be None or a non-negative int, got {self.axis!r}")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ConfigError(f"QParams.scale must be finite and positive, got {scale.tolist()[:8]}")
        if zero_point.dtype.kind not in "iu" and not np.array_equal(zero_point, np.rint(zero_point)):
            raise ConfigError("QParams.zero_point must hold integers")
        zero_point = zero_point.astype(np.int32)
        qmin, qmax = self.dtype.qmin, self.dtype.qmax
        if np.any(zero_point < qmin) or np.any(zero_point > qmax):
            raise ConfigError(f"QParams.zero_point must lie in [{qmin}, {qmax}] for {self.dtype.name}")
        scale.flags.writeable = False
        zero_point.flags.writeable = False
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)

    @property
    def qmin(self) -> int:
        return self.dtype.qmin

    @property
    def qmax(self) -> int:
        return self.dtype.qmax

    @classmethod
    def from_range(cls, min_val, max_val, dtype: QuantDType, scheme: QScheme, axis: int | None = None,
                   eps: float = FLOAT32_EPS) -> QParams:
        """QParams for an observed range by the formulas in the module docstring."""
        if scheme.per_channel and axis is None:
            raise ConfigError(f"{scheme.value} needs an axis")
        scale, zero_point = scale_zero_point_from_range(min_val, max_val, dtype, scheme.symmetric, eps)
        return cls(scale, zero_point, dtype, axis if scheme.per_channel else None)

    def _broadcast(self, values: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self.axis is None:
            return values[0]
        if self.axis >= x.ndim or x.shape[self.axis] != values.size:
            raise ConfigError(
                f"QParams: {values.size} channels along axis {self.axis} do not fit an array of shape {x.shape}"
            )
        shape = [1] * x.ndim
        shape[self.axis] = values.size
        return values.reshape(shape)

    def quantize(self, x) -> np.ndarray:
        """Integers (int32) for the reals ``x``: clamp(z + rne(x * float32(1/s)), qmin, qmax)."""
        x = np.asarray(x, dtype=np.float32)
        inv = np.float32(1) / self._broadcast(self.scale, x)
        q = np.rint(x * inv) + self._broadcast(self.zero_point, x).astype(np.float32)
        return np.clip(q, self.qmin, self.qmax).astype(np.int32)

    def dequantize(self, q) -> np.ndarray:
        """Reals (float32) for integers ``q``: (q - z) * s."""
        q = np.asarray(q)
        centered = (q.astype(np.int64) - self._broadcast(self.zero_point, q)).astype(np.float32)
        return centered * self._broadcast(self.scale, q)

    def to_dict(self) -> dict:
        return {"scale": self.scale.copy(), "zero_point": self.zero_point.copy(), "bits": self.dtype.bits,
                "signed": self.dtype.signed, "narrow_range": self.dtype.narrow_range, "axis": self.axis}

    def __repr__(self) -> str:
        if self.scale.size == 1:
            return f"QParams({self.dtype.name}, scale={float(self.scale[0]):.6g}, zero_point={int(self.zero_point[0])})"
        return f"QParams({self.dtype.name}, {self.scale.size} channels along axis {self.axis})"
