"""The converted model: a graph of int8 runtime modules that knows where its values come from.

:class:`Int8Model` is a :class:`~qatcore.graph.GraphModule` whose nodes are int8
runtime modules (and float islands); ``value_sources`` maps each node that holds an
integer value to :class:`ValueSource`: the QAT node whose output it reproduces and the
(scale, zero point) that turn its integers back into reals. ``parity_report``
compares the two models through it; the int8 file format stores it.

:class:`Int8Value` is the conversion-time view of one integer value: its grid (scale,
zero point, integer range ``qmin..qmax``) and its source.
"""

from __future__ import annotations

from dataclasses import dataclass

from qatcore.errors import ConfigError
from qatcore.graph import Graph, GraphModule
from qatcore.graph.node import Node
from qatcore.nn.module import Module
from qatcore.quantization.fake_quantize_module import FakeQuantize

__all__ = ["Int8Model", "Int8Value", "ValueSource", "ExecutionPlan"]


@dataclass(frozen=True)
class Int8Value:
    """The quantization of one integer value: real = (q - zero_point) * scale with q in
    [qmin, qmax], and the QAT node (a FakeQuantize) whose output it reproduces."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    source: str

    @classmethod
    def of_quantizer(cls, quantizer: FakeQuantize, source: str) -> Int8Value:
        """The grid of activation quantizer ``quantizer``, checked to be one the int8 runtime
        can hold (per tensor, at most 8 bits; ConfigError naming the quantizer otherwise, and
        ObserverError if it never observed anything)."""
        qparams = quantizer.calculate_qparams()
        if qparams.scale.size != 1:
            raise ConfigError(f"int8 conversion: activation quantizer {quantizer.name!r} is per channel; "
                              f"the int8 runtime needs per-tensor activations")
        if qparams.dtype.bits > 8:
            raise ConfigError(f"int8 conversion: activation quantizer {quantizer.name!r} uses {qparams.dtype}; "
                              f"the int8 runtime needs activations of at most 8 bits (set activation.bits to 8)")
        return cls(float(qparams.scale[0]), int(qparams.zero_point[0]), qparams.qmin, qparams.qmax, source)


@dataclass(frozen=True)
class ValueSource:
    """Where an int8 node's integers come from: the QAT node ``source`` and the grid
    (``scale``, ``zero_point``) on which they equal that node's values."""

    source: str
    scale: float
    zero_point: int


class ExecutionPlan:
    """How an :class:`Int8Model` runs a forward: its graph compiled once into steps, each a
    module call whose arguments are numbered slots (or constants), so a call is a loop over
    the steps with none of the per-node work of ``GraphModule.run`` (argument mapping, an
    environment keyed by node). Installed as the model's ``interpreter``; it returns
    NotImplemented, leaving the call to ``GraphModule.run``, for keyword inputs, an observer
    (``parity_report``), and a graph it cannot compile (a node other than an input, a module
    call on positional nodes and constants, or an output of one node). The steps are remade
    when the graph's nodes change; modules are looked up by name at each call, so a replaced
    submodule is the one called, with its hooks."""

    def __init__(self) -> None:
        self._nodes: list | None = None
        self._steps: list | None = None

    def __call__(self, gm: GraphModule, args: tuple, kwargs: dict, observe=None):
        if kwargs or observe is not None:
            return NotImplemented
        nodes = gm.graph.nodes
        if self._nodes is None or len(nodes) != len(self._nodes) or any(a is not b for a, b in zip(nodes,
                                                                                                     self._nodes)):
            self._steps, self._nodes = _compile(nodes), nodes
        if self._steps is None:
            return NotImplemented
        inputs, steps, result = self._steps
        if len(args) != inputs:
            return NotImplemented
        values = list(args) + [None] * len(steps)
        get = gm.get_submodule
        for slot, (target, arguments) in enumerate(steps, inputs):
            values[slot] = get(target)(*[values[a] if type(a) is int else a.value for a in arguments])
        return values[result]


class _Constant:
    """A constant argument of a step (slots are ints)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


def _compile(nodes: list) -> tuple | None:
    """(number of inputs, [(module name, argument slots and constants)], output slot), or None."""
    slots: dict = {}
    inputs, steps = 0, []
    for node in nodes:
        if node.op == "input":
            if steps:
                return None
            slots[node] = inputs
            inputs += 1
        elif node.op == "call_module" and not node.kwargs:
            arguments = []
            for a in node.args:
                if isinstance(a, Node):
                    if a not in slots:
                        return None
                    arguments.append(slots[a])
                elif a is None or isinstance(a, (int, float, str)):
                    arguments.append(_Constant(a))
                else:
                    return None
            slots[node] = inputs + len(steps)
            steps.append((node.target, tuple(arguments)))
        elif node.op == "output" and len(node.args) == 1 and isinstance(node.args[0], Node) and node.args[0] in slots:
            return inputs, steps, slots[node.args[0]]
        else:
            return None
    return None


class Int8Model(GraphModule):
    """A converted, integer-only model (module docstring). Calling it on float inputs
    returns dequantized float outputs; a forward runs the :class:`ExecutionPlan` of its graph."""

    def __init__(self, root: Module, graph: Graph, class_name: str | None,
                 value_sources: dict[str, ValueSource]) -> None:
        super().__init__(root, graph, class_name)
        self.value_sources = dict(value_sources)
        self.interpreter = ExecutionPlan()
