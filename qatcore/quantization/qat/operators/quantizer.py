"""Quantizers and the int8 model's edges: FakeQuantize, Quantize, Dequantize, Requantize.

QAT: a ``FakeQuantize`` is where a value gets its grid. Conversion: on a float value it
becomes ``Quantize``; on an integer value on another grid, ``Requantize``; on the same
grid, nothing. ONNX: ``QuantizeLinear -> DequantizeLinear`` in a QAT model; the int8
model's ``Quantize`` / ``Dequantize`` are ``QuantizeLinear`` / ``DequantizeLinear``, and a
``Requantize`` is the pair ``DequantizeLinear -> QuantizeLinear``.
"""

from __future__ import annotations

from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.int8_layers import Dequantize, Quantize, Requantize
from qatcore.quantization.qat.operators.registry import OperatorRule, QATRole, RecordRule, register

__all__ = ["int8_record", "module_record"]


def int8_record(cls: type) -> RecordRule:
    """The record of an int8 runtime module: its ``record_config()``, rebuilt by ``from_config``."""
    return RecordRule(config=lambda module: module.record_config(), build=cls.from_config)


def module_record(cls: type, *settings: str) -> RecordRule:
    """The record of a float layer rebuilt as ``cls(**{setting: value})`` (Softmax's ``dim``,
    a pool's window), kept in an int8 model as a float island."""
    def config(module) -> dict:
        return {name: _plain(getattr(module, name)) for name in settings}

    def build(config: dict):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})

    return RecordRule(config=config, build=build)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _lower_fake_quantize(ctx, node, module: FakeQuantize):
    if not bool(module.fake_quant_enabled.data):
        return ctx.env[node.args[0]]  # switched off (preparer.disable): the value passes as it is
    value = ctx.value_of(module, node.name)
    new, current = ctx.env[node.args[0]]
    if current is None:
        return ctx.add(node.name, Quantize(value.scale, value.zero_point, value.qmin, value.qmax, ctx.requantization),
                       (new,), value)
    if (current.scale, current.zero_point) == (value.scale, value.zero_point):
        return new, value
    return ctx.add(node.name, Requantize(current.scale, current.zero_point, value.scale, value.zero_point,
                                         value.qmin, value.qmin, value.qmax, ctx.requantization), (new,), value)


def _export_fake_quantize(ex, node, module: FakeQuantize):
    return ex.qdq(ex.float_input(node, node.args[0]), module, node.target), None


def _export_quantize(ex, node, module: Quantize):
    grid = ex.out_grid(module)
    return ex.quantize(ex.float_input(node, node.args[0]), grid, node.target), grid


def _export_dequantize(ex, node, module: Dequantize):
    return ex.dequantize(node.args[0], node.target), None


def _export_requantize(ex, node, module: Requantize):
    grid = ex.out_grid(module)
    # a Relu where the clamp starts at the zero point, even where the range starts there too
    relu = int(module.clamp_min.data) == grid.zero_point
    name = node.target
    return ex.quantize(ex.dequantize(node.args[0], name), grid, name, relu, separate=True), grid


register(
    OperatorRule(FakeQuantize, qat=QATRole.QUANTIZER, lower=_lower_fake_quantize, export=_export_fake_quantize),
    OperatorRule(Quantize, export=_export_quantize, record=int8_record(Quantize)),
    OperatorRule(Dequantize, export=_export_dequantize, record=int8_record(Dequantize)),
    OperatorRule(Requantize, export=_export_requantize, record=int8_record(Requantize)),
)
