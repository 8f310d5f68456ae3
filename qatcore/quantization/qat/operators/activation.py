"""Elementwise activations: ReLU, ReLU6, LeakyReLU, Sigmoid, Tanh, Hardswish, Hardsigmoid
(and Softmax, LogSoftmax).

QAT: an activation gets a quantizer after it; an add, multiplication or concatenation
right before it is quantized after the activation instead.

Conversion. A ReLU (module or ``F.relu``) followed by its quantizer is a ``Requantize``
whose clamp starts at the zero point; so is a ReLU6 whose output grid ends at or below 6.
Every other unary activation between two quantizers becomes an integer lookup table
(``Int8Lookup``): for each input integer q of the input grid (s_x, z_x),

    T[q - qmin_x] = Quantize_y( act( float32(q - z_x) * s_x ) )

which is exactly what the QAT model computes on that value: the input quantizer's
output is float32(q - z_x) * s_x, the activation runs in float32 on it, and the output
quantizer rounds as ``Quantize`` does. So ``y_q = T[x_q]`` equals the QAT model bit for
bit, with no arithmetic at run time. An 8-bit input has at most 256 entries.

Softmax and LogSoftmax stay float (their output is not quantized).

ONNX: Relu, Clip(0, 6), LeakyRelu, Sigmoid, Tanh, HardSwish, HardSigmoid(1/6, 1/2),
Softmax, LogSoftmax; an ``Int8Lookup``
is ``Gather(table, Cast(x_q))`` on the integers.
"""

from __future__ import annotations

import numpy as np

from qatcore import kernels
from qatcore.autograd import no_grad
from qatcore.errors import ShapeError
from qatcore.nn import functional as F
from qatcore.nn.activation import Hardsigmoid, Hardswish, LeakyReLU, LogSoftmax, ReLU, ReLU6, Sigmoid, Softmax, Tanh
from qatcore.nn.container import Sequential
from qatcore.nn.linear import Linear
from qatcore.quantization.int8_layers import OUTPUT_STATE, Int8Module, Quantize, Requantize, int_input
from qatcore.quantization.qat.operators.quantizer import int8_record, module_record
from qatcore.quantization.qat.operators.registry import OperatorRule, QATRole, register, register_onnx_import
from qatcore.tensor import Tensor

__all__ = ["Int8Lookup", "lookup_table"]


class Int8Lookup(Int8Module):
    """y_q = table[x_q - input_qmin]: a unary activation as a table of its QAT results
    (module docstring)."""

    STATE = (("table", "<i4"), ("input_qmin", "<i4"), *OUTPUT_STATE)

    def __init__(self, table: np.ndarray, input_qmin: int, output_scale: float, output_zero_point: int,
                 qmin: int, qmax: int) -> None:
        super().__init__()
        self.register_buffer("table", np.asarray(table, dtype=np.int32))
        self.register_buffer("input_qmin", np.array(input_qmin, dtype=np.int32))
        self._set_output(output_scale, output_zero_point, qmin, qmax)

    def forward(self, x):
        q = int_input(self, x)
        offset = int(self.input_qmin.data)
        size = self.table.data.shape[0]
        covered = np.iinfo(q.dtype)
        if covered.min < offset or covered.max >= offset + size:  # the dtype alone does not bound q
            if q.size and (int(q.min()) < offset or int(q.max()) >= offset + size):
                raise ShapeError(f"Int8Lookup: input integers must lie in [{offset}, {offset + size - 1}] "
                                 f"(the input grid of the conversion)")
        return kernels.lookup.lookup(q, self.table.data.astype(self.out_dtype), offset)


