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
from qatcore.nn.module import Module
from qatcore.quantization.fake_quantize_module import FakeQuantize

__all__ = ["Int8Model", "Int8Value", "ValueSource"]


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


class Int8Model(GraphModule):
    """A converted, integer-only model (module docstring). Calling it on float inputs
    returns dequantized float outputs."""

    def __init__(self, root: Module, graph: Graph, class_name: str | None,
                 value_sources: dict[str, ValueSource]) -> None:
        super().__init__(root, graph, class_name)
        self.value_sources = dict(value_sources)
