"""Conversion of a trained (graph-mode) QAT model to an integer-only int8 model.

The QAT graph is walked in order; every value gets the quantization parameters
of the FakeQuantize that defined it in training, and every operation becomes an
int8 runtime module (:mod:`qatcore.quantization.int8_layers`):

- an activation quantizer on a float value becomes ``Quantize``; on an integer
  value with other parameters, ``Requantize``; with the same ones, nothing;
- ``QATLinear`` / ``QATConv2d`` / ``QATConvBn2d`` become ``QuantizedLinear`` /
  ``QuantizedConv2d``: BatchNorm folded with its running statistics
  (W_fold = W * s, b_fold = beta + (b - mean) * s, s = gamma / sqrt(var + eps)),
  weights quantized with the trained weight qparams, bias to int32 at s_x * s_w
  (zero point 0), the requantization multiplier per output channel, a fused ReLU
  as the clamp's lower bound;
- max pool, average pool, flatten run on the integers; a concatenation becomes
  ``Int8Cat``, each input first requantized to the output's grid where it differs;
  a residual add (and a ReLU after it) becomes ``QuantizedAdd``; a standalone ReLU
  followed by a quantizer becomes a ``Requantize`` whose clamp starts at the zero point,
  and so does a ReLU6 whose quantizer's grid ends at or below 6 (always, for an observed
  one: the clamp at qmax is then the min with 6);
- a layer left float by the layer-wise config stays float, with ``Dequantize``
  before it and ``Quantize`` after it; model outputs get ``Dequantize``.

Nothing between a Quantize and a Dequantize computes in floating point (a test
walks the converted graph and checks every node).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qatcore.errors import ConfigError
from qatcore.graph import Graph, GraphModule
from qatcore.graph.node import Node, map_nodes
from qatcore.nn import functional as F
from qatcore.nn.activation import ReLU, ReLU6
from qatcore.nn.dropout import Dropout
from qatcore.nn.flatten import Flatten, Identity
from qatcore.nn.module import Module
from qatcore.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.int8_layers import (
    Dequantize,
    Int8AvgPool2d,
    Int8Cat,
    Int8Flatten,
    Int8MaxPool2d,
    Quantize,
    QuantizedAdd,
    QuantizedConv2d,
    QuantizedLinear,
    Requantize,
)
from qatcore.quantization.qat.qat_layers import QAT_LAYER_TYPES, QATConvBn2d, QATLinear

__all__ = ["convert_to_quantized", "Int8Value"]


@dataclass(frozen=True)
class Int8Value:
    """The quantization of one integer value: scale, zero point, integer range, and the
    QAT node (a FakeQuantize) whose output it reproduces."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    source: str


def _value_of(quantizer: FakeQuantize, source: str) -> Int8Value:
    qparams = quantizer.calculate_qparams()  # ObserverError names the quantizer if it never observed
    if qparams.scale.size != 1:
        raise ConfigError(f"int8 conversion: activation quantizer {quantizer.name!r} is per channel; "
                          f"the int8 runtime needs per-tensor activations")
    if qparams.dtype.bits > 8:
        raise ConfigError(f"int8 conversion: activation quantizer {quantizer.name!r} uses {qparams.dtype}; "
                          f"the int8 runtime needs activations of at most 8 bits (set activation.bits to 8)")
    return Int8Value(float(qparams.scale[0]), int(qparams.zero_point[0]), qparams.quant_min, qparams.quant_max,
                     source)


class _Builder:
    def __init__(self, qat_model: GraphModule) -> None:
        self.qat = qat_model
        self.graph = Graph()
        self.root = Module()
        self.env: dict[Node, tuple[Node, Int8Value | None]] = {}
        # int8 node name -> {"source": the QAT node it reproduces, "scale", "zero_point"}
        self.sources: dict[str, dict] = {}

    def add(self, name: str, module: Module, args: tuple, value: Int8Value | None) -> tuple[Node, Int8Value | None]:
        target = name.replace(".", "_")
        while target in self.root._modules:
            target += "_"
        self.root.add_module(target, module)
        node = self.graph.create_node("call_module", target, args, name=target)
        if value is not None:
            self.sources[node.name] = {"source": value.source, "scale": value.scale,
                                       "zero_point": value.zero_point}
        return node, value

    def as_float(self, node: Node) -> Node:
        new, value = self.env[node]
        if value is None:
            return new
        return self.add(f"{node.name}_dequantize", Dequantize(value.scale, value.zero_point), (new,), None)[0]

    def as_int(self, node: Node, what: str) -> tuple[Node, Int8Value]:
        new, value = self.env[node]
        if value is None:
            raise ConfigError(f"int8 conversion: {what} receives an unquantized value from {node.name!r}")
        return new, value


