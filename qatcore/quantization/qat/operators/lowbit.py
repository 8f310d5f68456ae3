"""The low-bit runtime: Linear and Embedding layers with packed 2- and 4-bit weights
(per group, or ternary), the converted form of a QAT layer whose weight quantizer is a
:class:`~qatcore.quantization.block_fake_quantize.BlockFakeQuantize`.

Conversion: a ``QATLinear`` with per-group or absmean weights becomes a :class:`LowBitLinear`
(packed integers, group scales, the float bias; its input quantized per token at run time
when the QAT layer quantized its input per token, else float activations), a ``QATEmbedding``
a :class:`LowBitEmbedding` (packed table, rows dequantized on lookup). Both take and return
float values, so the rest of the model (LayerNorm, GELU, attention, the residual adds) runs in
float around them, as in the QAT model. Both compute exactly what the QAT layer's eval computes
(:mod:`qatcore.quantization.lowbit`): the converted model equals the QAT model's eval bit for bit.

A model whose low-bit layers are mixed with observed (per-tensor, per-channel) activation
quantizers is refused: the int8 runtime's static grids and the low-bit layers' float
interfaces do not meet. So is a per-group weight of more than 4 bits.

Files: both are int8-runtime modules (``STATE`` buffers, ``config()``), so
``save_int8_model`` stores the packed bytes and scales as they are.

ONNX (``export_onnx``, docs/interop.md, "Low-bit models"): the weight is an INT4 initializer,
(K, N) for a Linear and the (rows, K) table for an Embedding, behind a blocked
DequantizeLinear (scales per group, zero points INT4 when affine); then MatMul (+ Add, Relu)
or Gather. Per-token activations are quantized by standard float32 ops (ReduceMin/Max, Div,
Reciprocal, Round, Clip) that reproduce ``quantize_tokens`` bit for bit.
"""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError, DTypeError, ShapeError
from qatcore.graph.node import Node
from qatcore.quantization.block_fake_quantize import BlockFakeQuantize
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.int8_layers import Int8Module
from qatcore.quantization.lowbit import (
    LowBitWeight,
    TokenQuantization,
    dequantize_rows,
    lowbit_linear,
    lowbit_weight,
)
from qatcore.quantization.qat.operators.quantizer import int8_record
from qatcore.quantization.qat.operators.registry import OperatorRule, register
from qatcore.quantization.qat.qat_layers import QATEmbedding, QATLayer, QATLinear
from qatcore.tensor import Tensor

__all__ = ["LowBitLinear", "LowBitEmbedding", "is_lowbit_layer", "lowbit_module", "lower_lowbit_layer",
           "lower_lowbit_embedding"]


class _LowBitModule(Int8Module):
    """The packed weight of a low-bit module, held in its STATE buffers."""

    def _set_weight(self, weight: LowBitWeight) -> None:
        self.register_buffer("packed", np.ascontiguousarray(weight.packed, np.uint8))
        self.register_buffer("scale", np.ascontiguousarray(weight.scale, np.float32))
        zero = np.zeros(0, np.int32) if weight.zero_point is None else weight.zero_point
        self.register_buffer("zero_point", np.ascontiguousarray(zero, np.int32))
        self.bits, self.group_size = int(weight.bits), int(weight.group_size)

    COLUMNS: str  # the config key of the weight's row length (in_features, embedding_dim)

    def weight(self) -> LowBitWeight:
        """The packed weight (rows: output features, or the table's rows)."""
        zero = self.zero_point.data
        scale = self.scale.data.reshape(self.packed.data.shape[0], -1)
        return LowBitWeight(self.packed.data, scale, zero.reshape(scale.shape) if zero.size else None, self.bits,
                            self.group_size, int(getattr(self, self.COLUMNS)))


