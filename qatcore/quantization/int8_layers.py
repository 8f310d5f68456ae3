"""The integer-only int8 runtime: the modules a converted model is made of.

Between a :class:`Quantize` at the inputs and a :class:`Dequantize` at the
outputs, every value is an integer array (uint8 or int8) with a per-tensor scale
and zero point known when the model was converted, and every operation is
integer arithmetic (docs/numerics.md, Jacob et al. 2018):

    QuantizedLinear / QuantizedConv2d:
        acc   = sum (x_q - z_x) * w_q + bias_q                      (int32)
        y_q   = clamp(z_y + rounding_rshift(srdhm(acc, M0), n), lo, hi)
        with M = s_x * s_w / s_y = M0 * 2^-31 * 2^-n per output channel; lo = z_y
        when a ReLU is fused (the ReLU is the clamp), else qmin
    QuantizedAdd:   both inputs rescaled to a common scale with 20 fractional bits, summed,
                    requantized once to the output (TFLite's int8 add)
    Requantize:     y_q = clamp(z_y + requant(x - z_x; s_x/s_y))   (also a fused ReLU)
    MaxPool, Flatten: on the integers, qparams unchanged
    AvgPool:        y_q = clamp(z_y + requant(sum of (x_q - z_x); s_x / (count * s_y)))

where requant(v; m) multiplies by m in the fixed-point form above.

Every module here has the form ``forward(array) -> array`` on numpy integer
arrays (Quantize takes floats, Dequantize returns a float Tensor), keeps its
integer tables in buffers (so ``state_dict`` holds all of it) and its shape
settings in a ``config()`` dict, so a converted model can be saved as a graph
description plus module states and rebuilt (see ``conversion.save_int8_model``).
"""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError, DTypeError
from qatcore.nn.module import Module
from qatcore.tensor import Tensor

__all__ = [
    "Quantize", "Dequantize", "QuantizedLinear", "QuantizedConv2d", "QuantizedAdd", "Requantize",
    "Int8MaxPool2d", "Int8AvgPool2d", "Int8Flatten", "Int8Cat", "INT8_MODULES", "requantize_array",
]

_ADD_LEFT_SHIFT = 20


def _out_dtype(qmin: int, qmax: int) -> np.dtype:
    if qmin >= 0 and qmax <= 255:
        return np.dtype(np.uint8)
    if qmin >= -128 and qmax <= 127:
        return np.dtype(np.int8)
    return np.dtype(np.int16) if qmin >= -(2**15) and qmax < 2**15 else np.dtype(np.int32)


