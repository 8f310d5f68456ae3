"""The multipliers of requantization, in both arithmetics (docs/numerics.md, "Two requantization
arithmetics").

An int8 operator rescales an integer accumulator by a real multiplier made of float32 scales
(``M = s_x * s_w / s_y`` for a convolution). The two arithmetics of
:class:`~qatcore.quantization.config.Requantization` hold it differently:

* fixed point: M computed in float64 from the float32 scales, then written as an int32 M0
  and a shift (``kernels.requantize.quantize_multiplier``);
* float32: M computed in float32 from the float32 scales, operation by operation in the
  order ONNX Runtime's CPU kernels compute it, so that ONNX Runtime, given the same scales
  in the exported file, multiplies by the very same float32 number.

This module has one function per operator family's multiplier; the kernels apply them
(``kernels.requantize``, ``kernels.requantize_float32``).

>>> m0, shift, m32 = weighted_multipliers(np.float32(0.02), np.float32([0.001, 0.003]), np.float32(0.05), 2)
>>> m32.dtype, m32.tolist() == [np.float32(np.float32(np.float32(0.02) * s) / np.float32(0.05))
...                             for s in np.float32([0.001, 0.003])]
(dtype('float32'), True)
"""

from __future__ import annotations

import numpy as np

from qatcore import kernels

__all__ = ["weighted_multipliers", "float32_ratio", "add_float32", "add_float32_constants", "global_average_multiplier",
           "quantize_float32", "average_pool_float32"]


def _f32(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def float32_ratio(numerator, denominator) -> np.ndarray:
    """float32(a / b) of float32 a and b: one float32 division, rounded to nearest even."""
    return (_f32(numerator) / _f32(denominator)).astype(np.float32)


def weighted_multipliers(x_scale, w_scale, y_scale, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M0, shift, m) per output channel of a Linear / Conv2d, M = s_x * s_w / s_y.

    M0 and shift: the fixed-point form of M computed in float64 from the float32 scales.
    m: ONNX Runtime's float32 multiplier (QLinearConv, and the QDQ Conv/Gemm it fuses into
    it): ``float32(float32(s_x * s_w[c]) / s_y)``, two float32 operations in this order.
    ``w_scale`` is a scalar or one scale per channel; results have ``channels`` entries.
    """
    s_x, s_y = _f32(x_scale).reshape(()), _f32(y_scale).reshape(())
    s_w = np.broadcast_to(_f32(w_scale).reshape(-1), (channels,))
    real = np.float64(s_x) * s_w.astype(np.float64) / np.float64(s_y)
    multiplier, shift = kernels.requantize.quantize_multiplier(real)
    m = float32_ratio((s_x * s_w).astype(np.float32), s_y)
    return multiplier.astype(np.int32), shift.astype(np.int32), m


def add_float32(a: np.ndarray, b: np.ndarray, scales, zero_points, y_scale, y_zero_point) -> np.ndarray:
    """The real value of a + b on the output grid, before rounding, as ONNX Runtime's QLinearAdd
    computes it (its AVX2 kernel; the QDQ Add it fuses into it), in float32:

        r_P = s_P / s_y,  r_Q = s_Q / s_y,  F = z_y - fma(z_P, r_P, r_Q * z_Q)
        v = fma(P, r_P, fma(Q, r_Q, F))          (P, Q the stored integers, zero points inside F)

    with (P, Q) = (a, b), swapped when a alone is a single element; when Q is a single element
    F takes it first: F = fma(Q, r_Q, F), v = fma(P, r_P, F). Returns v (float32); the caller
    rounds half to even and clamps.
    """
    first, second = (1, 0) if (np.size(a) == 1 and np.size(b) > 1) else (0, 1)
    p, q = (a, b)[first], (a, b)[second]
    r_p, r_q, constant = add_float32_constants(scales, zero_points, y_scale, y_zero_point, first)
    fma = kernels.requantize_float32.fma_float32
    constant = np.asarray(constant, dtype=np.float32)
    if np.size(q) == 1:
        constant = fma(np.float32(np.asarray(q).reshape(-1)[0]), r_q, constant)
        return fma(np.asarray(p).astype(np.float32), r_p, np.broadcast_to(constant, np.shape(p)))
    p, q = np.broadcast_arrays(np.asarray(p), np.asarray(q))
    inner = fma(q.astype(np.float32), r_q, np.broadcast_to(constant, q.shape))
    return fma(p.astype(np.float32), r_p, inner)


def add_float32_constants(scales, zero_points, y_scale, y_zero_point, first: int = 0):
    """(r_P, r_Q, F) of :func:`add_float32`, three float32 scalars, with P the input ``first``
    (0 or 1) and Q the other: r = float32(s / s_y), F = z_y - fma(z_P, r_P, float32(r_Q * z_Q))."""
    second = 1 - first
    s_y = np.float32(y_scale)
    r_p = float32_ratio(scales[first], s_y)
    r_q = float32_ratio(scales[second], s_y)
    fma = kernels.requantize_float32.fma_float32
    constant = np.float32(y_zero_point) - fma(np.float32(zero_points[first]), r_p,
                                              (r_q * np.float32(zero_points[second])).astype(np.float32))
    return np.float32(r_p), np.float32(r_q), np.float32(constant)


def global_average_multiplier(x_scale, y_scale, count: int) -> np.float32:
    """ONNX Runtime's QLinearGlobalAveragePool multiplier: float32(s_x / float32(s_y * float32(n)))
    for a window of n values; it applies it to the integer sum minus n * z_x like a
    convolution's accumulator."""
    inner = (np.float32(y_scale) * np.float32(count)).astype(np.float32)
    return np.float32(float32_ratio(x_scale, inner))


def average_pool_float32(x: np.ndarray, x_scale, x_zero_point: int, y_scale, y_zero_point: int,
                         kernel: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """ONNX Runtime's QLinearAveragePool (no padding) up to the rounding, in float32: each input
    dequantized (float32(s_x * float32(q - z_x))), the window summed in float32 row by row,
    divided by its size, then ``v / s_y + z_y`` (the zero point added before rounding).
    Returns that float32 value; the caller rounds half to even and clamps."""
    values = (np.float32(x_scale) * (x.astype(np.int32) - np.int32(x_zero_point)).astype(np.float32)).astype(
        np.float32)
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = values.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    total = np.zeros((n, c, oh, ow), np.float32)
    for i in range(kh):
        for j in range(kw):
            total = (total + values[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]).astype(np.float32)
    mean = (total / np.float32(kh * kw)).astype(np.float32)
    return ((mean / np.float32(y_scale)).astype(np.float32) + np.float32(y_zero_point)).astype(np.float32)


def quantize_float32(x: np.ndarray, scale) -> np.ndarray:
    """float32(x / s): ONNX QuantizeLinear divides (the caller rounds half to even, adds the
    zero point and clamps)."""
    return (np.asarray(x, dtype=np.float32) / np.float32(scale)).astype(np.float32)