def _check_quantizers(node: Node, layer) -> None:
    if layer.weight_fake_quant is None or layer.output_fake_quant is None:
        quantized = "outputs" if layer.weight_fake_quant is None else "weights"
        raise ConfigError(
            f"int8 conversion: layer {node.target!r} quantizes only its {quantized}; an integer-only model "
            f"needs both (convert models prepared with mode weights_and_activations)"
        )


def _check_weight_grid(node: Node, w_qparams) -> None:
    """The int8 kernels take weights as signed 8-bit integers with zero point 0, one scale
    per tensor or per output channel (axis 0); any other trained grid is refused here rather
    than converted into a model that computes something else."""
    where = f"int8 conversion: layer {node.target!r} weight quantizer"
    if w_qparams.dtype.quant_min < -128 or w_qparams.dtype.quant_max > 127 or not w_qparams.dtype.signed:
        raise ConfigError(f"{where} uses {w_qparams.dtype}; the int8 model needs signed weights of at most "
                          f"8 bits (set weight.signed to true and weight.bits to at most 8)")
    if np.any(w_qparams.zero_point != 0):
        raise ConfigError(f"{where} has nonzero zero points; the int8 model needs symmetric weights "
                          f"(set weight.scheme to per_tensor_symmetric or per_channel_symmetric)")
    if w_qparams.axis not in (None, 0):
        raise ConfigError(f"{where} is per channel along axis {w_qparams.axis}; the int8 model needs "
                          f"axis 0, the output channel (set weight.axis to 0)")


def _weighted(builder: _Builder, node: Node, layer, x: Node, x_value: Int8Value) -> tuple[Node, Int8Value]:
    from qatcore.kernels.requantize import quantize_multiplier

    weight = layer.weight.data
    bias = None if layer.bias is None else layer.bias.data
    dead = None
    if isinstance(layer, QATConvBn2d):
        weight, bias, dead = layer.folded_parameters()  # exactly what training quantized
    w_qparams = layer.weight_fake_quant.calculate_qparams()
    _check_weight_grid(node, w_qparams)
    weight_q = w_qparams.quantize(weight)
    if dead is not None:
        weight_q[dead] = 0  # channels with gamma == 0 output beta whatever the conv computes
    out = _value_of(layer.output_fake_quant, f"{node.name} (output)")
    s_w = w_qparams.scale.astype(np.float64)
    if s_w.size == 1:
        s_w = np.full(weight.shape[0], s_w[0])
    bias_scale = x_value.scale * s_w
    bias_q = (np.zeros(weight.shape[0], np.int64) if bias is None
              else np.rint(bias.astype(np.float64) / bias_scale).astype(np.int64))
    if np.any(np.abs(bias_q) >= 2**31):
        raise ConfigError(f"int8 conversion: layer {node.target!r} has a bias that overflows int32 at s_x * s_w")
    multiplier, shift = quantize_multiplier(bias_scale / out.scale)
    out_min = out.zero_point if layer.relu else out.qmin
    args = (weight_q.astype(np.int8), bias_q.astype(np.int32), multiplier, shift, x_value.zero_point, out.scale,
            out.zero_point, out_min, out.qmin, out.qmax)
    if isinstance(layer, QATLinear):
        module = QuantizedLinear(*args)
    else:
        module = QuantizedConv2d(*args, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                 groups=layer.groups)
    return builder.add(node.name, module, (x,), out)


def _following_quantizer(qat: GraphModule, node: Node) -> tuple[FakeQuantize | None, list[Node], bool]:
    """The activation quantizer right after ``node`` (possibly after one ReLU), the nodes
    that the int8 op absorbs, and whether a ReLU is among them."""
    chain, relu = [], False
    current = node
    for _ in range(2):
        if len(current.users) != 1:
            return None, [], False
        (user,) = current.users
        if user.op == "call_module":
            module = qat.get_submodule(user.target)
            if isinstance(module, FakeQuantize):
                return module, chain + [user], relu
            if isinstance(module, ReLU) and not relu:
                chain.append(user)
                relu, current = True, user
                continue
        if user.op == "call_function" and user.target is F.relu and not relu:
            chain.append(user)
            relu, current = True, user
            continue
        return None, [], False
    return None, [], False


