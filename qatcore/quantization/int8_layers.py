"""The int8 runtime's common parts: the module base class and the conversions at the edges.

Between a :class:`Quantize` at the inputs and a :class:`Dequantize` at the outputs,
every value of a converted model is an integer array (uint8 or int8) with a per-tensor
scale and zero point fixed at conversion, and every operation is integer arithmetic
(docs/numerics.md, "Integer-only inference"; Jacob et al. 2018):

    Quantize:     q   = clamp(z + rne(x * float32(1/s)), qmin, qmax)
    Dequantize:   x   = (q - z) * s
    Requantize:   y_q = clamp(z_y + requant(x_q - z_x; s_x / s_y), clamp_min, qmax)   (a fused ReLU
                  is clamp_min = z_y)

where requant(v; m) multiplies by m in the fixed-point form of ``kernels/requantize.py``.
The runtime module of each operator (``Int8Linear``, ``Int8Add``, ``Int8Lookup``, ...)
is defined beside that operator's rule in :mod:`qatcore.quantization.qat.operators`.

Every runtime module has the form ``forward(array) -> array`` on numpy integer arrays
(Quantize takes floats, Dequantize returns a float Tensor), keeps its integer tables in
buffers declared in ``STATE`` (so ``state_dict`` holds all of it) and its shape settings
in a ``config()`` dict, so a converted model is saved as a graph description plus module
states and rebuilt (:mod:`qatcore.quantization.qat.int8_serialization`).
"""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.errors import ConfigError, DTypeError
from qatcore.nn.module import Module
from qatcore.quantization.config import Requantization
from qatcore.tensor import Tensor

__all__ = ["Int8Module", "Quantize", "Dequantize", "Requantize", "requantize_array", "int_input", "out_dtype",
           "ADD_LEFT_SHIFT", "OUTPUT_STATE"]

ADD_LEFT_SHIFT = 20


def out_dtype(qmin: int, qmax: int) -> np.dtype:
    if qmin >= 0 and qmax <= 255:
        return np.dtype(np.uint8)
    if qmin >= -128 and qmax <= 127:
        return np.dtype(np.int8)
    return np.dtype(np.int16) if qmin >= -(2**15) and qmax < 2**15 else np.dtype(np.int32)


