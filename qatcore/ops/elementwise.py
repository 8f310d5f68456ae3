"""Elementwise primitives. Each class is one op: forward formula, then its
derivative right beside it (d out / d input, times the incoming gradient ``g``).

Broadcasting is numpy's; gradients may come back in the broadcast shape and the
engine sums them to each input's shape.
"""

from __future__ import annotations

import math

import numpy as np

from qatcore import kernels
from qatcore.autograd.function import Function

__all__ = [
    "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Exp", "Log", "Sqrt",
    "Relu", "Sigmoid", "Tanh", "Clamp", "Cast", "Gelu", "GeluTanh", "Silu", "Erf", "Where",
]


class Add(Function):
    """out = a + b;  da = g, db = g."""

    def forward(self, a, b):
        return a + b

    def backward(self, g):
        return g, g


class Sub(Function):
    """out = a - b;  da = g, db = -g."""

    def forward(self, a, b):
        return a - b

    def backward(self, g):
        return g, (-g if self.needs_input_grad[1] else None)


class Mul(Function):
    """out = a * b;  da = g * b, db = g * a."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        da = g * self.b if self.needs_input_grad[0] else None
        db = g * self.a if self.needs_input_grad[1] else None
        return da, db


class Div(Function):
    """out = a / b;  da = g / b, db = -g * a / b^2."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        da = g / self.b if self.needs_input_grad[0] else None
        db = -g * self.a / (self.b * self.b) if self.needs_input_grad[1] else None
        return da, db


class Neg(Function):
    """out = -a;  da = -g."""

    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Pow(Function):
    """out = a ** p for a constant exponent p;  da = g * p * a ** (p - 1)."""

    def forward(self, a, exponent: float):
        self.a, self.exponent = a, exponent
        return a ** np.asarray(exponent, dtype=a.dtype)

    def backward(self, g):
        p = np.asarray(self.exponent, dtype=self.a.dtype)
        return (g * p * self.a ** (p - 1),)


class Exp(Function):
    """out = e^a;  da = g * out."""

    def forward(self, a):
        self.out = np.exp(a)
        return self.out

    def backward(self, g):
        return (g * self.out,)


class Log(Function):
    """out = ln a;  da = g / a."""

    def forward(self, a):
        self.a = a
        return np.log(a)

    def backward(self, g):
        return (g / self.a,)


class Sqrt(Function):
    """out = sqrt(a);  da = g / (2 * out)."""

    def forward(self, a):
        self.out = np.sqrt(a)
        return self.out

    def backward(self, g):
        return (g / (2 * self.out),)


class Relu(Function):
    """out = max(a, 0);  da = g where out > 0, else 0 (0 at a == 0, as PyTorch)."""

    def forward(self, a):
        self.out = np.maximum(a, np.zeros((), dtype=a.dtype))
        return self.out

    def backward(self, g):
        return (g * (self.out > 0),)


class Sigmoid(Function):
    """out = 1 / (1 + e^-a), computed without overflow;  da = g * out * (1 - out)."""

    def forward(self, a):
        # e^-|a| never overflows; pick the algebraically equal form per sign.
        e = np.exp(-np.abs(a))
        self.out = np.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)
        return self.out

    def backward(self, g):
        return (g * self.out * (1 - self.out),)


class Tanh(Function):
    """out = tanh(a);  da = g * (1 - out^2)."""

    def forward(self, a):
        self.out = np.tanh(a)
        return self.out

    def backward(self, g):
        return (g * (1 - self.out * self.out),)


