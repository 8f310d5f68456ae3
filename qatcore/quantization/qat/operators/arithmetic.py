"""Arithmetic: add, sub, mul, div, matmul, neg, exp, log, sqrt, pow, clamp, sum, mean, max.

QAT: an add, subtraction or multiplication gets a quantizer after it (after the
activation that follows it, when one does); a mean too. The others stay float.

Conversion: a residual add of two integer values, followed by its quantizer (and maybe
a ReLU), is ``Int8Add`` (TFLite's int8 add):

    y_q = clamp(z_y + requant(a + b; 2 m / (2^20 s_y)), clamp_min, qmax),
    a = requant((x1 - z1) << 20; s1 / 2m),  b = requant((x2 - z2) << 20; s2 / 2m),  m = max(s1, s2)

both inputs brought to a common scale keeping 20 fractional bits, summed, and rounded
once. Every other op here is a float island between Dequantize and Quantize.

ONNX: the operator of the same name (Add, Sub, Mul, Div, MatMul, Neg, Exp, Log, Sqrt,
Pow, Clip, ReduceSum, ReduceMean, ReduceMax, and Where for ``F.where``, which stays float);
an ``Int8Add`` is DequantizeLinear on both inputs, Add, QuantizeLinear. Import: Add, Sub,
Mul, Div, Where, Pow, Sqrt, ReduceMean.
"""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.graph.node import Node
from qatcore.nn import functional as F
from qatcore.nn.container import Sequential
from qatcore.nn.conv import Conv2d
from qatcore.nn.linear import Linear
from qatcore.quantization.config import Requantization
from qatcore.quantization.int8_layers import ADD_LEFT_SHIFT, OUTPUT_STATE, Int8Module, int_input, requantize_array
from qatcore.quantization.qat.operators.quantizer import int8_record
from qatcore.quantization.qat.operators.registry import (
    OperatorRule,
    QATRole,
    call_arguments,
    register,
    register_onnx_import,
)
from qatcore.quantization.qat.operators.weighted import bias_after_matmul
from qatcore.quantization.requantization import add_float32, add_float32_constants

__all__ = ["Int8Add"]