def requantize_array(values: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """rounding_rshift(srdhm(values, M0), n) elementwise, int64 in and out (exact, gemmlowp)."""
    from qatcore.kernels.requantize import multiply_by_quantized_multiplier

    return multiply_by_quantized_multiplier(values, multiplier, shift)


_OUTPUT_STATE = (("output_scale", "<f4"), ("output_zero_point", "<i4"), ("output_range", "<i4"))


class _Int8Module(Module):
    """Shared: integer buffers, the settings dict, the qparams of the output.

    ``STATE`` lists each subclass's buffers, in registration order, with their dtypes:
    the int8 file format stores the values in that order (no names) and restores them.
    """

    STATE: tuple[tuple[str, str], ...] = ()

    def _set_output(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        self.register_buffer("output_scale", np.array(scale, dtype=np.float32))
        self.register_buffer("output_zero_point", np.array(zero_point, dtype=np.int32))
        self.register_buffer("output_range", np.array([qmin, qmax], dtype=np.int32))

    @property
    def out_dtype(self) -> np.dtype:
        qmin, qmax = self.output_range.data.tolist()
        return _out_dtype(qmin, qmax)

    # the attributes config() writes and from_config() restores (beyond the STATE buffers)
    CONFIG_KEYS: tuple[str, ...] = ()

    def config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict) -> _Int8Module:
        if set(config) != set(cls.CONFIG_KEYS):
            raise ConfigError(f"{cls.__name__} config needs exactly the keys {sorted(cls.CONFIG_KEYS)}, "
                              f"got {sorted(config)}")
        module = cls.__new__(cls)
        Module.__init__(module)
        for key, value in config.items():
            object.__setattr__(module, key, tuple(value) if isinstance(value, list) else value)
        return module


def _int_input(module: Module, x) -> np.ndarray:
    array = x.data if isinstance(x, Tensor) else np.asarray(x)
    if array.dtype.kind not in "iu":
        raise DTypeError(f"{type(module).__name__}: expected a quantized integer array, got dtype {array.dtype}")
    return array


class Quantize(_Int8Module):
    """x (float) -> clamp(z + rne(x * float32(1/s)), qmin, qmax) as integers."""

    STATE = _OUTPUT_STATE

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self._set_output(scale, zero_point, qmin, qmax)

    def forward(self, x):
        array = x.data if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
        inv = np.float32(1) / self.output_scale.data
        q = np.rint(array.astype(np.float32, copy=False) * inv) + np.float32(self.output_zero_point.data)
        qmin, qmax = self.output_range.data.tolist()
        return np.clip(q, qmin, qmax).astype(self.out_dtype)


class Dequantize(_Int8Module):
    """x_q -> (x_q - z) * s as a float32 Tensor."""

    STATE = _OUTPUT_STATE

    def __init__(self, scale: float, zero_point: int) -> None:
        super().__init__()
        self._set_output(scale, zero_point, -(2**31), 2**31 - 1)

    def forward(self, x):
        q = _int_input(self, x)
        values = (q.astype(np.int32) - self.output_zero_point.data).astype(np.float32) * self.output_scale.data
        return Tensor._from_array(values, requires_grad=False)


class _QuantizedWeighted(_Int8Module):
    """QuantizedLinear / QuantizedConv2d: int8 weights, int32 bias, per-channel requantization."""

    STATE = (("weight_q", "|i1"), ("bias_q", "<i4"), ("multiplier", "<i4"), ("shift", "<i4"),
             ("input_zero_point", "<i4"), *_OUTPUT_STATE, ("clamp_min", "<i4"))

    def __init__(self, weight_q: np.ndarray, bias_q: np.ndarray, multiplier: np.ndarray, shift: np.ndarray,
                 input_zero_point: int, output_scale: float, output_zero_point: int, out_min: int, qmin: int,
                 qmax: int) -> None:
        super().__init__()
        if weight_q.dtype != np.int8:
            raise DTypeError(f"{type(self).__name__}: weights must be int8, got {weight_q.dtype}")
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("bias_q", bias_q.astype(np.int32))
        self.register_buffer("multiplier", multiplier.astype(np.int32))
        self.register_buffer("shift", shift.astype(np.int32))
        self.register_buffer("input_zero_point", np.array(input_zero_point, dtype=np.int32))
        self._set_output(output_scale, output_zero_point, qmin, qmax)
        self.register_buffer("clamp_min", np.array(out_min, dtype=np.int32))

    def _epilogue_args(self) -> tuple:
        qmax = int(self.output_range.data[1])
        return (self.bias_q.data, self.multiplier.data, self.shift.data, int(self.output_zero_point.data),
                int(self.clamp_min.data), qmax, self.out_dtype)


class QuantizedLinear(_QuantizedWeighted):
    """y_q = requant(x_q @ w_q^T - z_x * colsum(w_q) + bias_q) (module docstring)."""

    def forward(self, x):
        from qatcore.kernels import int8_gemm

        q = _int_input(self, x)
        lead = q.shape[:-1]
        out = int8_gemm.int8_linear(np.ascontiguousarray(q.reshape(-1, q.shape[-1])), int(self.input_zero_point.data),
                                    self.weight_q.data, *self._epilogue_args())
        return out.reshape(lead + (out.shape[-1],))


class QuantizedConv2d(_QuantizedWeighted):
    """Integer conv2d (zero padding is the input's zero point, i.e. real 0) with the fused requantization."""

    def __init__(self, *args, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1) -> None:
        super().__init__(*args)
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), groups

    CONFIG_KEYS = ("stride", "padding", "dilation", "groups")

    def config(self) -> dict:
        return {"stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups}

    def forward(self, x):
        from qatcore.kernels import int8_conv

        q = _int_input(self, x)
        return int8_conv.int8_conv2d(np.ascontiguousarray(q), int(self.input_zero_point.data), self.weight_q.data,
                                     *self._epilogue_args(), self.stride, self.padding, self.dilation, self.groups)


class Requantize(_Int8Module):
    """y_q = clamp(z_y + requant(x_q - z_x; s_x / s_y), lo, hi); lo = z_y fuses a ReLU."""

    STATE = (("multiplier", "<i4"), ("shift", "<i4"), ("input_zero_point", "<i4"), *_OUTPUT_STATE,
             ("clamp_min", "<i4"))

    def __init__(self, input_scale: float, input_zero_point: int, output_scale: float, output_zero_point: int,
                 out_min: int, qmin: int, qmax: int) -> None:
        super().__init__()
        from qatcore.kernels.requantize import quantize_multiplier

        multiplier, shift = quantize_multiplier(np.array([input_scale / output_scale], dtype=np.float64)
                                                * 2.0**-_ADD_LEFT_SHIFT)
        self.register_buffer("multiplier", multiplier.astype(np.int32))
        self.register_buffer("shift", shift.astype(np.int32))
        self.register_buffer("input_zero_point", np.array(input_zero_point, dtype=np.int32))
        self._set_output(output_scale, output_zero_point, qmin, qmax)
        self.register_buffer("clamp_min", np.array(out_min, dtype=np.int32))

    def forward(self, x):
        q = _int_input(self, x).astype(np.int64)
        shifted = (q - int(self.input_zero_point.data)) << _ADD_LEFT_SHIFT
        y = requantize_array(shifted, self.multiplier.data, self.shift.data) + int(self.output_zero_point.data)
        return np.clip(y, int(self.clamp_min.data), int(self.output_range.data[1])).astype(self.out_dtype)


class QuantizedAdd(_Int8Module):
    """y_q = clamp(z_y + requant(a + b; 2 m / (2^20 s_y)), lo, hi) with
    a = requant((x1 - z1) << 20; s1 / 2m), b = requant((x2 - z2) << 20; s2 / 2m), m = max(s1, s2):
    both inputs are brought to a common scale keeping 20 fractional bits, summed, and
    rounded once (TFLite's int8 add)."""

    STATE = (("multiplier", "<i4"), ("shift", "<i4"), ("input_zero_points", "<i4"), *_OUTPUT_STATE,
             ("clamp_min", "<i4"))

    def __init__(self, scales: tuple[float, float], zero_points: tuple[int, int], output_scale: float,
                 output_zero_point: int, out_min: int, qmin: int, qmax: int) -> None:
        super().__init__()
        from qatcore.kernels.requantize import quantize_multiplier

        twice_max = 2.0 * max(scales)
        real = np.array([scales[0] / twice_max, scales[1] / twice_max,
                         twice_max / (2.0**_ADD_LEFT_SHIFT * output_scale)], dtype=np.float64)
        multiplier, shift = quantize_multiplier(real)
        self.register_buffer("multiplier", multiplier.astype(np.int32))
        self.register_buffer("shift", shift.astype(np.int32))
        self.register_buffer("input_zero_points", np.array(zero_points, dtype=np.int32))
        self._set_output(output_scale, output_zero_point, qmin, qmax)
        self.register_buffer("clamp_min", np.array(out_min, dtype=np.int32))

    def forward(self, a, b):
        total = np.int64(0)
        for i, x in enumerate((a, b)):
            shifted = (_int_input(self, x).astype(np.int64) - int(self.input_zero_points.data[i])) << _ADD_LEFT_SHIFT
            total = total + requantize_array(shifted, self.multiplier.data[i:i + 1], self.shift.data[i:i + 1])
        y = requantize_array(total, self.multiplier.data[2:3], self.shift.data[2:3]) + int(self.output_zero_point.data)
        return np.clip(y, int(self.clamp_min.data), int(self.output_range.data[1])).astype(self.out_dtype)


class Int8MaxPool2d(_Int8Module):
    """Max over each window of the integers (padding never wins: it is the smallest value)."""

    def __init__(self, kernel_size, stride, padding, dilation) -> None:
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)

    CONFIG_KEYS = ("kernel_size", "stride", "padding", "dilation")

    def config(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("kernel_size", "stride", "padding", "dilation")}

    def forward(self, x):
        from qatcore.kernels import pooling

        q = _int_input(self, x)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        h, w = q.shape[2:]
        if ((kh, kw) == (sh, sw) and self.padding == (0, 0) and self.dilation == (1, 1)
                and h % kh == 0 and w % kw == 0):
            # windows tile the plane: an elementwise max of kh * kw strided views, on the integers
            out = q[:, :, 0::kh, 0::kw]
            for i in range(kh):
                for j in range(kw):
                    if i or j:
                        out = np.maximum(out, q[:, :, i::kh, j::kw])
            return np.ascontiguousarray(out)
        # integers up to 2^24 are exact in float32, so the float kernel's max is the integer max
        out, _ = pooling.max_pool2d_forward(np.ascontiguousarray(q, dtype=np.float32), *self.kernel_size,
                                            *self.stride, *self.padding, *self.dilation)
        return out.astype(q.dtype)