def convert_to_quantized(qat_model: Module) -> GraphModule:
    """The integer-only int8 model of a trained graph-mode QAT model (module docstring).

    Calling the result on a float array or Tensor returns dequantized float outputs.
    ``result.int8_sources`` maps each integer-valued int8 node to the QAT node whose value
    it reproduces, with that value's scale and zero point.
    """
    if not isinstance(qat_model, GraphModule):
        raise ConfigError(
            "int8 conversion needs a graph-mode QAT model; this one was prepared in eager mode (its forward "
            "branches on tensor values), so there is no graph to convert"
        )
    builder = _Builder(qat_model)
    absorbed: dict[Node, Node] = {}  # QAT node -> the QAT node whose int8 result stands for it
    for node in qat_model.graph.nodes:
        if node in absorbed:
            builder.env[node] = builder.env[absorbed[node]]
            continue
        if node.op == "input":
            builder.env[node] = (builder.graph.input(node.target), None)
            continue
        if node.op == "output":
            outputs = map_nodes(node.args[0], builder.as_float)
            builder.graph.output(outputs)
            continue
        if node.op == "get_attr":
            raise ConfigError(f"int8 conversion: node {node.name!r} reads a parameter directly; not supported")
        args = [a for a in node.args if isinstance(a, Node)]
        if node.op == "call_module":
            module = qat_model.get_submodule(node.target)
            if isinstance(module, FakeQuantize):
                value = _value_of(module, node.name)
                new, current = builder.env[node.args[0]]
                if current is None:
                    builder.env[node] = builder.add(node.name, Quantize(value.scale, value.zero_point, value.qmin,
                                                                        value.qmax), (new,), value)
                elif (current.scale, current.zero_point) == (value.scale, value.zero_point):
                    builder.env[node] = (new, value)
                else:
                    builder.env[node] = builder.add(node.name, Requantize(current.scale, current.zero_point,
                                                                          value.scale, value.zero_point, value.qmin,
                                                                          value.qmin, value.qmax), (new,), value)
                continue
            if isinstance(module, QAT_LAYER_TYPES) and module.enabled:
                _check_quantizers(node, module)
                x, x_value = builder.as_int(node.args[0], f"layer {node.target!r}")
                builder.env[node] = _weighted(builder, node, module, x, x_value)
                continue
            source = builder.env[node.args[0]] if args else (None, None)
            if source[1] is not None and isinstance(module, (MaxPool2d, Flatten, Identity, Dropout, AvgPool2d,
                                                              AdaptiveAvgPool2d, ReLU, ReLU6)):
                builder.env[node] = _integer_op(builder, node, module, *source)
                continue
        elif node.op == "call_function" and node.target is F.add and len(args) == 2:
            quantizer, chain, relu = _following_quantizer(qat_model, node)
            inputs = [builder.env[a] for a in args]
            if quantizer is not None and all(v is not None for _, v in inputs):
                value = _value_of(quantizer, chain[-1].name)
                (a, va), (b, vb) = inputs
                module = QuantizedAdd((va.scale, vb.scale), (va.zero_point, vb.zero_point), value.scale,
                                      value.zero_point, value.zero_point if relu else value.qmin, value.qmin,
                                      value.qmax)
                result = builder.add(chain[-1].name, module, (a, b), value)
                builder.env[node] = result
                for absorbed_node in chain:
                    absorbed[absorbed_node] = node
                continue
        elif (node.op == "call_function" and node.target is F.cat and node.args
              and isinstance(node.args[0], (list, tuple)) and all(isinstance(a, Node) for a in node.args[0])):
            result = _integer_cat(builder, node)
            if result is not None:
                builder.env[node], chain = result
                for absorbed_node in chain:
                    absorbed[absorbed_node] = node
                continue
        elif node.op == "call_function" and node.target is F.flatten and args:
            source = builder.env[node.args[0]]
            if source[1] is not None:
                value = replace(source[1], source=node.name)
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                builder.env[node] = builder.add(node.name, Int8Flatten(start, end), (source[0],), value)
                continue
        builder.env[node] = _float_op(builder, node)
    builder.graph.lint()
    int8_model = GraphModule(builder.root, builder.graph, class_name=f"Int8{qat_model.class_name}")
    int8_model.lint()
    object.__setattr__(int8_model, "int8_sources", dict(builder.sources))
    return int8_model.eval()