def requantize_array(values: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """rounding_rshift(srdhm(values, M0), n) elementwise, int64 in and out (exact, gemmlowp)."""
    return kernels.requantize.multiply_by_quantized_multiplier(values, multiplier, shift)


OUTPUT_STATE = (("output_scale", "<f4"), ("output_zero_point", "<i4"), ("output_range", "<i4"))


class Int8Module(Module):
    """Base of every int8 runtime module: integer buffers, the settings dict, the output grid.

    ``STATE`` lists each subclass's buffers, in registration order, with their dtypes:
    the int8 file format stores the values in that order (no names) and restores them.
    """

    STATE: tuple[tuple[str, str], ...] = ()
    # kernel plans kept per input shape and dtype (``kernel_plan``); a few suffice
    MAX_KERNEL_PLANS = 4
    # the trailing STATE buffers that int8 files before version 3 lack; ``derive_state`` fills them
    STATE_SINCE_3: tuple[str, ...] = ()
    # a module that requantizes records its arithmetic (``Requantization``) in its config
    REQUANTIZES = False
    requantization = Requantization.FIXED_POINT

    def __init__(self) -> None:
        super().__init__()
        self._kernel_plans: dict = {}

    def kernel_plan(self, x: np.ndarray, make, *key):
        """The kernel plan (``kernels.int8_conv.plan_conv2d``, say) for inputs of x's shape and
        dtype (and ``key``, what else it depends on): ``make(x)``, called once per shape, dtype
        and key and kept, so that a forward repeats no weight packing or argument validation.
        The plan is remade when a buffer has been replaced (``load_state_dict``); the int8
        runtime never writes into its buffers."""
        key = (x.shape, x.dtype, *key)
        state = tuple(getattr(self, name).data for name, _ in self.STATE)
        cached = self._kernel_plans.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], state)) and len(cached[0]) == len(state):
            return cached[1]
        if len(self._kernel_plans) >= self.MAX_KERNEL_PLANS:
            self._kernel_plans.clear()
        plan = make(x)
        self._kernel_plans[key] = (state, plan)
        return plan

    def derive_state(self) -> None:
        """The ``STATE_SINCE_3`` buffers of a file written before version 3: that file is fixed
        point, and these buffers hold float32 requantization data, so each is empty."""
        dtypes = dict(self.STATE)
        for name in self.STATE_SINCE_3:
            self.register_buffer(name, np.zeros(0, np.dtype(dtypes[name])))

    def set_requantization(self, requantization) -> None:
        try:
            self.requantization = Requantization(requantization)
        except ValueError:
            raise ConfigError(f"{type(self).__name__}: requantization must be one of "
                              f"{[r.value for r in Requantization]}, got {requantization!r}") from None

    def _set_output(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        self.register_buffer("output_scale", np.array(scale, dtype=np.float32))
        self.register_buffer("output_zero_point", np.array(zero_point, dtype=np.int32))
        self.register_buffer("output_range", np.array([qmin, qmax], dtype=np.int32))

    @property
    def out_dtype(self) -> np.dtype:
        qmin, qmax = self.output_range.data.tolist()
        return out_dtype(qmin, qmax)

    # the attributes config() writes and from_config() restores (beyond the STATE buffers)
    CONFIG_KEYS: tuple[str, ...] = ()

    def config(self) -> dict:
        return {}

    def record_config(self) -> dict:
        """``config()`` and, for a module that requantizes, its ``requantization``: what the
        int8 file stores."""
        config = self.config()
        if self.REQUANTIZES:
            config["requantization"] = self.requantization.value
        return config

    @classmethod
    def from_config(cls, config: dict) -> Int8Module:
        """The module of ``record_config()`` (buffers still to be registered). A file written
        before version 3 has no ``requantization``: fixed point, the only arithmetic then."""
        config = dict(config)
        requantization = config.pop("requantization", Requantization.FIXED_POINT.value) if cls.REQUANTIZES else None
        if set(config) != set(cls.CONFIG_KEYS):
            raise ConfigError(f"{cls.__name__} config needs exactly the keys {sorted(cls.CONFIG_KEYS)}, "
                              f"got {sorted(config)}")
        module = cls.__new__(cls)
        Int8Module.__init__(module)
        for key, value in config.items():
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
        if requantization is not None:
            module.set_requantization(requantization)
        return module


def int_input(module: Module, x) -> np.ndarray:
    array = x.data if isinstance(x, Tensor) else np.asarray(x)
    if array.dtype.kind not in "iu":
        raise DTypeError(f"{type(module).__name__}: expected a quantized integer array, got dtype {array.dtype}")
    return array


class Quantize(Int8Module):
    """x (float) -> clamp(z + rne(x * float32(1/s)), qmin, qmax) as integers; with
    ``requantization`` float32, ONNX QuantizeLinear's clamp(z + rne(float32(x / s)))."""

    STATE = OUTPUT_STATE
    REQUANTIZES = True

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int,
                 requantization: Requantization = Requantization.FIXED_POINT) -> None:
        super().__init__()
        self._set_output(scale, zero_point, qmin, qmax)
        self.set_requantization(requantization)

    def forward(self, x):
        array = x.data if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
        array = array.astype(np.float32, copy=False)
        if self.requantization is Requantization.FLOAT32:
            q = np.rint(array / self.output_scale.data) + np.float32(self.output_zero_point.data)
        else:
            inv = np.float32(1) / self.output_scale.data
            q = np.rint(array * inv) + np.float32(self.output_zero_point.data)
        qmin, qmax = self.output_range.data.tolist()
        return np.clip(q, qmin, qmax).astype(self.out_dtype)