class Int8AvgPool2d(_Int8Module):
    """Average pooling requantized once to the output grid:
    y_q = clamp(z_y + requant(sum over the window of (x_q - z_x); s_x / (count * s_y)), qmin, qmax).
    ``kernel_size=None`` is global average pooling (the window is the whole plane); the
    multiplier for a window size is computed once, the first time that size is seen."""

    STATE = (("input_scale", "<f8"), ("input_zero_point", "<i4"), *_OUTPUT_STATE)

    def __init__(self, kernel_size, stride, input_scale: float, input_zero_point: int, output_scale: float,
                 output_zero_point: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self.kernel_size = None if kernel_size is None else tuple(kernel_size)
        self.stride = None if stride is None else tuple(stride)
        self.register_buffer("input_scale", np.array(input_scale, dtype=np.float64))
        self.register_buffer("input_zero_point", np.array(input_zero_point, dtype=np.int32))
        self._set_output(output_scale, output_zero_point, qmin, qmax)

    CONFIG_KEYS = ("kernel_size", "stride")

    def config(self) -> dict:
        return {"kernel_size": None if self.kernel_size is None else list(self.kernel_size),
                "stride": None if self.stride is None else list(self.stride)}

    def _multiplier(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        from qatcore.kernels.requantize import quantize_multiplier

        cache = self.__dict__.setdefault("_multipliers", {})
        if count not in cache:
            real = float(self.input_scale.data) / (count * float(self.output_scale.data))
            cache[count] = quantize_multiplier(np.array([real]))
        return cache[count]

    def forward(self, x):
        q = _int_input(self, x).astype(np.int64) - int(self.input_zero_point.data)
        if self.kernel_size is None:
            (kh, kw), (sh, sw) = q.shape[2:], q.shape[2:]
        else:
            (kh, kw), (sh, sw) = self.kernel_size, self.stride
        n, c, h, w = q.shape
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        total = np.zeros((n, c, oh, ow), dtype=np.int64)
        for i in range(kh):
            for j in range(kw):
                total += q[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
        multiplier, shift = self._multiplier(kh * kw)
        y = requantize_array(total, multiplier, shift) + int(self.output_zero_point.data)
        qmin, qmax = self.output_range.data.tolist()
        return np.clip(y, qmin, qmax).astype(self.out_dtype)


class Int8Flatten(_Int8Module):
    """Merge axes start_dim..end_dim of the integer array."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    CONFIG_KEYS = ("start_dim", "end_dim")

    def config(self) -> dict:
        return {"start_dim": self.start_dim, "end_dim": self.end_dim}

    def forward(self, x):
        q = _int_input(self, x)
        start, end = self.start_dim % q.ndim, self.end_dim % q.ndim
        return q.reshape(q.shape[:start] + (-1,) + q.shape[end + 1:])


class Int8Cat(_Int8Module):
    """Concatenate integer arrays that already share the output's qparams (the converter
    requantizes inputs whose qparams differ first)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    CONFIG_KEYS = ("dim",)

    def config(self) -> dict:
        return {"dim": self.dim}

    def forward(self, *xs):
        return np.concatenate([_int_input(self, x) for x in xs], axis=self.dim)


INT8_MODULES = {cls.__name__: cls for cls in (Quantize, Dequantize, QuantizedLinear, QuantizedConv2d,
                                               QuantizedAdd, Requantize, Int8MaxPool2d, Int8AvgPool2d,
                                               Int8Flatten, Int8Cat)}


def check_int8_module(name: str) -> type:
    if name not in INT8_MODULES:
        raise ConfigError(f"unknown int8 module type {name!r}; known: {sorted(INT8_MODULES)}")
    return INT8_MODULES[name]
