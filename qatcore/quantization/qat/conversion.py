"""Conversion of a trained QAT model to an integer-only int8 model.

An eager-mode QAT model (no graph: its forward branches on tensor values) converts by
:mod:`qatcore.quantization.qat.eager_conversion`: a copy of its own module tree with each
QAT layer an int8 island. The rest of this docstring is about graph-mode models.

The QAT graph is walked in order. Every value gets the quantization parameters of
the FakeQuantize that defined it in training, and every node is lowered by its
operator's rule (:mod:`qatcore.quantization.qat.operators`): the rule's ``lower``
returns the int8 runtime node that computes it, or ``None``, and then the node stays
a float operation with ``Dequantize`` before it and ``Quantize`` after it. What each
operator becomes is written next to its rule, for example:

- an activation quantizer on a float value becomes ``Quantize``; on an integer value
  with other parameters, ``Requantize``; with the same ones, nothing;
- ``QATLinear`` / ``QATConv2d`` / ``QATConvBn2d`` become ``Int8Linear`` / ``Int8Conv2d``
  (BatchNorm folded with its running statistics, bias on the int32 grid at s_x * s_w,
  per-channel requantization, a fused ReLU as the clamp's lower bound);
- a residual add becomes ``Int8Add``, a concatenation ``Int8Cat``; pooling and
  reshapes run on the integers; a ReLU is a clamp at the zero point;
- an elementwise activation between two quantizers (Sigmoid, Tanh, LeakyReLU,
  Hardswish, ...) becomes ``Int8Lookup``, a table of the QAT computation on every input
  integer;
- model outputs get ``Dequantize``;
- a ``QATLinear`` / ``QATEmbedding`` with low-bit weights (per group, ternary: the LLM
  schemes) becomes a ``LowBitLinear`` / ``LowBitEmbedding`` (packed 2- and 4-bit weights,
  per-token int8 activations computed at run time), float in and float out
  (``operators/lowbit.py``); the layers around it (LayerNorm, GELU, attention) stay float,
  and the converted model equals the QAT model's eval bit for bit.

Nothing between a Quantize and a Dequantize computes in floating point (a test
walks the converted graph and checks every node).
"""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError
from qatcore.graph import Graph, GraphModule
from qatcore.graph.graph import resolve_attribute
from qatcore.graph.node import Node, map_nodes
from qatcore.nn import functional as F
from qatcore.nn.activation import ReLU
from qatcore.nn.module import Module
from qatcore.quantization.config import Requantization
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.int8_layers import Dequantize
from qatcore.quantization.qat.eager_conversion import convert_eager_model
from qatcore.quantization.qat.int8_model import Int8Model, Int8Value, ValueSource
from qatcore.quantization.qat.operators import rule_for_node
from qatcore.quantization.qat.training_integration import QATController
from qatcore.tensor import Tensor

__all__ = ["convert_to_quantized", "ConversionContext", "lower_graph"]

Lowered = tuple[Node, Int8Value | None]


def requantization_of(qat_model: Module) -> Requantization:
    """The requantization arithmetic the model was prepared with (its global config's; a
    model without a QAT controller: fixed point)."""
    for module in qat_model.modules():
        if isinstance(module, QATController):
            return module.layerwise_config.global_config.requantization
    return Requantization.FIXED_POINT


