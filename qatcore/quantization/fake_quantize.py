"""Fake quantization as a differentiable op (docs/numerics.md, "Fake quantization" and
"LSQ and LSQ+"), on the numba kernels of ``qatcore.kernels.fake_quant``.

Forward (float32; per tensor, or per channel along ``axis``):

    inv = float32(1 / s);   q = z + rne(x * inv)
    y   = (clamp(q, qmin, qmax) - z) * s

Backward, straight-through estimator: dx = dy where qmin <= q <= qmax (on the
unclamped q), else 0. With a learnable scale (LSQ) and zero point (LSQ+), and
g = grad_factor:

    region      dscale                          dzero_point (LSQ+)
    q < qmin    dy * (qmin - z) * g             -dy * s * g
    q > qmax    dy * (qmax - z) * g             -dy * s * g
    inside      dy * ((q - z) * s - x) / s * g  0

summed over each channel. The forward equals ``torch.fake_quantize_per_tensor_affine``
bit for bit, except that NaN propagates instead of becoming qmin.

>>> import numpy as np
>>> x = np.array([-1.0, 0.26, 0.5, 3.0], dtype=np.float32)
>>> fake_quantize(x, 0.1, 0, -8, 7)
array([-0.8,  0.3,  0.5,  0.7], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from qatcore import kernels
from qatcore.autograd.function import Function
from qatcore.errors import ConfigError, ShapeError
from qatcore.tensor import Tensor

__all__ = ["fake_quantize", "fake_quantize_learnable", "FakeQuantizeFunction", "default_grad_factor"]


def default_grad_factor(numel: int, qmax: int) -> float:
    """The LSQ gradient scale 1 / sqrt(numel * qmax) (Esser et al. 2020)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


class FakeQuantizeFunction(Function):
    """y = fake_quant(x; s, z). Inputs: x, scale (C,), zero_point (C,) as Tensors;
    scale and zero_point get gradients only when they require them (LSQ, LSQ+)."""

    def forward(self, x, scale, zero_point, qmin, qmax, axis, grad_factor, on_backward):
        # A channel-major activation (kernels.layout) is quantized as the C-contiguous (C, N, ...)
        # array it is in memory, its axes 0 and 1 swapped, so that it is not copied.
        self.swapped = kernels.layout.is_channel_major(x)
        if self.swapped:
            x, axis = x.swapaxes(0, 1), {0: 1, 1: 0}.get(axis, axis)
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.scale = np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
        # a learnable zero point is a float Parameter; the quantizer uses it rounded and clamped
        self.zero_point = np.clip(np.rint(zero_point), qmin, qmax).astype(np.float32).reshape(-1)
        self.params = (qmin, qmax, axis)
        self.grad_factor, self.on_backward = grad_factor, on_backward
        y = kernels.fake_quant.fake_quantize_forward(self.x, self.scale, self.zero_point, qmin, qmax, axis)
        return y.swapaxes(0, 1) if self.swapped else y

    def backward(self, g):
        qmin, qmax, axis = self.params
        needs_scale, needs_zero_point = self.needs_input_grad[1], self.needs_input_grad[2]
        mode = "lsq+" if needs_zero_point else "lsq" if needs_scale else "ste"
        grad_y = np.ascontiguousarray(g.swapaxes(0, 1) if self.swapped else g, dtype=np.float32)
        dx, dscale, dzero_point, clipped = kernels.fake_quant.fake_quantize_backward(
            grad_y, self.x, self.scale, self.zero_point, qmin, qmax, axis, mode, self.grad_factor
        )
        if self.swapped:
            grad_y, dx = grad_y.swapaxes(0, 1), dx.swapaxes(0, 1)
        if self.on_backward is not None:
            self.on_backward(grad_y, dx, clipped, dscale)
        return (
            dx if self.needs_input_grad[0] else None,
            dscale if needs_scale else None,
            dzero_point if needs_zero_point else None,
        )


def _check(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int,
           axis: int | None) -> int | None:
    if not (isinstance(qmin, (int, np.integer)) and isinstance(qmax, (int, np.integer))):
        raise ConfigError(f"fake_quantize: qmin and qmax must be ints, got {qmin!r}, {qmax!r}")
    if not qmin < qmax or qmax - qmin > 2**16 - 1:
        raise ConfigError(f"fake_quantize: need qmin < qmax within 16 bits, got [{qmin}, {qmax}]")
    if axis is not None:
        if not -x.ndim <= axis < x.ndim:
            raise ShapeError(f"fake_quantize: axis {axis} does not exist in an array of shape {x.shape}")
        axis %= x.ndim
    channels = 1 if axis is None else x.shape[axis]
    if scale.size != channels or zero_point.size != channels:
        where = "per tensor" if axis is None else f"along axis {axis} of shape {x.shape}"
        raise ShapeError(
            f"fake_quantize: {where} needs {channels} scale(s) and zero point(s), got {scale.size} and "
            f"{zero_point.size}"
        )
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ConfigError("fake_quantize: scales must be finite and positive")
    return axis


def fake_quantize(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None,
                  on_backward: Callable | None = None):
    """Fake-quantize ``x`` (a numpy array -> array; a Tensor -> differentiable Tensor, STE).

    ``scale`` and ``zero_point`` are numbers (per tensor) or 1-D arrays with one
    entry per channel along ``axis``.
    """
    array = x.data if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    scale_array = np.asarray(scale.data if isinstance(scale, Tensor) else scale, dtype=np.float32).reshape(-1)
    zero_array = np.asarray(zero_point.data if isinstance(zero_point, Tensor) else zero_point,
                            dtype=np.float32).reshape(-1)
    axis = _check(array, scale_array, zero_array, qmin, qmax, axis)
    if not isinstance(x, Tensor):
        zero_array = np.clip(np.rint(zero_array), qmin, qmax).astype(np.float32)
        return kernels.fake_quant.fake_quantize_forward(
            np.ascontiguousarray(array, dtype=np.float32), scale_array, zero_array, qmin, qmax, axis
        )
    constant = Tensor._from_array
    return FakeQuantizeFunction.apply(
        x, constant(scale_array, False), constant(zero_array, False), qmin=int(qmin),
        qmax=int(qmax), axis=axis, grad_factor=1.0, on_backward=on_backward,
    )


def fake_quantize_learnable(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                            axis: int | None = None, grad_factor: float | None = None,
                            on_backward: Callable | None = None) -> Tensor:
    """Fake quantization with a learnable scale (LSQ) and, when ``zero_point``
    requires grad, a learnable zero point (LSQ+). ``grad_factor`` defaults to
    1 / sqrt(x.numel() * qmax)."""
    for name, value in (("x", x), ("scale", scale), ("zero_point", zero_point)):
        if not isinstance(value, Tensor):
            raise ConfigError(f"fake_quantize_learnable: {name} must be a Tensor, got {type(value).__name__}")
    axis = _check(x.data, scale.data.reshape(-1), zero_point.data.reshape(-1), qmin, qmax, axis)
    if grad_factor is None:
        grad_factor = default_grad_factor(x.data.size, qmax)
    return FakeQuantizeFunction.apply(
        x, scale, zero_point, qmin=int(qmin), qmax=int(qmax), axis=axis,
        grad_factor=float(grad_factor), on_backward=on_backward,
    )