class Int8Add(Int8Module):
    """The int8 residual add (module docstring). With ``requantization`` float32 it computes
    ONNX Runtime's QLinearAdd instead (``requantization.add_float32``, rounded half to even)
    from the float32 ``input_scales`` (empty in fixed point). Inputs of the same shape run
    the elementwise kernels of ``kernels.int8_add``; others broadcast in NumPy."""

    STATE = (("multiplier", "<i4"), ("shift", "<i4"), ("input_zero_points", "<i4"), *OUTPUT_STATE,
             ("clamp_min", "<i4"), ("input_scales", "<f4"))
    STATE_SINCE_3 = ("input_scales",)
    REQUANTIZES = True

    def __init__(self, scales: tuple[float, float], zero_points: tuple[int, int], output_scale: float,
                 output_zero_point: int, clamp_min: int, qmin: int, qmax: int,
                 requantization: Requantization = Requantization.FIXED_POINT) -> None:
        super().__init__()
        twice_max = 2.0 * max(scales)
        real = np.array([scales[0] / twice_max, scales[1] / twice_max,
                         twice_max / (2.0**ADD_LEFT_SHIFT * output_scale)], dtype=np.float64)
        multiplier, shift = kernels.requantize.quantize_multiplier(real)
        self.register_buffer("multiplier", multiplier.astype(np.int32))
        self.register_buffer("shift", shift.astype(np.int32))
        self.register_buffer("input_zero_points", np.array(zero_points, dtype=np.int32))
        self._set_output(output_scale, output_zero_point, qmin, qmax)
        self.register_buffer("clamp_min", np.array(clamp_min, dtype=np.int32))
        self.set_requantization(requantization)
        self.register_buffer("input_scales", np.array(scales if self.requantization is Requantization.FLOAT32
                                                      else [], dtype=np.float32))

    def forward(self, a, b):
        a, b = int_input(self, a), int_input(self, b)
        if a.shape != b.shape:
            return self.reference_forward(a, b)
        kernel, arguments = self.kernel_plan(a, lambda _: self._plan(a.dtype, b.dtype), b.dtype)
        if kernel is None:  # the fixed-point add, tabulated for this pair of input dtypes
            return kernels.int8_add.add_by_table(a, b, arguments)
        return kernel(a, arguments[0], b, *arguments[1:])

    def _plan(self, a_dtype, b_dtype):
        """(kernel, its arguments but a and b), or (None, the table of the fixed-point add):
        computed once per input shape and dtypes (``Int8Module.kernel_plan``)."""
        lo, hi = int(self.clamp_min.data), int(self.output_range.data[1])
        z_a, z_b = self.input_zero_points.data.tolist()
        if self.requantization is Requantization.FLOAT32:
            r_a, r_b, constant = add_float32_constants(self.input_scales.data, (z_a, z_b), self.output_scale.data,
                                                       int(self.output_zero_point.data))
            return kernels.int8_add.add_float32, (z_a, z_b, r_a, r_b, constant, lo, hi, self.out_dtype)
        if {np.dtype(a_dtype), np.dtype(b_dtype)} <= {np.dtype(np.uint8), np.dtype(np.int8)}:
            table = kernels.int8_add.pair_table(
                kernels.int8_add.add_fixed_point, a_dtype, b_dtype, z_a, z_b, self.multiplier.data.astype(np.int64),
                self.shift.data.astype(np.int64), int(self.output_zero_point.data), lo, hi, self.out_dtype)
            return None, table
        return kernels.int8_add.add_fixed_point, (z_a, z_b, self.multiplier.data.astype(np.int64),
                                                  self.shift.data.astype(np.int64), int(self.output_zero_point.data),
                                                  lo, hi, self.out_dtype)

    def reference_forward(self, a, b):
        """The module docstring's formula in NumPy, with broadcasting: the path for inputs of
        different shapes, and the oracle of ``kernels.int8_add`` (which ``forward`` runs for
        inputs of the same shape, bit for bit the same)."""
        lo, hi = int(self.clamp_min.data), int(self.output_range.data[1])
        if self.requantization is Requantization.FLOAT32:
            v = add_float32(int_input(self, a), int_input(self, b), self.input_scales.data,
                            self.input_zero_points.data.tolist(), self.output_scale.data,
                            int(self.output_zero_point.data))
            return np.clip(np.rint(v), lo, hi).astype(self.out_dtype)
        total = np.int64(0)
        for i, x in enumerate((a, b)):
            shifted = (int_input(self, x).astype(np.int64) - int(self.input_zero_points.data[i])) << ADD_LEFT_SHIFT
            total = total + requantize_array(shifted, self.multiplier.data[i:i + 1], self.shift.data[i:i + 1])
        y = requantize_array(total, self.multiplier.data[2:3], self.shift.data[2:3]) + int(self.output_zero_point.data)
        return np.clip(y, lo, hi).astype(self.out_dtype)


def _lower_add(ctx, node, module):
    args = [a for a in node.args if isinstance(a, Node)]
    if len(args) != 2 or node.kwargs:
        return None
    quantizer, chain, relu = ctx.following_quantizer(node)
    inputs = [ctx.env[a] for a in args]
    if quantizer is None or any(v is None for _, v in inputs):
        return None
    out = ctx.value_of(quantizer, chain[-1].name)
    (a, va), (b, vb) = inputs
    module = Int8Add((va.scale, vb.scale), (va.zero_point, vb.zero_point), out.scale, out.zero_point,
                     out.zero_point if relu else out.qmin, out.qmin, out.qmax, ctx.requantization)
    ctx.absorb(chain, node)
    return ctx.add(chain[-1].name, module, (a, b), out)


# ---- ONNX export ----------------------------------------------------------------------------------
def _export_binary(op_type: str):
    def export(ex, node, module):
        a = call_arguments(node)
        return ex.b.node(op_type, [ex.value(a["a"], node.name), ex.value(a["b"], node.name)], node.name), None
    return export


def _export_unary(op_type: str):
    def export(ex, node, module):
        a = call_arguments(node)
        return ex.b.node(op_type, [ex.value(a["x"] if "x" in a else a["a"], node.name)], node.name), None
    return export