def lookup_table(activation, value, out) -> np.ndarray:
    """T[q - value.qmin] = Quantize_out(activation(float32(q - z) * s)) for every integer q of
    the input grid ``value`` (an Int8Value), ``activation`` a function of a float32 Tensor."""
    levels = np.arange(value.qmin, value.qmax + 1, dtype=np.int64)
    reals = (levels - value.zero_point).astype(np.float32) * np.float32(value.scale)
    with no_grad():
        y = activation(Tensor._from_array(reals, requires_grad=False))
    return Quantize(out.scale, out.zero_point, out.qmin, out.qmax)(y).astype(np.int32)


def _activation_of(node, module):
    """The node's computation as a function of its (only) computed input."""
    if module is not None:
        return module
    rest, kwargs = node.args[1:], dict(node.kwargs)
    return lambda x: node.target(x, *rest, **kwargs)


def _lookup(node, module, value, out) -> Int8Lookup:
    table = lookup_table(_activation_of(node, module), value, out)
    return Int8Lookup(table, value.qmin, out.scale, out.zero_point, out.qmin, out.qmax)


def _relu_clamp(value, out, requantization) -> Requantize:
    """The requantization to the output grid with the clamp starting at its zero point."""
    return Requantize(value.scale, value.zero_point, out.scale, out.zero_point, out.zero_point, out.qmin, out.qmax,
                      requantization)


def _lower_lookup(ctx, node, module):
    """Between two quantizers: an Int8Lookup (module docstring). Otherwise float."""
    between = ctx.between_quantizers(node)
    if between is None:
        return None
    new, value, out, name = between
    return ctx.add(name, _lookup(node, module, value, out), (new,), out)


def _lower_relu(ctx, node, module):
    """ReLU then its quantizer: a Requantize whose clamp starts at the zero point."""
    between = ctx.between_quantizers(node)
    if between is None:
        return None
    new, value, out, name = between
    return ctx.add(name, _relu_clamp(value, out, ctx.requantization), (new,), out)


def _quantized_six(scale: float) -> int:
    """rne(6 * float32(1 / s)): the grid step of 6.0 above the zero point."""
    return int(np.rint(np.float32(6.0) * (np.float32(1) / np.float32(scale))))


def _lower_relu6(ctx, node, module):
    """When the output grid ends at or below 6 (an observer after a ReLU6 never sees more),
    min(relu(x), 6) followed by the quantizer is the clamp to [z, qmax]: a ReLU's Requantize.
    Otherwise a lookup table."""
    between = ctx.between_quantizers(node)
    if between is None:
        return None
    new, value, out, name = between
    if out.qmax - out.zero_point <= _quantized_six(out.scale):
        return ctx.add(name, _relu_clamp(value, out, ctx.requantization), (new,), out)
    return ctx.add(name, _lookup(node, module, value, out), (new,), out)


# ---- ONNX export ----------------------------------------------------------------------------------
def _export_unary(op_type: str, **fixed):
    """Export as one ONNX node ``op_type`` with the attributes ``fixed``."""
    def export(ex, node, module):
        return ex.b.node(op_type, [ex.unary_input(node)], ex.node_name(node), **fixed), None
    return export


def _export_clip06(ex, node, module):
    return ex.clip(ex.node_name(node), ex.unary_input(node), 0.0, 6.0), None


def _export_leaky(ex, node, module):
    slope = module.negative_slope if module is not None else ex.arguments(node)["negative_slope"]
    return ex.b.node("LeakyRelu", [ex.unary_input(node)], ex.node_name(node), alpha=float(slope)), None


def _export_hardsigmoid(ex, node, module):
    return ex.b.node("HardSigmoid", [ex.unary_input(node)], ex.node_name(node), alpha=1 / 6, beta=0.5), None


def _export_softmax(op_type: str):
    def export(ex, node, module):
        dim = module.dim if module is not None else ex.arguments(node)["dim"]
        return ex.b.node(op_type, [ex.unary_input(node)], ex.node_name(node), axis=int(dim)), None
    return export