class Clamp(Function):
    """out = min(max(a, lo), hi);  da = g where lo <= a <= hi (inclusive, as PyTorch).

    Either bound may be None (unbounded on that side).
    """

    def forward(self, a, lo=None, hi=None):
        # mask = not (a < lo or a > hi): NaN compares false both times, so its gradient passes
        # as PyTorch's does. Each array is made in a's memory layout (NumPy's default order).
        outside = None
        out = a
        if lo is not None:
            bound = np.asarray(lo, dtype=a.dtype)
            outside = a < bound
            out = np.maximum(a, bound)
        if hi is not None:
            bound = np.asarray(hi, dtype=a.dtype)
            above = a > bound
            outside = above if outside is None else np.logical_or(outside, above, out=outside)
            out = np.minimum(out, bound) if out is a else np.minimum(out, bound, out=out)
        self.mask = None if outside is None else np.logical_not(outside, out=outside)
        return np.array(out, copy=out is a)

    def backward(self, g):
        return (g if self.mask is None else g * self.mask,)


class Cast(Function):
    """out = a converted to ``dtype``;  da = g converted back to a's dtype."""

    def forward(self, a, dtype):
        self.in_dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return (g.astype(self.in_dtype),)


_SQRT_HALF = 1 / math.sqrt(2.0)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


class Gelu(Function):
    """out = a * Phi(a), Phi(a) = (1 + erf(a / sqrt 2)) / 2 (exact GELU; erf from ``kernels.erf``);
    da = g * (Phi(a) + a * phi(a)), phi(a) = e^(-a^2 / 2) / sqrt(2 pi)."""

    def forward(self, a):
        self.a = a
        self.cdf = (0.5 * (1 + kernels.erf.erf(a * np.asarray(_SQRT_HALF, a.dtype)))).astype(a.dtype, copy=False)
        return a * self.cdf

    def backward(self, g):
        a = self.a
        pdf = np.exp(-0.5 * a * a) * np.asarray(_INV_SQRT_2PI, a.dtype)
        return (g * (self.cdf + a * pdf),)


class GeluTanh(Function):
    """out = a / 2 * (1 + tanh(u)), u = sqrt(2/pi) * (a + 0.044715 a^3) (GELU's tanh approximation);
    da = g * ((1 + t) / 2 + a / 2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 a^2)), t = tanh(u)."""

    def forward(self, a):
        k, c = np.asarray(_SQRT_2_OVER_PI, a.dtype), np.asarray(_GELU_CUBIC, a.dtype)
        self.a = a
        self.t = np.tanh(k * (a + c * a * a * a))
        return 0.5 * a * (1 + self.t)

    def backward(self, g):
        a, t = self.a, self.t
        k, c = np.asarray(_SQRT_2_OVER_PI, a.dtype), np.asarray(_GELU_CUBIC, a.dtype)
        return (g * (0.5 * (1 + t) + 0.5 * a * (1 - t * t) * k * (1 + 3 * c * a * a)),)


class Silu(Function):
    """out = a * sigmoid(a) (SiLU, also called swish);  da = g * s * (1 + a * (1 - s)), s = sigmoid(a)."""

    def forward(self, a):
        e = np.exp(-np.abs(a))  # sigmoid without overflow, as Sigmoid computes it
        self.a = a
        self.s = np.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)
        return a * self.s

    def backward(self, g):
        s = self.s
        return (g * s * (1 + self.a * (1 - s)),)


# ---- ONNX import (issue 20): Erf and Where ------------------------------------------------------
_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)


class Erf(Function):
    """out = erf(a) (``kernels.erf``);  da = g * 2 / sqrt(pi) * e^(-a^2)."""

    def forward(self, a):
        self.a = a
        return kernels.erf.erf(a)

    def backward(self, g):
        a = self.a
        return (g * np.asarray(_TWO_OVER_SQRT_PI, a.dtype) * np.exp(-a * a),)


class Where(Function):
    """out = a where ``condition`` else b (a constant boolean array; the three broadcast);
    da = g where condition (0 elsewhere), db = g elsewhere (0 where condition)."""

    def forward(self, a, b, condition: np.ndarray):
        self.condition = condition
        return np.where(condition, a, b)

    def backward(self, g):
        zero = np.zeros((), g.dtype)
        da = np.where(self.condition, g, zero) if self.needs_input_grad[0] else None
        db = np.where(self.condition, zero, g) if self.needs_input_grad[1] else None
        return da, db