class LowBitLinear(_LowBitModule):
    """y = [relu](lowbit_linear(x)) + ...: packed low-bit weights, float in, float out
    (:func:`~qatcore.quantization.lowbit.lowbit_linear`; per-token int8 activations when
    ``activation_bits`` is set)."""

    STATE = (("packed", "|u1"), ("scale", "<f4"), ("zero_point", "<i4"), ("bias", "<f4"))
    COLUMNS = "in_features"
    CONFIG_KEYS = ("in_features", "out_features", "bits", "group_size", "activation_bits", "activation_symmetric",
                   "relu")

    def __init__(self, weight: LowBitWeight, bias: np.ndarray | None, activation: TokenQuantization | None,
                 relu: bool = False) -> None:
        super().__init__()
        self._set_weight(weight)
        self.register_buffer("bias", np.zeros(0, np.float32) if bias is None else np.asarray(bias, np.float32))
        self.in_features, self.out_features = int(weight.in_features), int(weight.out_features)
        self.activation_bits = None if activation is None else activation.bits
        self.activation_symmetric = None if activation is None else activation.symmetric
        self.relu = bool(relu)

    @property
    def activation(self) -> TokenQuantization | None:
        if self.activation_bits is None:
            return None
        return TokenQuantization(int(self.activation_bits), bool(self.activation_symmetric))

    def config(self) -> dict:
        return {key: getattr(self, key) for key in self.CONFIG_KEYS}

    def forward(self, x):
        array = x.data if isinstance(x, Tensor) else np.asarray(x, np.float32)
        y = lowbit_linear(array, self.weight(), self.bias.data, self.activation, type(self).__name__)
        if self.relu:
            y = np.maximum(y, np.float32(0))
        return Tensor._from_array(y, requires_grad=False)

    def extra_repr(self) -> str:
        act = "float" if self.activation_bits is None else (
            f"int{self.activation_bits} per token {'symmetric' if self.activation_symmetric else 'affine'}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} weights in "
                f"groups of {self.group_size}, activations {act}")