class ConversionContext:
    """What a rule's ``lower(ctx, node, module)`` works with: the QAT model, the int8 graph
    being built, and the int8 node (with its grid, None for a float value) of every QAT node
    converted so far."""

    def __init__(self, qat_model: GraphModule) -> None:
        self.qat = qat_model
        self.requantization = requantization_of(qat_model)
        self.graph = Graph()
        self.root = Module()
        self.env: dict[Node, Lowered] = {}
        self.sources: dict[str, ValueSource] = {}
        self.absorbed: dict[Node, Node] = {}  # QAT node -> the QAT node whose int8 result stands for it
        self._targets: set[str] = set()

    def input(self, node: Node, value) -> Lowered:
        """A model input (``value`` is what the caller passed; unused when building a graph)."""
        return self.graph.input(node.target), None

    def output(self, node: Node):
        self.graph.output(map_nodes(node.args[0], self.as_float))

    def add(self, name: str, module: Module, args: tuple, value: Int8Value | None) -> Lowered:
        """Register ``module`` under a fresh name made from ``name`` and call it on ``args``."""
        target = self._fresh(name)
        self.root.add_module(target, module)
        node = self.graph.create_node("call_module", target, args, name=target)
        if value is not None:
            self.sources[node.name] = ValueSource(value.source, value.scale, value.zero_point)
        return node, value

    def _fresh(self, name: str) -> str:
        target = name.replace(".", "_")
        while target in self._targets:
            target += "_"
        self._targets.add(target)
        return target

    def constant(self, node: Node) -> Node:
        """A parameter or buffer the QAT graph reads directly (a functional layer's weight), as a
        constant buffer of the int8 model: it feeds float operations only."""
        value = resolve_attribute(self.qat, node.target, node)
        target = self._fresh(node.target)
        array = value.data if isinstance(value, Tensor) else np.asarray(value)
        self.root.register_buffer(target, np.array(array))
        return self.graph.create_node("get_attr", target, name=target)

    def as_float(self, node: Node) -> Node:
        """The int8-graph value of QAT node ``node`` as floats (dequantized where integer)."""
        new, value = self.env[node]
        if value is None:
            return new
        return self.add(f"{node.name}_dequantize", Dequantize(value.scale, value.zero_point), (new,), None)[0]

    def as_int(self, node: Node, what: str) -> tuple[Node, Int8Value]:
        """The integer value of QAT node ``node``; ConfigError when it is a float value."""
        new, value = self.env[node]
        if value is None:
            raise ConfigError(f"int8 conversion: {what} receives an unquantized value from {node.name!r}")
        return new, value

    def absorb(self, chain: list[Node], into: Node) -> None:
        """The nodes of ``chain`` (a fused ReLU, the quantizer after an op) are computed by ``into``."""
        for node in chain:
            self.absorbed[node] = into

    def value_of(self, quantizer: FakeQuantize, source: str) -> Int8Value:
        """The grid of an activation quantizer, checked to be one the int8 runtime can hold."""
        return Int8Value.of_quantizer(quantizer, source)

    def following_quantizer(self, node: Node, fuse_relu: bool = True) -> tuple[FakeQuantize | None, list[Node], bool]:
        """The activation quantizer right after ``node`` (possibly after one ReLU, when
        ``fuse_relu``), the nodes the int8 op absorbs, and whether a ReLU is among them."""
        chain, relu = [], False
        current = node
        for _ in range(2):
            if len(current.users) != 1:
                return None, [], False
            (user,) = current.users
            module = self.qat.get_submodule(user.target) if user.op == "call_module" else None
            if isinstance(module, FakeQuantize):
                return module, chain + [user], relu
            if fuse_relu and not relu and (isinstance(module, ReLU) or user.target is F.relu):
                chain.append(user)
                relu, current = True, user
                continue
            return None, [], False
        return None, [], False

    def between_quantizers(self, node: Node) -> tuple[Node, Int8Value, Int8Value, str] | None:
        """For a one-input op whose input is an integer value and whose only user is a
        quantizer: (the input's int8 node, its grid, the output grid, the name for the int8
        node), with the quantizer absorbed into the op. None otherwise (the op stays float)."""
        new, value = self.env[node.args[0]]
        if value is None:
            return None
        quantizer, chain, _ = self.following_quantizer(node, fuse_relu=False)
        if quantizer is None:
            return None
        out = self.value_of(quantizer, chain[-1].name)
        self.absorb(chain, node)
        return new, value, out, chain[-1].name

    def float_op(self, node: Node) -> tuple[Node, None]:
        """``node`` as a float operation (a disabled layer, a float BatchNorm, any op without
        an integer form): its integer inputs dequantized, run as it ran in the QAT model."""
        args = map_nodes(node.args, self.as_float)
        kwargs = map_nodes(node.kwargs, self.as_float)
        if node.op == "call_module":
            target = self._fresh(node.target)
            self.root.add_module(target, self.qat.get_submodule(node.target))
            return self.graph.create_node("call_module", target, args, kwargs, name=target), None
        return self.graph.create_node(node.op, node.target, args, kwargs, name=node.name), None


def lower_graph(ctx: ConversionContext, inputs: tuple = (), observe=None):
    """Walk the QAT graph in order and lower every node by its rule into ``ctx`` (module
    docstring): building the int8 graph (``ConversionContext``) or computing it on
    ``inputs`` (``qatcore.quantization.qat.integer_eval``). ``observe(node, lowered)``
    sees each QAT node's int8 result. Returns what ``ctx.output`` returns."""
    positional = list(inputs)
    for node in ctx.qat.graph.nodes:
        if node in ctx.absorbed:
            ctx.env[node] = ctx.env[ctx.absorbed[node]]
        elif node.op == "input":
            ctx.env[node] = ctx.input(node, positional.pop(0) if positional else None)
        elif node.op == "output":
            return ctx.output(node)
        elif node.op == "get_attr":
            ctx.env[node] = (ctx.constant(node), None)
        else:
            module = ctx.qat.get_submodule(node.target) if node.op == "call_module" else None
            rule = rule_for_node(node, module)
            lowered = rule.lower(ctx, node, module) if rule.lower is not None else None
            ctx.env[node] = lowered if lowered is not None else ctx.float_op(node)
        if observe is not None:
            observe(node, ctx.env[node])
    return None


def convert_to_quantized(qat_model: Module) -> Module:
    """The integer-only int8 model of a trained QAT model (module docstring).

    A graph-mode model gives an :class:`Int8Model`: calling it on a float array or Tensor
    returns dequantized float outputs, and ``result.value_sources`` maps each integer-valued
    int8 node to the QAT node whose value it reproduces
    (:class:`~qatcore.quantization.qat.int8_model.ValueSource`). An eager-mode model gives a
    copy of the model's own classes with each QAT layer an ``Int8Island`` (float in, float
    out; :func:`~qatcore.quantization.qat.eager_conversion.convert_eager_model`).
    """
    if not isinstance(qat_model, GraphModule):
        return convert_eager_model(qat_model, requantization_of(qat_model))
    ctx = ConversionContext(qat_model)
    lower_graph(ctx)
    ctx.graph.lint()
    int8_model = Int8Model(ctx.root, ctx.graph, f"Int8{qat_model.class_name}", ctx.sources)
    int8_model.lint()
    return int8_model.eval()
