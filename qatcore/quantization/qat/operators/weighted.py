"""Layers with weights: Linear and Conv2d, their QAT layers and their int8 runtime.

QAT: the layer-wise config decides per layer; an enabled layer becomes ``QATLinear`` /
``QATConv2d`` (fake-quantized weight and output), and the fusions below make one QAT
layer of Conv2d -> BatchNorm2d (-> ReLU) (``QATConvBn2d``, the BatchNorm folded into
the weight), of Linear -> BatchNorm1d (-> ReLU) (``QATLinearBn1d``, the same fold) and
of Conv2d / Linear -> ReLU.

Conversion (docs/numerics.md, "Integer-only inference"): BatchNorm folded with its
running statistics, the weight quantized with the trained weight qparams, the bias to
int32 at s_x * s_w (zero point 0), the requantization multiplier per output channel,
a fused ReLU as the clamp's lower bound:

    acc = sum (x_q - z_x) * w_q + bias_q                      (int32)
    y_q = clamp(z_y + requant(acc; s_x * s_w / s_y), clamp_min, qmax)

ONNX: Conv, Gemm (a matrix input) or MatMul (+ Add); QAT layers with their weight on
the grid behind a QDQ pair; int8 layers as DequantizeLinear -> Conv/Gemm ->
QuantizeLinear, or QLinearConv / QLinearMatMul in the operator form.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from qatcore import kernels
from qatcore.errors import ConfigError, DTypeError, InteropError
from qatcore.graph.node import Node
from qatcore.nn import functional as F
from qatcore.nn.activation import ReLU
from qatcore.nn.batchnorm import BatchNorm1d, BatchNorm2d
from qatcore.nn.container import Sequential
from qatcore.nn.conv import Conv2d
from qatcore.nn.flatten import Flatten
from qatcore.nn.linear import Linear
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter
from qatcore.quantization.config import Requantization
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.int8_layers import OUTPUT_STATE, Int8Module, Quantize, int_input
from qatcore.quantization.qat.int8_model import Int8Value
from qatcore.quantization.qat.operators.lowbit import is_lowbit_layer, lower_lowbit_layer
from qatcore.quantization.qat.operators.quantizer import int8_record
from qatcore.quantization.qat.operators.registry import (
    OperatorRule,
    QATRole,
    RecordRule,
    register,
    register_onnx_import,
)
from qatcore.quantization.qat.qat_layers import (
    FoldedBatchNorm,
    QATConv2d,
    QATConvBn2d,
    QATLayer,
    QATLinear,
    QATLinearBn1d,
)
from qatcore.quantization.requantization import weighted_multipliers
from qatcore.tensor import Tensor

__all__ = ["Int8Linear", "Int8Conv2d", "Int8WeightOnly", "QAT_FUSIONS", "weight_scales", "int8_weighted_layer",
           "float_layers", "computes_in_float", "export_int8_weighted"]


# ---- the int8 runtime ---------------------------------------------------------------------------
class _Int8Weighted(Int8Module):
    """Int8Linear / Int8Conv2d: int8 weights, int32 bias, per-channel requantization.

    ``multiplier`` and ``shift`` are the fixed-point form of M = s_x * s_w / s_y; with
    ``requantization`` float32, ``float_multiplier`` is its float32 form as ONNX Runtime
    computes it (``qatcore.quantization.requantization``), which the forward uses instead
    (empty in fixed point: the file stays as small)."""

    STATE = (("weight_q", "|i1"), ("bias_q", "<i4"), ("multiplier", "<i4"), ("shift", "<i4"),
             ("input_zero_point", "<i4"), *OUTPUT_STATE, ("clamp_min", "<i4"), ("float_multiplier", "<f4"))
    STATE_SINCE_3 = ("float_multiplier",)
    REQUANTIZES = True

    def __init__(self, weight_q: np.ndarray, bias_q: np.ndarray, multiplier: np.ndarray, shift: np.ndarray,
                 input_zero_point: int, output_scale: float, output_zero_point: int, clamp_min: int, qmin: int,
                 qmax: int, float_multiplier: np.ndarray | None = None,
                 requantization: Requantization = Requantization.FIXED_POINT) -> None:
        super().__init__()
        if weight_q.dtype != np.int8:
            raise DTypeError(f"{type(self).__name__}: weights must be int8, got {weight_q.dtype}")
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("bias_q", bias_q.astype(np.int32))
        self.register_buffer("multiplier", multiplier.astype(np.int32))
        self.register_buffer("shift", shift.astype(np.int32))
        self.register_buffer("input_zero_point", np.array(input_zero_point, dtype=np.int32))
        self._set_output(output_scale, output_zero_point, qmin, qmax)
        self.register_buffer("clamp_min", np.array(clamp_min, dtype=np.int32))
        self.set_requantization(requantization)
        if self.requantization is Requantization.FLOAT32:
            if float_multiplier is None:
                raise ConfigError(f"{type(self).__name__}: float32 requantization needs its float_multiplier")
            self.register_buffer("float_multiplier", np.asarray(float_multiplier, dtype=np.float32))
        else:
            self.derive_state()

    def _epilogue_args(self) -> tuple:
        qmax = int(self.output_range.data[1])
        if self.requantization is Requantization.FLOAT32:
            multiplier, shift = self.float_multiplier.data, None
        else:
            multiplier, shift = self.multiplier.data, self.shift.data
        return (self.bias_q.data, multiplier, shift, int(self.output_zero_point.data), int(self.clamp_min.data), qmax,
                self.out_dtype)


class Int8WeightOnly(Int8Module):
    """A layer quantized in its weights only (mode ``weights_only``, or a layer override):
    int8 weights with float activations. The weight is stored as the integers q and their
    per-channel scales, and each call computes in float32 with ``q * s``, the very grid values
    the QAT layer computes with (BatchNorm folded with the running statistics), then the
    float bias and the fused ReLU.

    ``kind`` is "linear" or "conv2d" (with the convolution's geometry)."""

    STATE = (("weight_q", "|i1"), ("weight_scale", "<f4"), ("bias", "<f4"))
    CONFIG_KEYS = ("kind", "stride", "padding", "dilation", "groups", "relu")

    def __init__(self, weight_q: np.ndarray, weight_scale: np.ndarray, bias: np.ndarray | None, relu: bool,
                 kind: str, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1) -> None:
        super().__init__()
        if weight_q.dtype != np.int8:
            raise DTypeError(f"Int8WeightOnly: weights must be int8, got {weight_q.dtype}")
        if kind not in ("linear", "conv2d"):
            raise ConfigError(f"Int8WeightOnly: kind must be 'linear' or 'conv2d', got {kind!r}")
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", np.asarray(weight_scale, dtype=np.float32).reshape(-1))
        self.register_buffer("bias", np.zeros(0, np.float32) if bias is None else np.asarray(bias, np.float32))
        self.kind, self.relu = kind, bool(relu)
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), groups

    def config(self) -> dict:
        return {"kind": self.kind, "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "relu": self.relu}

    def weight(self) -> np.ndarray:
        """The float32 grid values q * s (per output channel)."""
        shape = (-1,) + (1,) * (self.weight_q.data.ndim - 1)
        return self.weight_q.data.astype(np.float32) * self.weight_scale.data.reshape(shape)

    def forward(self, x):
        x = x if isinstance(x, Tensor) else Tensor._from_array(np.asarray(x, np.float32), requires_grad=False)
        weight = Tensor._from_array(self.weight(), requires_grad=False)
        bias = Tensor._from_array(self.bias.data, requires_grad=False) if self.bias.data.size else None
        if self.kind == "linear":
            y = F.linear(x, weight, bias)
        else:
            y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu(y) if self.relu else y


class Int8Linear(_Int8Weighted):
    """y_q = requant(x_q @ w_q^T - z_x * colsum(w_q) + bias_q) (module docstring)."""

    def forward(self, x):
        q = int_input(self, x)
        lead = q.shape[:-1]
        rows = np.ascontiguousarray(q.reshape(-1, q.shape[-1]))
        packed, epilogue = self.kernel_plan(q, self._plan)
        out = kernels.int8_gemm.int8_linear(rows, int(self.input_zero_point.data), packed, *epilogue)
        return out.reshape(lead + (out.shape[-1],))

    def _plan(self, q):
        return kernels.int8_gemm.pack_weights(self.weight_q.data), self._epilogue_args()


class Int8Conv2d(_Int8Weighted):
    """Integer conv2d (zero padding is the input's zero point, i.e. real 0) with the fused requantization."""

    def __init__(self, *args, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1) -> None:
        super().__init__(*args)
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), groups

    CONFIG_KEYS = ("stride", "padding", "dilation", "groups")

    def config(self) -> dict:
        return {"stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups}

    def forward(self, x):
        q = int_input(self, x)
        return kernels.int8_conv.run_conv2d(self.kernel_plan(q, self._plan), q)

    def _plan(self, q):
        return kernels.int8_conv.plan_conv2d(q.shape, q.dtype, int(self.input_zero_point.data), self.weight_q.data,
                                             *self._epilogue_args(), self.stride, self.padding, self.dilation,
                                             self.groups)


# ---- QAT ------------------------------------------------------------------------------------------
def _to_qat(layer, weight_fq: FakeQuantize | None, output_fq: FakeQuantize | None, relu: bool = False):
    cls = QATConv2d if isinstance(layer, Conv2d) else QATLinear
    return cls(layer, weight_fq, output_fq, relu=relu)


def _fuse_bn(modules, names, weight_fq, output_fq):
    layer, bn = modules[0], modules[1]
    if not bn.track_running_stats:
        return None  # nothing to fold with; the layer is quantized alone
    cls = QATConvBn2d if isinstance(layer, Conv2d) else QATLinearBn1d
    return cls(layer, bn, names[1], weight_fq, output_fq, relu=len(modules) == 3)


def _fuse_relu(modules, names, weight_fq, output_fq):
    return _to_qat(modules[0], weight_fq, output_fq, relu=True)


# Chains of modules that become one QAT layer, tried in this order (longest first); each
# builder returns the QAT layer, or None to leave the chain alone.
QAT_FUSIONS = (
    ((Conv2d, BatchNorm2d, ReLU), _fuse_bn),
    ((Conv2d, BatchNorm2d), _fuse_bn),
    ((Linear, BatchNorm1d, ReLU), _fuse_bn),
    ((Linear, BatchNorm1d), _fuse_bn),
    ((Conv2d, ReLU), _fuse_relu),
    ((Linear, ReLU), _fuse_relu),
)


# ---- conversion -----------------------------------------------------------------------------------
def _check_quantizers(name: str, layer: QATLayer) -> None:
    if layer.weight_fake_quant is None or layer.output_fake_quant is None:
        quantized = "outputs" if layer.weight_fake_quant is None else "weights"
        raise ConfigError(
            f"int8 conversion: layer {name!r} quantizes only its {quantized}; an integer-only model "
            f"needs both (convert models prepared with mode weights_and_activations)"
        )


def _check_weight_grid(name: str, w_qparams) -> None:
    """The int8 kernels take weights as signed 8-bit integers with zero point 0, one scale
    per tensor or per output channel (axis 0); any other trained grid is refused here rather
    than converted into a model that computes something else."""
    where = f"int8 conversion: layer {name!r} weight quantizer"
    if w_qparams.dtype.qmin < -128 or w_qparams.dtype.qmax > 127 or not w_qparams.dtype.signed:
        raise ConfigError(f"{where} uses {w_qparams.dtype}; the int8 model needs signed weights of at most "
                          f"8 bits (set weight.signed to true and weight.bits to at most 8)")
    if np.any(w_qparams.zero_point != 0):
        raise ConfigError(f"{where} has nonzero zero points; the int8 model needs symmetric weights "
                          f"(set weight.scheme to per_tensor_symmetric or per_channel_symmetric)")
    if w_qparams.axis not in (None, 0):
        raise ConfigError(f"{where} is per channel along axis {w_qparams.axis}; the int8 model needs "
                          f"axis 0, the output channel (set weight.axis to 0)")


def _float_layer(layer: QATLayer, bias: bool):
    """A new float Linear / Conv2d of the QAT layer's shape (its values to be loaded)."""
    if isinstance(layer, (QATLinear, QATLinearBn1d)):
        return Linear(layer.in_features, layer.out_features, bias=bias, rng=np.random.default_rng(0))
    return Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, bias=bias, rng=np.random.default_rng(0))