class Dequantize(Int8Module):
    """x_q -> (x_q - z) * s as a float32 Tensor."""

    STATE = OUTPUT_STATE

    def __init__(self, scale: float, zero_point: int) -> None:
        super().__init__()
        self._set_output(scale, zero_point, -(2**31), 2**31 - 1)

    def forward(self, x):
        q = int_input(self, x)
        values = (q.astype(np.int32) - self.output_zero_point.data).astype(np.float32) * self.output_scale.data
        return Tensor._from_array(values, requires_grad=False)


class Requantize(Int8Module):
    """y_q = clamp(z_y + requant(x_q - z_x; s_x / s_y), lo, hi); lo = z_y fuses a ReLU. With
    ``requantization`` float32: DequantizeLinear then QuantizeLinear, as ONNX Runtime runs the
    pair, clamp(z_y + rne(float32(float32(float32(x_q - z_x) * s_x) / s_y)), lo, hi), from the
    float32 ``input_scale`` (empty in fixed point)."""

    STATE = (("multiplier", "<i4"), ("shift", "<i4"), ("input_zero_point", "<i4"), *OUTPUT_STATE,
             ("clamp_min", "<i4"), ("input_scale", "<f4"))
    STATE_SINCE_3 = ("input_scale",)
    REQUANTIZES = True

    def __init__(self, input_scale: float, input_zero_point: int, output_scale: float, output_zero_point: int,
                 clamp_min: int, qmin: int, qmax: int,
                 requantization: Requantization = Requantization.FIXED_POINT) -> None:
        super().__init__()
        self.set_requantization(requantization)
        real = np.array([input_scale / output_scale], dtype=np.float64) * 2.0**-ADD_LEFT_SHIFT
        multiplier, shift = kernels.requantize.quantize_multiplier(real)
        self.register_buffer("multiplier", multiplier.astype(np.int32))
        self.register_buffer("shift", shift.astype(np.int32))
        self.register_buffer("input_zero_point", np.array(input_zero_point, dtype=np.int32))
        self._set_output(output_scale, output_zero_point, qmin, qmax)
        self.register_buffer("clamp_min", np.array(clamp_min, dtype=np.int32))
        self.register_buffer("input_scale", np.array([input_scale] if self.requantization is Requantization.FLOAT32
                                                     else [], dtype=np.float32))

    def forward(self, x):
        q = int_input(self, x)
        if q.dtype in (np.uint8, np.int8):  # every input value: a 256-entry table, gathered
            return kernels.lookup.lookup(q, self.kernel_plan(q, self._table), int(np.iinfo(q.dtype).min))
        return self.reference_forward(q)

    def _table(self, q: np.ndarray) -> np.ndarray:
        """``reference_forward`` of every value of q's dtype, in order: elementwise, so exact."""
        info = np.iinfo(q.dtype)
        return self.reference_forward(np.arange(info.min, info.max + 1).astype(q.dtype))

    def reference_forward(self, x):
        """The class docstring's formula in NumPy on any integer input: ``forward`` gathers its
        results for 8-bit inputs from a table of it (``kernels.lookup``)."""
        lo, hi = int(self.clamp_min.data), int(self.output_range.data[1])
        if self.requantization is Requantization.FLOAT32:
            real = (int_input(self, x).astype(np.int32) - self.input_zero_point.data).astype(np.float32)
            real = (real * self.input_scale.data[0]).astype(np.float32)
            y = np.rint(real / self.output_scale.data) + np.float32(self.output_zero_point.data)
            return np.clip(y, lo, hi).astype(self.out_dtype)
        q = int_input(self, x).astype(np.int64)
        shifted = (q - int(self.input_zero_point.data)) << ADD_LEFT_SHIFT
        y = requantize_array(shifted, self.multiplier.data, self.shift.data) + int(self.output_zero_point.data)
        return np.clip(y, lo, hi).astype(self.out_dtype)