def _export_lookup(ex, node, module: Int8Lookup):
    b = ex.b
    name, arg = node.target, node.args[0]
    grid = ex.out_grid(module)
    if ex.grids.get(arg) is None:
        raise ex.fail(node, "an Int8Lookup whose input is not an integer value")
    index = b.node("Cast", [ex.names[arg]], f"{name}/Cast", to=6)  # TensorProto.INT32
    offset = int(module.input_qmin.data)
    if offset:
        index = b.node("Sub", [index, b.constant(f"{name}.input_qmin", np.array(offset, np.int32))], f"{name}/Sub")
    table = b.constant(f"{name}.table", module.table.data.astype(grid.dtype))
    return b.node("Gather", [table, index], name, axis=0), grid


# ---- ONNX import ----------------------------------------------------------------------------------
def _import_module(cls, **attribute_names):
    """An ONNX unary op as a module ``cls(**{argument: attribute value})``."""
    def handler(imp, node):
        attrs = imp.attributes(node, set(attribute_names.values()))
        kwargs = {arg: attrs[attr] for arg, attr in attribute_names.items() if attr in attrs}
        return imp.add_layer(node, cls(**kwargs), (imp.runtime(node, 0),))
    return handler


def _import_clip(imp, node):
    attrs = imp.attributes(node, {"min", "max"})
    low, high = attrs.get("min"), attrs.get("max")
    for index, key in ((1, "low"), (2, "high")):
        value = imp.constant(node, index, optional=True) if len(node.input) > index else None
        if value is not None:
            if value.size != 1:
                raise imp.fail(node, f"{key} bound must be a scalar")
            if key == "low":
                low = float(value.reshape(()))
            else:
                high = float(value.reshape(()))
    x = imp.runtime(node, 0)
    if low == 0 and high is None:
        return imp.add_layer(node, ReLU(), (x,))
    if low == 0 and high == 6:
        return imp.add_layer(node, ReLU6(), (x,))
    return imp.call(node, F.clamp, (x,), {"min": low, "max": high})


def _import_hardsigmoid(imp, node):
    attrs = imp.attributes(node, {"alpha", "beta"})
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    if not (np.isclose(alpha, 1 / 6, rtol=1e-6) and beta == 0.5):
        raise imp.fail(node, f"alpha={alpha}, beta={beta}: only PyTorch's hardsigmoid (alpha 1/6, beta 0.5) imports")
    return imp.add_layer(node, Hardsigmoid(), (imp.runtime(node, 0),))


def _import_softmax(imp, node):
    """F.softmax along ``axis`` (opset 13 on). Before opset 13 Softmax normalizes the input
    flattened from ``axis`` on (default 1): flatten, softmax, reshape back."""
    attrs = imp.attributes(node, {"axis"})
    x = imp.runtime(node, 0)
    if imp.opset >= 13:
        return imp.call(node, F.softmax, (x, int(attrs.get("axis", -1))))
    shape = imp.static_shape(node.input[0])
    axis = int(attrs.get("axis", 1))
    if shape is None or not -len(shape) <= axis < len(shape):
        raise imp.fail(node, f"opset {imp.opset} softmax from axis {axis} on needs the input's rank")
    axis %= len(shape)
    if axis == len(shape) - 1:
        return imp.call(node, F.softmax, (x, -1))
    if None in shape[1:]:
        raise imp.fail(node, f"opset {imp.opset} softmax over axes {axis}.. needs the input's shape past the batch, "
                             f"got {shape}")
    flat = imp.call(node, F.softmax, (imp.call(node, F.flatten, (x, axis), suffix="flatten"), -1), suffix="flat")
    return imp.call(node, F.reshape, (flat, (-1, *shape[1:])))


# ---- examples -------------------------------------------------------------------------------------
def example_between_linears(activation):
    """Linear -> activation -> Linear on (3, 12) inputs: the activation sits between two quantizers."""
    def example():
        rng = np.random.default_rng(0)
        return Sequential(Linear(12, 8, rng=rng), activation(), Linear(8, 4, rng=rng)), (3, 12)
    return example