def float_layers(layer: QATLayer) -> list:
    """The float layers a QAT layer computes when its quantization is off: copies (the int8
    model must not change when training goes on) of its Linear or Conv2d, its BatchNorm (in
    eval mode), and a ReLU."""
    float_layer = _float_layer(layer, layer.bias is not None)
    float_layer.load_state_dict({name: value for name, value in layer.state_dict().items()
                                 if name in ("weight", "bias")})
    layers = [float_layer]
    if isinstance(layer, FoldedBatchNorm):
        bn = layer.bn
        copy = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
        copy.load_state_dict(bn.state_dict())
        layers.append(copy.eval())
    if layer.relu:
        layers.append(ReLU())
    return layers


def _lower_float_island(ctx, node: Node, layer: QATLayer):
    """A QAT layer switched off at run time (``preparer.disable``): its float layers between
    Dequantize and Quantize. The output is quantized to the grid its output quantizer learned
    (when it has one), so the integer layers after it still get integers."""
    value = ctx.as_float(node.args[0])
    for i, float_layer in enumerate(float_layers(layer)):
        value = ctx.add(f"{node.name}_float_{i}", float_layer, (value,), None)[0]
    quantizer = layer.output_fake_quant
    if not isinstance(quantizer, FakeQuantize) or not bool(quantizer.qparams_ready.data):
        return value, None
    out = ctx.value_of(quantizer, f"{node.name} (output)")
    return ctx.add(f"{node.name}_quantize", Quantize(out.scale, out.zero_point, out.qmin, out.qmax, ctx.requantization),
                   (value,), out)