def _export_pow(ex, node, module):
    a = call_arguments(node)
    exponent = ex.b.constant(f"{node.name}.exponent", np.float32(a["exponent"]))
    return ex.b.node("Pow", [ex.value(a["a"], node.name), exponent], node.name), None


def _export_clamp(ex, node, module):
    a = call_arguments(node)
    return ex.clip(node.name, ex.value(a["x"], node.name), a["min"], a["max"]), None


def _export_reduce(op_type: str):
    def export(ex, node, module):
        a = call_arguments(node)
        x = a["x"]
        rank = len(ex.shape(x))
        dim = a["dim"]
        axes = list(range(rank)) if dim is None else [int(d) % rank for d in (dim if isinstance(dim, (tuple, list))
                                                                             else (dim,))]
        axes_name = ex.b.constant(f"{node.name}.axes", np.array(axes, np.int64))
        return ex.b.node(op_type, [ex.value(x, node.name), axes_name], node.name,
                         keepdims=int(bool(a["keepdim"]))), None
    return export


def _export_int8_add(ex, node, module: Int8Add):
    name, b = node.target, ex.b
    grid = ex.out_grid(module)
    relu = int(module.clamp_min.data) == grid.zero_point and grid.zero_point > grid.lo
    y = b.node("Add", [ex.dequantize(node.args[0], f"{name}.a"), ex.dequantize(node.args[1], f"{name}.b")],
               f"{name}/Add")
    return ex.quantize(y, grid, name, relu), grid


# ---- ONNX import ----------------------------------------------------------------------------------
def _import_binary(fn):
    def handler(imp, node):
        if fn is F.add:
            folded = bias_after_matmul(imp, node)
            if folded is not None:
                return folded
        return imp.call(node, fn, (imp.operand(node, 0), imp.operand(node, 1)))
    return handler


# ---- examples -------------------------------------------------------------------------------------
class _Residual(Sequential):
    """Two convs on the same input, combined by ``combine``, then a linear layer."""

    def __init__(self, combine, features: int = 48) -> None:
        rng = np.random.default_rng(0)
        super().__init__(Conv2d(2, 3, 3, padding=1, rng=rng), Conv2d(2, 3, 1, rng=rng), Linear(features, 4, rng=rng))
        self.combine = combine

    def forward(self, x):
        return self[2](F.flatten(self.combine(self[0](x), self[1](x)), 1))


class _Unary(Sequential):
    """A conv, then ``fn``, then a linear layer."""

    def __init__(self, fn, features: int = 48) -> None:
        rng = np.random.default_rng(0)
        super().__init__(Conv2d(2, 3, 3, padding=1, rng=rng), Linear(features, 4, rng=rng))
        self.fn = fn

    def forward(self, x):
        return self[1](F.flatten(self.fn(self[0](x)), 1))


def _example(combine, features: int = 48):
    return lambda: (_Residual(combine, features), (2, 2, 4, 4))


def _unary_example(fn, features: int = 48):
    return lambda: (_Unary(fn, features), (2, 2, 4, 4))