class LowBitEmbedding(_LowBitModule):
    """An embedding lookup of a packed low-bit table: the rows it reads, dequantized."""

    STATE = (("packed", "|u1"), ("scale", "<f4"), ("zero_point", "<i4"))
    COLUMNS = "embedding_dim"
    CONFIG_KEYS = ("num_embeddings", "embedding_dim", "bits", "group_size", "padding_idx")

    def __init__(self, weight: LowBitWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        self._set_weight(weight)
        self.num_embeddings, self.embedding_dim = int(weight.out_features), int(weight.in_features)
        self.padding_idx = padding_idx

    def config(self) -> dict:
        return {key: getattr(self, key) for key in self.CONFIG_KEYS}

    def forward(self, indices):
        array = indices.data if isinstance(indices, Tensor) else np.asarray(indices)
        if array.dtype.kind not in "iu":
            raise DTypeError(f"LowBitEmbedding: input must hold integer indices, got dtype {array.dtype}")
        rows = self.num_embeddings
        if array.size and (int(array.min()) < 0 or int(array.max()) >= rows):
            raise ShapeError(f"LowBitEmbedding: input indices must lie in [0, {rows - 1}] (num_embeddings {rows}), "
                             f"got values in [{int(array.min())}, {int(array.max())}]")
        return Tensor._from_array(dequantize_rows(self.weight(), array), requires_grad=False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} in groups of {self.group_size}"


# ---- conversion -----------------------------------------------------------------------------------
def is_lowbit_layer(layer) -> bool:
    """Whether ``layer`` is an enabled QAT layer with a quantizing per-group or absmean weight quantizer."""
    quantizer = getattr(layer, "weight_fake_quant", None)
    return (isinstance(layer, QATLayer) and layer.enabled and isinstance(quantizer, BlockFakeQuantize)
            and bool(quantizer.fake_quant_enabled.data))


def lowbit_module(name: str, layer: QATLayer) -> _LowBitModule:
    """The low-bit runtime module of QAT layer ``layer`` (at ``name``), refusing what it cannot hold."""
    where = f"convert_to_quantized: layer {name!r}"
    if isinstance(layer, QATEmbedding):
        weight = lowbit_weight(layer.weight_fake_quant, layer.weight.data, name)
        return LowBitEmbedding(weight, layer.padding_idx)
    if type(layer) is not QATLinear:
        raise ConfigError(f"{where} ({type(layer).__name__}) has {layer.weight_fake_quant.spec.scheme.value} weights; "
                          f"low-bit conversion holds Linear and Embedding layers only")
    if layer.output_fake_quant is not None:
        raise ConfigError(f"{where} quantizes its output on an observed grid and its weight per group "
                          f"({layer.weight_fake_quant.spec.scheme.value}); low-bit layers take and give float "
                          f"values: use per-token activations (QuantizationConfig.int8_dynamic_activation_int4_weight) "
                          f"or weights only")
    input_fq = layer.input_fake_quant
    if isinstance(input_fq, FakeQuantize) and not isinstance(input_fq, BlockFakeQuantize) and \
            bool(input_fq.fake_quant_enabled.data):
        raise ConfigError(f"{where} quantizes its input on an observed grid; low-bit layers take float or "
                          f"per-token activations")
    weight = lowbit_weight(layer.weight_fake_quant, layer.weight.data, name)
    bias = None if layer.bias is None else layer.bias.data
    return LowBitLinear(weight, bias, TokenQuantization.of(input_fq), layer.relu)


def _refuse_static_neighbours(ctx, node: Node, name: str) -> None:
    """A low-bit layer reads and writes floats; an observed quantizer next to it would need the
    int8 runtime's integer values (module docstring)."""
    if any(isinstance(a, Node) and ctx.env[a][1] is not None for a in node.args):
        raise ConfigError(f"convert_to_quantized: layer {name!r} has low-bit weights and reads a value on an "
                          f"observed int8 grid; low-bit layers take float or per-token activations")


def lower_lowbit_layer(ctx, node: Node, layer: QATLayer):
    """QATLinear / QATEmbedding with low-bit weights -> LowBitLinear / LowBitEmbedding, float in and out."""
    _refuse_static_neighbours(ctx, node, node.target)
    module = lowbit_module(node.target, layer)
    return ctx.add(node.name, module, (ctx.as_float(node.args[0]),), None)


def lower_lowbit_embedding(ctx, node: Node, layer: QATEmbedding):
    if is_lowbit_layer(layer):
        return lower_lowbit_layer(ctx, node, layer)
    return None  # quantization switched off: the QAT layer's float lookup


# ---- ONNX export ----------------------------------------------------------------------------------
# (docs/interop.md, "Low-bit models"). The weight is an INT4 initializer behind a blocked
# DequantizeLinear-21, which computes ``(q - z) * s`` in float32 as ``LowBitWeight.dequantize``
# does; 2-bit and ternary integers are INT4 too (INT2 needs DequantizeLinear-25, the files are
# opset 21). Per-token activations are the rule of ``group_token_fake_quantize`` composed from
# standard float32 ops.
_TINY = np.finfo(np.float32).tiny


def _dequantized_weight(ex, name: str, integers: np.ndarray, weight: LowBitWeight, axis: int) -> str:
    """DequantizeLinear(INT4 ``integers``, scale, [zero point], axis, block_size) of a weight
    whose groups run along ``axis`` of ``integers``: (K, N) on axis 0 for a Linear (MatMul's right
    operand), the (rows, K) table itself on axis 1 for an Embedding."""
    b = ex.b
    scale, zero = weight.scale, weight.zero_point
    if axis == 0:
        scale, zero = scale.T, None if zero is None else zero.T
    inputs = [ex.int4_constant(f"{name}.weight", integers),
              b.constant(f"{name}.weight_scale", np.ascontiguousarray(scale, np.float32))]
    if zero is not None:
        inputs.append(ex.int4_constant(f"{name}.weight_zero_point", np.ascontiguousarray(zero)))
    return b.node("DequantizeLinear", inputs, f"{name}/DequantizeLinear", axis=axis,
                  block_size=int(weight.group_size))


def _quantize_tokens_onnx(ex, name: str, x: str, activation: TokenQuantization) -> tuple[str, str]:
    """``(q - z, s)`` of each row of ``x`` over its last axis (``token_qparams`` and
    ``quantize_tokens``, op for op in float32):

        mn = min(ReduceMin(x), 0);  mx = max(ReduceMax(x), 0)
        affine     s = max((mx - mn) / (qmax - qmin), tiny);  z = clip(qmin - round(mn / s), qmin, qmax)
        symmetric  s = max(max(-mn, mx) / ((qmax - qmin) / 2), tiny);  z = 0
        q = clip(round(x * (1 / s)) + z, qmin, qmax)

    (ONNX Round is half to even, numpy's rint.)"""
    b = ex.b
    qmin, qmax = -2 ** (activation.bits - 1), 2 ** (activation.bits - 1) - 1

    def const(label: str, value: float) -> str:
        return b.constant(f"{name}.{label}", np.float32(value))

    axes = b.constant(f"{name}.token_axes", np.array([-1], np.int64))
    zero = const("zero", 0.0)
    mn = b.node("Min", [b.node("ReduceMin", [x, axes], f"{name}/ReduceMin", keepdims=1), zero], f"{name}/min")
    mx = b.node("Max", [b.node("ReduceMax", [x, axes], f"{name}/ReduceMax", keepdims=1), zero], f"{name}/max")
    if activation.symmetric:
        spread = b.node("Max", [b.node("Neg", [mn], f"{name}/neg_min"), mx], f"{name}/absmax")
        levels = (qmax - qmin) / 2
    else:
        spread, levels = b.node("Sub", [mx, mn], f"{name}/range"), qmax - qmin
    scale = b.node("Max", [b.node("Div", [spread, const("levels", levels)], f"{name}/step"), const("tiny", _TINY)],
                   f"{name}/scale")
    q = b.node("Round", [b.node("Mul", [x, b.node("Reciprocal", [scale], f"{name}/inverse_scale")],
                                f"{name}/scaled")], f"{name}/Round")
    qmin_name, qmax_name = const("qmin", qmin), const("qmax", qmax)

    def clip(value: str, label: str) -> str:
        return b.node("Clip", [value, qmin_name, qmax_name], f"{name}/{label}")

    if activation.symmetric:
        return clip(q, "integers"), scale
    min_steps = b.node("Round", [b.node("Div", [mn, scale], f"{name}/min_over_scale")], f"{name}/min_steps")
    zero_point = clip(b.node("Sub", [qmin_name, min_steps], f"{name}/shift"), "zero_point")
    q = clip(b.node("Add", [q, zero_point], f"{name}/shifted"), "clip")
    return b.node("Sub", [q, zero_point], f"{name}/integers"), scale


def _export_lowbit_linear(ex, node, module: LowBitLinear):
    """[per-token quantization ->] MatMul(x, DequantizeLinear(W^T)) [-> Add bias] [-> Relu]."""
    b, name = ex.b, ex.node_name(node)
    x = ex.single_float_input(node)
    weight = module.weight()
    w = _dequantized_weight(ex, name, np.ascontiguousarray(weight.integers().T), weight, axis=0)
    if module.activation is not None:  # fq(x) = (q - z) * s, the QAT forward's operand
        integers, scale = _quantize_tokens_onnx(ex, f"{name}/tokens", x, module.activation)
        x = b.node("Mul", [integers, scale], f"{name}/tokens/fake_quantized")
    steps = [("MatMul", [w])]
    if module.bias.data.size:
        steps.append(("Add", [b.constant(f"{name}.bias", module.bias.data.astype(np.float32))]))
    if module.relu:
        steps.append(("Relu", []))
    for i, (op, operands) in enumerate(steps):
        x = b.node(op, [x, *operands], name if i == len(steps) - 1 else f"{name}/{op}")
    return x, None


def _export_lowbit_embedding(ex, node, module: LowBitEmbedding):
    """Gather(DequantizeLinear(table, axis=1), Cast(indices, int64)), as a float Embedding."""
    b, name = ex.b, ex.node_name(node)
    weight = module.weight()
    table = _dequantized_weight(ex, name, weight.integers(), weight, axis=1)
    index = b.node("Cast", [ex.names[node.args[0]]], f"{name}/Cast", to=7)  # TensorProto.INT64
    return b.node("Gather", [table, index], name, axis=0), None


register(
    OperatorRule(LowBitLinear, record=int8_record(LowBitLinear), export=_export_lowbit_linear),
    OperatorRule(LowBitEmbedding, index_input=True, record=int8_record(LowBitEmbedding),
                 export=_export_lowbit_embedding),
)