def _on_grid(quantizer, values: np.ndarray) -> np.ndarray:
    """``values`` fake-quantized by ``quantizer`` when it is on and has qparams, else as they are."""
    if (not isinstance(quantizer, FakeQuantize) or not bool(quantizer.fake_quant_enabled.data)
            or not bool(quantizer.qparams_ready.data)):
        return values
    qparams = quantizer.calculate_qparams()
    return qparams.dequantize(qparams.quantize(values)).astype(np.float32)


def _lower_simulated_island(ctx, node: Node, layer: QATLayer):
    """An enabled QAT layer that has no integer form here (its input arrives as floats, or one
    of its quantizers is switched off): its float computation with the weight on its grid
    (BatchNorm folded with the running statistics), between Dequantize and Quantize. The
    output is quantized to its output quantizer's grid when that is on, so the integer
    layers after it still get integers."""
    value = ctx.as_float(node.args[0])
    weight, bias, dead = layer.weight.data, _bias_of(layer), None
    if isinstance(layer, FoldedBatchNorm):
        weight, bias, dead = layer.folded_parameters()
    weight = _on_grid(layer.weight_fake_quant, weight)
    if dead is not None and np.any(dead):
        weight = weight.copy()
        weight[dead] = 0
    float_layer = _float_layer(layer, bias is not None)
    float_layer.load_state_dict({"weight": weight, **({} if bias is None else {"bias": bias})})
    value = ctx.add(f"{node.name}_float", float_layer, (value,), None)[0]
    if layer.relu:
        value = ctx.add(f"{node.name}_relu", ReLU(), (value,), None)[0]
    quantizer = layer.output_fake_quant
    if (not isinstance(quantizer, FakeQuantize) or not bool(quantizer.fake_quant_enabled.data)
            or not bool(quantizer.qparams_ready.data)):
        return value, None
    out = ctx.value_of(quantizer, f"{node.name} (output)")
    return ctx.add(f"{node.name}_quantize", Quantize(out.scale, out.zero_point, out.qmin, out.qmax,
                                                     ctx.requantization), (value,), out)