def _integer_cat(builder: _Builder, node: Node) -> tuple[tuple[Node, Int8Value], list[Node]] | None:
    """A concatenation of integer values followed by its quantizer (and maybe a ReLU) as
    ``Int8Cat`` on the output grid: each input whose (scale, zero point) differ from the
    output's, or that a ReLU clamps, is requantized first. None when it must stay float."""
    quantizer, chain, relu = _following_quantizer(builder.qat, node)
    inputs = [builder.env[a] for a in node.args[0]]
    if quantizer is None or any(v is None for _, v in inputs):
        return None
    out = _value_of(quantizer, chain[-1].name)
    parts = []
    for i, (new, value) in enumerate(inputs):
        if relu or (value.scale, value.zero_point) != (out.scale, out.zero_point):
            out_min = out.zero_point if relu else out.qmin
            new = builder.add(f"{node.name}_requantize_{i}", Requantize(value.scale, value.zero_point, out.scale,
                                                                        out.zero_point, out_min, out.qmin, out.qmax),
                              (new,), None)[0]
        parts.append(new)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return builder.add(chain[-1].name, Int8Cat(dim), tuple(parts), out), chain


def _pair(value) -> tuple[int, int]:
    """An int or a pair, as a pair (the pooling modules keep what the user passed)."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _integer_op(builder: _Builder, node: Node, module: Module, source: Node,
                value: Int8Value) -> tuple[Node, Int8Value | None]:
    if isinstance(module, (Identity, Dropout)):
        return source, value
    # same grid as the input, but this node's values: compare with this QAT node
    value = replace(value, source=node.name)
    if isinstance(module, Flatten):
        return builder.add(node.name, Int8Flatten(module.start_dim, module.end_dim), (source,), value)
    if isinstance(module, MaxPool2d):
        kernel = _pair(module.kernel_size)
        return builder.add(node.name, Int8MaxPool2d(kernel, _pair(module.stride or module.kernel_size),
                                                    _pair(module.padding), _pair(module.dilation)), (source,), value)
    if isinstance(module, (AvgPool2d, AdaptiveAvgPool2d)):
        if isinstance(module, AvgPool2d):
            if _pair(module.padding) != (0, 0):
                raise ConfigError(f"int8 conversion: average pool {node.target!r} with padding is not supported")
            kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        else:
            if module.output_size not in (1, (1, 1)):
                raise ConfigError(f"int8 conversion: adaptive pool {node.target!r} must pool to 1x1")
            kernel = stride = None
        quantizer, chain, _ = _following_quantizer(builder.qat, node)
        if quantizer is None:
            raise ConfigError(f"int8 conversion: average pool {node.target!r} has no quantizer after it")
        out = _value_of(quantizer, chain[-1].name)
        return builder.add(chain[-1].name, Int8AvgPool2d(kernel, stride, value.scale, value.zero_point, out.scale,
                                                         out.zero_point, out.qmin, out.qmax), (source,), out)
    # ReLU / ReLU6: its quantizer follows (preparation puts one after every activation)
    quantizer, chain, _ = _following_quantizer(builder.qat, node)
    if quantizer is None:
        return (source, value) if isinstance(module, ReLU) else _float_op(builder, node)
    out = _value_of(quantizer, chain[-1].name)
    if isinstance(module, ReLU6) and out.qmax - out.zero_point > _quantized_six(out):
        return _float_op(builder, node)  # the grid reaches past 6: the min(., 6) is not the clamp at qmax
    return builder.add(chain[-1].name, Requantize(value.scale, value.zero_point, out.scale, out.zero_point,
                                                  out.zero_point, out.qmin, out.qmax), (source,), out)


def _quantized_six(value: Int8Value) -> int:
    """rne(6 * float32(1 / s)): the grid step of 6.0 above the zero point. When the output grid
    ends at or below it (an observer after a ReLU6 never sees more than 6), min(relu(x), 6)
    followed by the quantizer equals the clamp to [z, qmax], so a ReLU6 converts like a ReLU."""
    return int(np.rint(np.float32(6.0) * (np.float32(1) / np.float32(value.scale))))


def _float_op(builder: _Builder, node: Node) -> tuple[Node, None]:
    """A float operation (a disabled layer, a float BatchNorm, any other op): dequantize its
    integer inputs and run it as it ran in the QAT model."""
    args = map_nodes(node.args, builder.as_float)
    kwargs = map_nodes(node.kwargs, builder.as_float)
    if node.op == "call_module":
        target = node.target.replace(".", "_")
        while target in builder.root._modules:
            target += "_"
        builder.root.add_module(target, builder.qat.get_submodule(node.target))
        return builder.graph.create_node("call_module", target, args, kwargs, name=target), None
    return builder.graph.create_node(node.op, node.target, args, kwargs, name=node.name), None