class _Functional(Sequential):
    """Linear -> fn(x, *args) -> Linear."""

    def __init__(self, fn, *args) -> None:
        rng = np.random.default_rng(0)
        super().__init__(Linear(12, 8, rng=rng), Linear(8, 4, rng=rng))
        self.fn, self.fn_args = fn, args

    def forward(self, x):
        return self[1](self.fn(self[0](x), *self.fn_args))


def example_functional(fn, *args):
    return lambda: (_Functional(fn, *args), (3, 12))


register(
    OperatorRule(ReLU, qat=QATRole.ACTIVATION, lower=_lower_relu, export=_export_unary("Relu"),
                 record=module_record(ReLU),
                 example=example_between_linears(ReLU)),
    OperatorRule(F.relu, qat=QATRole.ACTIVATION, lower=_lower_relu, export=_export_unary("Relu"),
                 example=example_functional(F.relu)),
    OperatorRule(ReLU6, qat=QATRole.ACTIVATION, lower=_lower_relu6, export=_export_clip06,
                 record=module_record(ReLU6),
                 example=example_between_linears(ReLU6)),
    OperatorRule(F.relu6, qat=QATRole.ACTIVATION, lower=_lower_relu6, export=_export_clip06,
                 example=example_functional(F.relu6)),
    OperatorRule(LeakyReLU, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_leaky,
                 record=module_record(LeakyReLU, "negative_slope"),
                 example=example_between_linears(LeakyReLU)),
    OperatorRule(F.leaky_relu, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_leaky,
                 example=example_functional(F.leaky_relu, 0.1)),
    OperatorRule(Sigmoid, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_unary("Sigmoid"),
                 record=module_record(Sigmoid),
                 example=example_between_linears(Sigmoid)),
    OperatorRule(F.sigmoid, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_unary("Sigmoid"),
                 example=example_functional(F.sigmoid)),
    OperatorRule(Tanh, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_unary("Tanh"),
                 record=module_record(Tanh),
                 example=example_between_linears(Tanh)),
    OperatorRule(F.tanh, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_unary("Tanh"),
                 example=example_functional(F.tanh)),
    OperatorRule(Hardswish, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_unary("HardSwish"),
                 record=module_record(Hardswish), example=example_between_linears(Hardswish)),
    OperatorRule(F.hardswish, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_unary("HardSwish"),
                 example=example_functional(F.hardswish)),
    OperatorRule(Hardsigmoid, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_hardsigmoid,
                 record=module_record(Hardsigmoid), example=example_between_linears(Hardsigmoid)),
    OperatorRule(F.hardsigmoid, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_hardsigmoid,
                 example=example_functional(F.hardsigmoid)),
    OperatorRule(Softmax, export=_export_softmax("Softmax"), record=module_record(Softmax, "dim"),
                 example=example_between_linears(Softmax)),
    OperatorRule(F.softmax, export=_export_softmax("Softmax"), example=example_functional(F.softmax, -1)),
    OperatorRule(LogSoftmax, export=_export_softmax("LogSoftmax"), record=module_record(LogSoftmax, "dim"),
                 example=example_between_linears(LogSoftmax)),
    OperatorRule(F.log_softmax, export=_export_softmax("LogSoftmax"), example=example_functional(F.log_softmax, -1)),
    OperatorRule(Int8Lookup, export=_export_lookup, record=int8_record(Int8Lookup)),
)
register_onnx_import("Relu", _import_module(ReLU))
register_onnx_import("Clip", _import_clip)
register_onnx_import("LeakyRelu", _import_module(LeakyReLU, negative_slope="alpha"))
register_onnx_import("Sigmoid", _import_module(Sigmoid))
register_onnx_import("Tanh", _import_module(Tanh))
register_onnx_import("HardSwish", _import_module(Hardswish))
register_onnx_import("HardSigmoid", _import_hardsigmoid)
register_onnx_import("Softmax", _import_softmax)