def int8_weighted_layer(layer: QATLayer, name: str, x_value: Int8Value, out: Int8Value,
                        requantization: Requantization) -> _Int8Weighted:
    """The Int8Linear / Int8Conv2d computing enabled QAT layer ``layer`` (called ``name`` in
    errors) on integers of grid ``x_value``, with its output on grid ``out`` (module docstring).
    Graph conversion, the eager-mode conversion and the eager-mode eval forward all build the
    layer's int8 form here, so they compute the same function."""
    _check_quantizers(name, layer)
    weight = layer.weight.data
    bias = None if layer.bias is None else layer.bias.data
    dead = None
    if isinstance(layer, FoldedBatchNorm):
        weight, bias, dead = layer.folded_parameters()  # exactly what training quantized
    w_qparams = layer.weight_fake_quant.calculate_qparams()
    _check_weight_grid(name, w_qparams)
    weight_q = w_qparams.quantize(weight)
    if dead is not None:
        weight_q[dead] = 0  # channels with gamma == 0 output beta whatever the conv computes
    s_w = w_qparams.scale.astype(np.float64)
    if s_w.size == 1:
        s_w = np.full(weight.shape[0], s_w[0])
    bias_scale = x_value.scale * s_w
    bias_q = (np.zeros(weight.shape[0], np.int64) if bias is None
              else np.rint(bias.astype(np.float64) / bias_scale).astype(np.int64))
    if np.any(np.abs(bias_q) >= 2**31):
        raise ConfigError(f"int8 conversion: layer {name!r} has a bias that overflows int32 at s_x * s_w")
    multiplier, shift, float_multiplier = weighted_multipliers(x_value.scale, w_qparams.scale, out.scale,
                                                               weight.shape[0])
    clamp_min = out.zero_point if layer.relu else out.qmin
    args = (weight_q.astype(np.int8), bias_q.astype(np.int32), multiplier, shift, x_value.zero_point, out.scale,
            out.zero_point, clamp_min, out.qmin, out.qmax, float_multiplier, requantization)
    if isinstance(layer, (QATLinear, QATLinearBn1d)):
        return Int8Linear(*args)
    return Int8Conv2d(*args, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def computes_in_float(layer: QATLayer) -> str | None:
    """Why ``layer`` computes in float rather than in integers, or None: switched off at run
    time (``preparer.disable``), or one of its quantizers is off (the schedule's quant delay,
    ``preparer.disable`` of a quantizer)."""
    if not layer.enabled:
        return "quantization is disabled for this layer"
    off = [q.name for q in layer.quantizers() if not bool(q.fake_quant_enabled.data)]
    if off:
        return f"fake quantization is off in {', '.join(off)}"
    return None


def _lower_weight_only(ctx, node: Node, layer: QATLayer):
    """A layer that quantizes only its weights: an ``Int8WeightOnly`` on the float value."""
    weight, bias, dead = layer.weight.data, _bias_of(layer), None
    if isinstance(layer, FoldedBatchNorm):
        weight, bias, dead = layer.folded_parameters()
    w_qparams = layer.weight_fake_quant.calculate_qparams()
    _check_weight_grid(node.target, w_qparams)
    weight_q = w_qparams.quantize(weight)
    if dead is not None:
        weight_q[dead] = 0
    scale = np.broadcast_to(w_qparams.scale.astype(np.float32).reshape(-1), (weight.shape[0],))
    if isinstance(layer, (QATLinear, QATLinearBn1d)):
        module = Int8WeightOnly(weight_q.astype(np.int8), scale, bias, layer.relu, "linear")
    else:
        module = Int8WeightOnly(weight_q.astype(np.int8), scale, bias, layer.relu, "conv2d", layer.stride,
                                layer.padding, layer.dilation, layer.groups)
    return ctx.add(node.name, module, (ctx.as_float(node.args[0]),), None)


def _lower_qat_layer(ctx, node: Node, layer: QATLayer):
    """QATLinear / QATConv2d / QATConvBn2d -> Int8Linear / Int8Conv2d (module docstring);
    a layer switched off at run time becomes a float island of its float layers; one whose
    input arrives as floats or one of whose quantizers is off, a float island of its
    simulation (``_lower_simulated_island``). One with low-bit weights (per group, ternary)
    becomes a ``LowBitLinear`` (``lowbit.py``)."""
    if is_lowbit_layer(layer):
        return lower_lowbit_layer(ctx, node, layer)
    if not layer.enabled:
        return _lower_float_island(ctx, node, layer)
    if layer.output_fake_quant is None and isinstance(layer.weight_fake_quant, FakeQuantize):
        if bool(layer.weight_fake_quant.fake_quant_enabled.data):
            return _lower_weight_only(ctx, node, layer)  # configured weights only: int8 weights, float activations
        return _lower_simulated_island(ctx, node, layer)
    if layer.weight_fake_quant is None or ctx.env[node.args[0]][1] is None or computes_in_float(layer) is not None:
        return _lower_simulated_island(ctx, node, layer)
    x, x_value = ctx.as_int(node.args[0], f"layer {node.target!r}")
    out = ctx.value_of(layer.output_fake_quant, f"{node.name} (output)")
    module = int8_weighted_layer(layer, node.target, x_value, out, ctx.requantization)
    return ctx.add(node.name, module, (x,), out)


# ---- ONNX export ----------------------------------------------------------------------------------
def geometry(layer) -> tuple:
    """(stride, padding, dilation, groups) of a conv layer (float, QAT or int8)."""
    return layer.stride, layer.padding, layer.dilation, layer.groups


def _bias_of(layer):
    return None if layer.bias is None else layer.bias.data


def _export_conv(ex, node, conv: Conv2d):
    name = node.target
    x = ex.single_float_input(node)
    w, b = ex.constants(name, conv.weight.data, _bias_of(conv))
    return ex.conv(name, x, w, b, conv.weight.shape[2:], geometry(conv)), None


def _export_linear(ex, node, linear: Linear):
    name = node.target
    x = ex.single_float_input(node)
    return ex.linear(name, x, ex.shape(node.args[0]), linear.weight.data, _bias_of(linear)), None


def _export_qat_layer(ex, node, layer: QATLayer):
    """The eval-mode computation: the weight on its grid behind its QDQ pair, the bias the
    eval path adds, the output quantizer's QDQ pair."""
    name = node.target
    arg = node.args[0]
    x = ex.float_input(node, arg)
    b = ex.b
    is_linear = isinstance(layer, (QATLinear, QATLinearBn1d))
    if not layer.enabled:
        if is_linear:
            y = ex.linear(name, x, ex.shape(arg), layer.weight.data, _bias_of(layer))
        else:
            y = ex.conv(name, x, *ex.constants(name, layer.weight.data, _bias_of(layer)), layer.weight.shape[2:],
                        geometry(layer))
        if isinstance(layer, FoldedBatchNorm):
            y = ex.batch_norm(layer.bn_name, y, layer.bn)
        return (b.node("Relu", [y], f"{name}/Relu") if layer.relu else y), None
    weight, bias, dead = layer.weight.data, _bias_of(layer), None
    if isinstance(layer, FoldedBatchNorm):
        weight, bias, dead = layer.folded_parameters()
    weight_quantizer = layer.weight_fake_quant
    if isinstance(weight_quantizer, FakeQuantize) and bool(weight_quantizer.fake_quant_enabled.data):
        qparams = weight_quantizer.calculate_qparams()
        weight = qparams.dequantize(qparams.quantize(weight))  # the grid values the layer computes with
        if dead is not None and np.any(dead):
            weight[dead] = 0
        w_name = ex.qdq(b.constant(f"{name}.weight", weight), weight_quantizer, f"{name}.weight", on_grid=True)
    else:
        w_name = b.constant(f"{name}.weight", weight)
    if bias is not None:
        bias = np.asarray(layer.eval_bias(bias), dtype=np.float32)  # what the QAT eval path adds
    if is_linear:
        y = ex.linear(name, x, ex.shape(arg), weight, bias, weight_name=w_name)
    else:
        y = ex.conv(name, x, w_name, None if bias is None else b.constant(f"{name}.bias", bias),
                    weight.shape[2:], geometry(layer))
    if layer.relu:
        y = b.node("Relu", [y], f"{name}/Relu")
    if isinstance(layer.output_fake_quant, FakeQuantize):
        y = ex.qdq(y, layer.output_fake_quant, f"{name}.output")
    return y, None


def weight_scales(module: _Int8Weighted, input_scale: float) -> np.ndarray:
    """The float32 weight scales s_w of an int8 layer, per output channel.

    The int8 layer keeps M = s_x * s_w / s_y as the fixed-point pair (M0, n), M = M0 * 2^-(31+n),
    which the converter computed in float64 from the float32 scales. M * s_y / s_x recovers s_w
    within 2^-30 relative, far inside half a float32 ulp (2^-24), so rounding it to float32
    gives back the converter's s_w exactly.
    """
    multiplier = module.multiplier.data.astype(np.float64)
    real = multiplier * np.exp2(-(31.0 + module.shift.data.astype(np.float64)))
    s_w = (real * np.float64(module.output_scale.data) / np.float64(input_scale)).astype(np.float32)
    channels = module.weight_q.data.shape[0]
    return np.broadcast_to(s_w, (channels,)).copy() if s_w.size == 1 else s_w


def _export_int8_weighted(ex, node, module: _Int8Weighted):
    return export_int8_weighted(ex, node, module)


def export_int8_weighted(ex, node, module: _Int8Weighted, x_name: str | None = None):
    """An int8 layer as ONNX (module docstring); ``x_name``: its integer input is that ONNX
    value (a reshape of the node's input) instead of the node's input itself."""
    b = ex.b
    name = node.target
    arg = node.args[0]
    out = ex.out_grid(module)
    relu = int(module.clamp_min.data) == out.zero_point and out.zero_point > out.lo
    x_grid = ex.grids.get(arg)
    if x_grid is None or x_grid.zero_point != int(module.input_zero_point.data):
        raise InteropError(f"ONNX export: int8 layer {name!r} expects the integer input of its conversion")
    weight_q = module.weight_q.data
    s_w = weight_scales(module, x_grid.scale)
    channels = weight_q.shape[0]
    w_q = b.constant(f"{name}.weight_quantized", weight_q)
    w_s = b.constant(f"{name}.weight_scale", s_w)
    w_z = b.constant(f"{name}.weight_zero_point", np.zeros(channels, np.int8))
    bias_q = b.constant(f"{name}.bias_quantized", module.bias_q.data.astype(np.int32))
    if ex.form == "qoperator":
        return _export_qlinear(ex, node, module, x_grid, out, relu, (w_q, w_s, w_z, bias_q), x_name), out
    x = (ex.dequantize(arg, name) if x_name is None else
         b.node("DequantizeLinear", [x_name, *ex.grid_constants(x_grid, name)], f"{name}/DequantizeLinear"))
    w = b.node("DequantizeLinear", [w_q, w_s, w_z], f"{name}.weight/DequantizeLinear", axis=0)
    bias_scale = (np.float64(x_grid.scale) * s_w.astype(np.float64)).astype(np.float32)
    bias = b.node("DequantizeLinear", [bias_q, b.constant(f"{name}.bias_scale", bias_scale),
                                       b.constant(f"{name}.bias_zero_point", np.zeros(channels, np.int32))],
                  f"{name}.bias/DequantizeLinear", axis=0)
    if isinstance(module, Int8Linear):
        y = ex.linear(f"{name}/Gemm", x, ex.shape(arg), None, None, weight_name=w, bias_name=bias)
    else:
        y = ex.conv(f"{name}/Conv", x, w, bias, weight_q.shape[2:], geometry(module))
    return ex.quantize(y, out, name, relu), out


def _export_weight_only(ex, node, module: Int8WeightOnly):
    """DequantizeLinear of the int8 weight (per channel, axis 0) feeding Gemm / Conv on the
    float input, the float bias, and a Relu for the fused ReLU."""
    b, name, arg = ex.b, node.target, node.args[0]
    x = ex.single_float_input(node)
    channels = module.weight_q.data.shape[0]
    w = b.node("DequantizeLinear", [b.constant(f"{name}.weight_quantized", module.weight_q.data),
                                    b.constant(f"{name}.weight_scale", module.weight_scale.data),
                                    b.constant(f"{name}.weight_zero_point", np.zeros(channels, np.int8))],
               f"{name}.weight/DequantizeLinear", axis=0)
    bias = b.constant(f"{name}.bias", module.bias.data) if module.bias.data.size else None
    if module.kind == "linear":
        y = ex.linear(f"{name}/Gemm" if module.relu else name, x, ex.shape(arg), None, None, weight_name=w,
                      bias_name=bias)
    else:
        y = ex.conv(f"{name}/Conv" if module.relu else name, x, w, bias, module.weight_q.data.shape[2:],
                    geometry(module))
    return (b.node("Relu", [y], name) if module.relu else y), None


def _export_qlinear(ex, node, module: _Int8Weighted, x_grid, out, relu: bool, weights: tuple,
                    x_name: str | None = None) -> str:
    """QLinearConv for convolutions; QLinearMatMul for linear layers without a bias, a 1x1
    QLinearConv (which takes the int32 bias) for those with one; the fused ReLU and narrow
    ranges as an integer Clip after it."""
    b = ex.b
    name, arg = node.target, node.args[0]
    w_q, w_s, w_z, bias_q = weights
    x_s, x_z = ex.grid_constants(x_grid, f"{name}.input")
    y_s, y_z = ex.grid_constants(out, f"{name}.output")
    x = ex.names[arg] if x_name is None else x_name
    if isinstance(module, Int8Linear) and not np.any(module.bias_q.data):
        # no bias: QLinearMatMul on x @ W^T, per-column weight scales
        w_t = b.constant(f"{name}.weight_quantized_t", np.ascontiguousarray(module.weight_q.data.T))
        q = b.node("QLinearMatMul", [x, x_s, x_z, w_t, w_s, w_z, y_s, y_z], name)
    elif isinstance(module, Int8Linear):
        # QLinearMatMul has no bias input: a 1x1 QLinearConv on (N, K, 1, 1) takes the int32 bias
        shape = ex.shape(arg)
        if len(shape) != 2:
            raise InteropError(f"ONNX export: int8 linear {name!r} with a bias takes a rank-{len(shape)} "
                               f"input; the qoperator form handles matrices there (use format='qdq')")
        w4 = b.node("Unsqueeze", [w_q, b.constant(f"{name}.axes", np.array([2, 3], np.int64))],
                    f"{name}.weight/Unsqueeze")
        x4 = b.node("Unsqueeze", [x, b.constant(f"{name}.input_axes", np.array([2, 3], np.int64))],
                    f"{name}/Unsqueeze")
        y4 = b.node("QLinearConv", [x4, x_s, x_z, w4, w_s, w_z, y_s, y_z, bias_q], f"{name}/QLinearConv",
                    kernel_shape=[1, 1])
        q = b.node("Flatten", [y4], name, axis=1)
    else:
        stride, padding, dilation, groups = geometry(module)
        q = b.node("QLinearConv", [x, x_s, x_z, w_q, w_s, w_z, y_s, y_z, bias_q], name,
                   kernel_shape=list(module.weight_q.data.shape[2:]), strides=ex.pair(stride),
                   pads=ex.pads(padding), dilations=ex.pair(dilation), group=int(groups))
    # no Relu before these operators: the fused ReLU is the clip's lower bound
    return ex.clip_integers(q, replace(out, lo=out.zero_point) if relu else out, name)


def _export_f_linear(ex, node, _):
    a = ex.arguments(node)
    weight, bias = a["weight"], a["bias"]
    return ex.linear(node.name, ex.value(a["x"], node.name), ex.shape(a["x"]), ex.data(weight), ex.data(bias),
                     ex.names[weight] if isinstance(weight, Node) else None,
                     ex.names[bias] if isinstance(bias, Node) else None), None


def _export_f_conv2d(ex, node, _):
    a = ex.arguments(node)
    name, weight, bias = node.name, a["weight"], a["bias"]
    kernel = (ex.shape(weight) if isinstance(weight, Node) else np.shape(ex.data(weight)))[2:]
    return ex.conv(name, ex.value(a["x"], name), ex.value(weight, f"{name}.weight"),
                   None if bias is None else ex.value(bias, f"{name}.bias"), kernel,
                   (a["stride"], a["padding"], a["dilation"], a["groups"])), None


# ---- int8 file records of the float layers an int8 model may keep ----------------------------------
def _linear_config(linear: Linear) -> dict:
    return {"in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None}


def _conv_config(conv: Conv2d) -> dict:
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(conv.padding),
            "dilation": list(conv.dilation), "groups": conv.groups, "bias": conv.bias is not None}


def _build(cls):
    """A layer from its config (weights drawn from a fixed generator, then loaded from the file)."""
    def build(config: dict):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()},
                   rng=np.random.default_rng(0))
    return build