register(
    OperatorRule(F.add, qat=QATRole.NEW_GRID, quantize_after_activation=True, lower=_lower_add,
                 export=_export_binary("Add"), example=_example(lambda a, b: F.relu(F.add(a, b)))),
    OperatorRule(F.sub, qat=QATRole.NEW_GRID, quantize_after_activation=True, export=_export_binary("Sub"),
                 example=_example(F.sub)),
    OperatorRule(F.mul, qat=QATRole.NEW_GRID, quantize_after_activation=True, export=_export_binary("Mul"),
                 example=_example(F.mul)),
    OperatorRule(F.mean, qat=QATRole.NEW_GRID, export=_export_reduce("ReduceMean"),
                 example=_unary_example(lambda a: F.mean(a, (2, 3)), 3)),
    OperatorRule(F.div, export=_export_binary("Div"), example=_example(lambda a, b: F.div(a, F.exp(b)))),
    OperatorRule(F.matmul, export=_export_binary("MatMul"),
                 example=_example(lambda a, b: F.matmul(a, F.transpose(b, 2, 3)))),
    OperatorRule(F.neg, export=_export_unary("Neg"), example=_unary_example(F.neg)),
    OperatorRule(F.exp, export=_export_unary("Exp"), example=_unary_example(F.exp)),
    OperatorRule(F.log, export=_export_unary("Log"), example=_unary_example(lambda a: F.log(F.exp(a)))),
    OperatorRule(F.sqrt, export=_export_unary("Sqrt"), example=_unary_example(lambda a: F.sqrt(F.exp(a)))),
    OperatorRule(F.pow, export=_export_pow, example=_unary_example(lambda a: F.pow(a, 2.0))),
    OperatorRule(F.clamp, export=_export_clamp, example=_unary_example(lambda a: F.clamp(a, -0.5, 0.5))),
    OperatorRule(F.sum, export=_export_reduce("ReduceSum"), example=_unary_example(lambda a: F.sum(a, 1, True), 16)),
    OperatorRule(F.max, export=_export_reduce("ReduceMax"), example=_unary_example(lambda a: F.max(a, 1, True), 16)),
    OperatorRule(Int8Add, export=_export_int8_add, record=int8_record(Int8Add)),
)
# ---- F.where (issue 20, for imported ONNX graphs): stays float ------------------------------------
def _export_where(ex, node, module):
    a = call_arguments(node)
    condition = np.asarray(a["condition"].data if hasattr(a["condition"], "data") else a["condition"])
    return ex.b.node("Where", [ex.b.constant(f"{node.name}.condition", condition),
                               ex.value(a["x"], node.name), ex.value(a["y"], node.name)], node.name), None


_WHERE_MASK = np.tile(np.array([True, False]), 8).reshape(1, 4, 4)
register(OperatorRule(F.where, export=_export_where, example=_example(lambda a, b: F.where(_WHERE_MASK, a, b))))
# ---- ONNX import (issue 20): Where, Pow, Sqrt, ReduceMean ------------------------------------------
def _import_where(imp, node):
    """F.where with a constant condition (a computed one has no qatcore source here)."""
    imp.attributes(node, set())
    condition = imp.constant(node, 0)
    if condition.dtype != np.bool_:
        raise imp.fail(node, f"the condition must be boolean, got {condition.dtype}")
    return imp.call(node, F.where, (condition, imp.operand(node, 1), imp.operand(node, 2)))


def _import_pow(imp, node):
    """F.pow of a computed base by a constant one-element exponent."""
    imp.attributes(node, set())
    exponent = imp.constant(node, 1)
    if exponent.size != 1 or exponent.dtype.kind not in "iuf":
        raise imp.fail(node, f"the exponent must be one constant number, got {exponent.dtype} {exponent.shape}")
    return imp.call(node, F.pow, (imp.runtime(node, 0), float(exponent.reshape(()))))


def _import_sqrt(imp, node):
    imp.attributes(node, set())
    return imp.call(node, F.sqrt, (imp.runtime(node, 0),))


def _import_reduce_mean(imp, node):
    """F.mean over ``axes`` (the attribute before opset 18, input 1 after); no axes: all of
    them, or none with noop_with_empty_axes=1 (the input itself)."""
    attrs = imp.attributes(node, {"axes", "keepdims", "noop_with_empty_axes"})
    x = imp.runtime(node, 0)
    axes = list(attrs["axes"]) if "axes" in attrs else imp.integers(node, 1, optional=True)
    if not axes:
        if int(attrs.get("noop_with_empty_axes", 0)):
            return x
        axes = None
    return imp.call(node, F.mean, (x, None if axes is None else tuple(axes), bool(attrs.get("keepdims", 1))))


register_onnx_import("Where", _import_where)
register_onnx_import("Pow", _import_pow)
register_onnx_import("Sqrt", _import_sqrt)
register_onnx_import("ReduceMean", _import_reduce_mean)
for _op_type, _fn in (("Add", F.add), ("Sub", F.sub), ("Mul", F.mul), ("Div", F.div)):
    register_onnx_import(_op_type, _import_binary(_fn))
