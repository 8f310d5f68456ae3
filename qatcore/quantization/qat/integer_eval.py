"""The eval-mode forward of a graph-mode QAT model: the int8 model's own arithmetic.

A QAT model trains on the float simulation (fake quantization, the straight-through
estimator). Evaluated without gradients (``model.eval()`` under ``no_grad``, as
``evaluate_accuracy``, ``predict`` and ``parity_report`` do), it computes instead what
its converted int8 model computes: the QAT graph is walked with the conversion rules
of :mod:`qatcore.quantization.qat.operators`, and each rule's int8 runtime modules run
at once on the integers (``Int8Conv2d``'s exact int32 accumulator and fixed-point
requantization, ``Int8Add``, ``Requantize``, the lookup tables, ...), instead of being
collected into a graph. Every quantizer's output is then the dequantized integer the
int8 model holds at that point, so ``parity_report`` finds the two equal at every layer,
at any depth (docs/numerics.md, "Parity").

The eval forward falls back to the float simulation, and says why in
``IntegerEval.fallback_reason``, where the int8 runtime cannot hold the model
(``convert_to_quantized`` refuses it: weights-only layers, activations over 8 bits, ...)
or where gradients are wanted (eval mode with grad enabled stays differentiable).

>>> import numpy as np
>>> from qatcore.autograd import no_grad
>>> from qatcore.models import DigitsCNN
>>> from qatcore.quantization.qat import QATPreparer, parity_report
>>> preparer = QATPreparer()
>>> qat = preparer.prepare_for_qat(DigitsCNN())
>>> x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
>>> _ = qat(x)                                    # training mode: observe
>>> report = parity_report(qat, preparer.convert_to_quantized(qat), x)
>>> report.output.exact, report.output.max_lsb
(1.0, 0.0)
"""

from __future__ import annotations

from qatcore.autograd import is_grad_enabled
from qatcore.errors import ConfigError
from qatcore.graph.graph import resolve_attribute
from qatcore.graph.graph_module import GraphModule
from qatcore.graph.node import Node, map_nodes
from qatcore.nn.module import Module
from qatcore.quantization.int8_layers import Dequantize
from qatcore.quantization.qat.conversion import ConversionContext, lower_graph
from qatcore.quantization.qat.int8_model import Int8Value

__all__ = ["IntegerEval", "IntegerEvalContext"]


class IntegerEvalContext(ConversionContext):
    """A conversion context that runs each int8 module on arrays as it is made, instead of
    adding it to a graph: ``env`` holds each QAT node's integer array (with its grid) or
    float Tensor (grid None)."""

    def input(self, node: Node, value):
        return value, None

    def output(self, node: Node):
        return map_nodes(node.args[0], self.as_float)

    def add(self, name: str, module: Module, args: tuple, value: Int8Value | None):
        return module(*args), value

    def as_float(self, node: Node):
        array, value = self.env[node]
        return array if value is None else self.dequantize(array, value)

    @staticmethod
    def dequantize(array, value: Int8Value):
        return Dequantize(value.scale, value.zero_point)(array)

    def constant(self, node: Node):
        return resolve_attribute(self.qat, node.target, node)

    def float_op(self, node: Node):
        args = map_nodes(node.args, self.as_float)
        kwargs = map_nodes(node.kwargs, self.as_float)
        if node.op == "call_module":
            return self.qat.get_submodule(node.target)(*args, **kwargs), None
        return node.target(*args, **kwargs), None


class IntegerEval:
    """Installed on a graph-mode QAT model as ``GraphModule.interpreter`` by preparation:
    in eval mode, without gradients, its forward is the int8 arithmetic (module docstring).
    ``fallback_reason`` is None, or why the last eval forward used the float simulation."""

    def __init__(self) -> None:
        self.fallback_reason: str | None = None

    def __call__(self, gm: GraphModule, args: tuple, kwargs: dict, observe=None):
        if gm.training:
            return NotImplemented
        if is_grad_enabled():
            self.fallback_reason = "gradients are enabled (evaluate under no_grad for the integer arithmetic)"
            return NotImplemented
        if kwargs:
            self.fallback_reason = "inputs given by keyword"
            return NotImplemented
        ctx = IntegerEvalContext(gm)
        seen = None if observe is None else (lambda node, lowered: observe(node, ctx.as_float(node)))
        try:
            result = lower_graph(ctx, args, seen)
        except ConfigError as e:  # the int8 runtime cannot hold this model: the float simulation
            self.fallback_reason = str(e)
            return NotImplemented
        self.fallback_reason = None
        return result