# ---- ONNX import ----------------------------------------------------------------------------------
def _import_conv(imp, node):
    attrs = imp.attributes(node, {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"})
    weight = imp.weight(node, 1)
    if weight.ndim != 4:
        raise imp.fail(node, f"only 2-D convolutions are supported, got a weight of shape {weight.shape}")
    bias = imp.weight(node, 2, rank=1, optional=True)
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise imp.fail(node, f"B has {bias.shape[0]} values for {weight.shape[0]} output channels")
    kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
    if kernel != list(weight.shape[2:]):
        raise imp.fail(node, f"kernel_shape {kernel} does not match the weight's {list(weight.shape[2:])}")
    window = imp.window(node, attrs, kernel)
    x = imp.runtime(node, 0)
    if not window.symmetric:  # pads the layer cannot hold (different at the two ends): zeros first
        x = imp.call(node, F.pad, (x, window.pad, 0.0), suffix="pad")
    groups = int(attrs.get("group", 1))
    out_channels, in_per_group = weight.shape[:2]
    conv = Conv2d(in_per_group * groups, out_channels, tuple(weight.shape[2:]), groups=groups, bias=bias is not None,
                  rng=np.random.default_rng(0), **window.layer_arguments(padded=not window.symmetric))
    conv.weight.data = np.ascontiguousarray(weight)
    if bias is not None:
        conv.bias.data = bias.copy()
    return imp.add_layer(node, conv, (x,))


def _linear_layer(weight: np.ndarray, bias: np.ndarray | None) -> Linear:
    linear = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, rng=np.random.default_rng(0))
    linear.weight.data = np.ascontiguousarray(weight, dtype=np.float32)
    if bias is not None:
        linear.bias.data = bias.astype(np.float32)
    return linear


def _import_gemm(imp, node):
    attrs = imp.attributes(node, {"alpha", "beta", "transA", "transB"})
    if int(attrs.get("transA", 0)):
        raise imp.fail(node, "transA=1 is not supported")
    b = imp.weight(node, 1, rank=2)
    weight = (b if int(attrs.get("transB", 0)) else b.T) * np.float32(attrs.get("alpha", 1.0))
    c = imp.weight(node, 2, optional=True)
    bias = None
    if c is not None:
        try:
            bias = np.broadcast_to(c * np.float32(attrs.get("beta", 1.0)), (1, weight.shape[0]))[0].copy()
        except ValueError as e:
            raise imp.fail(node, f"C of shape {c.shape} does not broadcast to one value per output") from e
    return imp.add_layer(node, _linear_layer(weight, bias), (imp.runtime(node, 0),))


def _import_matmul(imp, node):
    b = imp.env.get(node.input[1]) if len(node.input) > 1 else None
    if isinstance(b, np.ndarray) and b.ndim < 2:
        raise imp.fail(node, f"a constant B of shape {b.shape} is not supported (only a matrix or a stack of them)")
    if isinstance(b, np.ndarray) and b.ndim == 2:
        linear = _linear_layer(imp.weight(node, 1, rank=2).T, None)
        result = imp.add_layer(node, linear, (imp.runtime(node, 0),))
        imp.linear_of[result] = linear
        return result
    return imp.call(node, F.matmul, (imp.operand(node, 0), imp.operand(node, 1)))


def bias_after_matmul(imp, node) -> Node | None:
    """Add(MatMul-made Linear, constant vector) with the Linear used only here: its bias
    (the Add handler of the arithmetic family asks this first)."""
    for index in (0, 1):
        x = imp.env.get(node.input[index])
        c = imp.env.get(node.input[1 - index])
        linear = imp.linear_of.get(x) if isinstance(x, Node) else None
        if linear is None or not isinstance(c, np.ndarray) or imp.uses.get(node.input[index]) != 1:
            continue
        rank = imp.ranks.get(node.input[index], 2)  # the bias must not add axes to the MatMul's result
        if c.dtype.kind == "f" and c.size == linear.out_features and 1 <= c.ndim <= rank and c.shape[-1] == c.size:
            linear.register_parameter("bias", Parameter(c.reshape(-1).astype(np.float32)))
            return x
    return None


# ---- examples (the registry-wide test walks each through QAT, conversion and ONNX) ------------------
def _example_linear():
    rng = np.random.default_rng(0)
    return Sequential(Flatten(), Linear(12, 6, rng=rng), ReLU(), Linear(6, 4, rng=rng)), (3, 12)


def _example_conv():
    rng = np.random.default_rng(0)
    return Sequential(Conv2d(2, 4, 3, padding=1, rng=rng), BatchNorm2d(4), ReLU(), Conv2d(4, 3, 3, stride=2, rng=rng),
                      Flatten()), (2, 2, 6, 6)


class _FunctionalLinear(Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = Parameter(rng.standard_normal((5, 12)).astype(np.float32) * 0.3)
        self.bias = Parameter(np.zeros(5, np.float32))

    def forward(self, x):
        return F.linear(F.flatten(x, 1), self.w, self.bias)


class _FunctionalConv(Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = Parameter(rng.standard_normal((3, 2, 3, 3)).astype(np.float32) * 0.3)

    def forward(self, x):
        return F.flatten(F.conv2d(x, self.w, None, 1, 1), 1)


register(
    OperatorRule(Linear, qat=QATRole.WEIGHTED, to_qat=_to_qat, export=_export_linear,
                 record=RecordRule(_linear_config, _build(Linear)), example=_example_linear),
    OperatorRule(Conv2d, qat=QATRole.WEIGHTED, to_qat=_to_qat, export=_export_conv,
                 record=RecordRule(_conv_config, _build(Conv2d)), example=_example_conv),
    OperatorRule(QATLinear, qat=QATRole.QUANTIZER, lower=_lower_qat_layer, export=_export_qat_layer),
    OperatorRule(QATConv2d, qat=QATRole.QUANTIZER, lower=_lower_qat_layer, export=_export_qat_layer),
    OperatorRule(QATConvBn2d, qat=QATRole.QUANTIZER, lower=_lower_qat_layer, export=_export_qat_layer),
    OperatorRule(QATLinearBn1d, qat=QATRole.QUANTIZER, lower=_lower_qat_layer, export=_export_qat_layer),
    OperatorRule(Int8Linear, export=_export_int8_weighted, record=int8_record(Int8Linear)),
    OperatorRule(Int8Conv2d, export=_export_int8_weighted, record=int8_record(Int8Conv2d)),
    OperatorRule(Int8WeightOnly, export=_export_weight_only, record=int8_record(Int8WeightOnly)),
    OperatorRule(F.linear, export=_export_f_linear, example=lambda: (_FunctionalLinear(), (3, 12))),
    OperatorRule(F.conv2d, export=_export_f_conv2d, example=lambda: (_FunctionalConv(), (2, 2, 5, 5))),
)
register_onnx_import("Conv", _import_conv)
register_onnx_import("Gemm", _import_gemm)
register_onnx_import("MatMul", _import_matmul)
