"""The operator registry: everything qatcore knows about one operator, in one entry.

An operator is a *target* that can stand in a graph node: a module type (``ReLU``,
``QATLinear``, ``Int8Linear``) or a function of :mod:`qatcore.nn.functional`
(``F.add``). Its :class:`OperatorRule` says

- ``qat``: how preparation treats it (:class:`QATRole`): does its output need a new
  activation quantizer, keep its input's grid, stay float, or is it a layer with weights;
  ``quantize_after_activation``: an activation right after it takes its quantizer instead
  (the int8 op then fuses a ReLU as its clamp);
- ``index_input``: its first input holds integer indices (an embedding lookup), so
  preparation never puts a quantizer on a value only such operators read;
- ``to_qat``: for a layer with weights, how to build its QAT layer;
- ``lower``: how conversion turns the QAT node into int8 runtime nodes (``None``: it
  stays a float operation between Dequantize and Quantize);
- ``export``: how ONNX export writes it;
- ``record``: how an int8 model file stores it (int8 runtime modules, and the float
  layers an int8 model may keep);
- ``example``: a tiny model that uses it, so the registry-wide test walks it through
  prepare -> train -> convert -> save/load -> ONNX Runtime; or ``example_missing``: why
  that walk cannot take it (the registry-wide test requires one of the two for every
  user-facing operator, and the reason says where the operator is tested instead).

ONNX import goes the other way, from an ONNX operator type to qatcore layers, so it
has its own table (:func:`register_onnx_import`), filled in the same family files. The
importer computes a node whose inputs are all constants itself (constant folding), unless
its handler reads tables: then a float initializer as its first input (an embedding table
sliced or gathered) goes to the handler, which keeps it a trainable Parameter.

Rules are plain data filled in next to the definitions they describe, one file per
op family (``activation.py``, ``weighted.py``, ...), as JAX's autodidax fills its
rule tables. Preparation, conversion, the int8 serializer and ONNX export/import
only look rules up; asking for a target nobody registered raises
:class:`UnregisteredOperatorError`, which lists the registered ones.

>>> from qatcore.nn import ReLU
>>> from qatcore.quantization.qat.operators import rule_for_module
>>> rule_for_module(ReLU()).qat
<QATRole.ACTIVATION: 'activation'>
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from qatcore.errors import ConfigError

__all__ = [
    "QATRole", "OperatorRule", "RecordRule", "UnregisteredOperatorError", "register", "register_onnx_import",
    "rule_for_module", "rule_for_function", "rule_for_target", "rule_for_record", "onnx_import_handler",
    "onnx_import_reads_tables", "registered_rules", "registered_names", "onnx_import_ops", "call_arguments",
]


class QATRole(enum.Enum):
    """What preparation does around an operator (where the int8 model holds integers).

    - ``WEIGHTED``: a layer with weights; the layer-wise config decides, and its QAT layer
      fake-quantizes the weight and the output;
    - ``ACTIVATION``: an elementwise activation; a new quantizer after it, and an add,
      multiplication or concatenation right before it is quantized after it instead;
    - ``NEW_GRID``: computes values off its input's grid (a sum, a mean): a quantizer after it;
    - ``INPUT_GRID``: its outputs are some of its input's values (max pooling, reshapes):
      no quantizer, the input's grid carries through;
    - ``QUANTIZER``: a FakeQuantize, or a QAT layer that quantizes its own output;
    - ``FLOAT``: stays a float operation; its output is not quantized.
    """

    WEIGHTED = "weighted"
    ACTIVATION = "activation"
    NEW_GRID = "new_grid"
    INPUT_GRID = "input_grid"
    QUANTIZER = "quantizer"
    FLOAT = "float"


@dataclass(frozen=True)
class RecordRule:
    """How an int8 model file stores a module: ``config(module) -> dict`` of plain values
    (its settings; the file stores its state beside them), and ``build(config) -> module``,
    a module with those settings whose state is then loaded from the file."""

    config: Callable[[Any], dict]
    build: Callable[[dict], Any]


@dataclass(frozen=True)
class OperatorRule:
    """One operator's entry (module docstring). Only ``target`` is required."""

    target: Any
    qat: QATRole = QATRole.FLOAT
    quantize_after_activation: bool = False
    index_input: bool = False
    to_qat: Callable | None = None
    lower: Callable | None = None
    export: Callable | None = None
    record: RecordRule | None = None
    example: Callable | None = None
    example_missing: str | None = None

    @property
    def name(self) -> str:
        return getattr(self.target, "__qualname__", None) or getattr(self.target, "__name__", repr(self.target))


class UnregisteredOperatorError(ConfigError):
    """A graph holds an operator no rule describes."""


_BY_TARGET: dict[Any, OperatorRule] = {}
_BY_RECORD: dict[str, OperatorRule] = {}
_ONNX_IMPORT: dict[str, Callable] = {}
_ONNX_TABLE_READERS: set[str] = set()


def register(*rules: OperatorRule) -> None:
    """Add rules; a target registered twice is a programming error, refused."""
    for rule in rules:
        if rule.target in _BY_TARGET:
            raise ConfigError(f"operator {rule.name} is registered twice")
        _BY_TARGET[rule.target] = rule
        if rule.record is not None:
            _BY_RECORD[rule.target.__name__] = rule


def register_onnx_import(op_type: str, handler: Callable, reads_tables: bool = False) -> None:
    """``handler(importer, onnx_node)`` builds the qatcore value of one ONNX node (a tuple of
    values for a node with several outputs). ``reads_tables``: it also takes the nodes whose
    inputs are all constants when the first is a float initializer (module docstring)."""
    if op_type in _ONNX_IMPORT:
        raise ConfigError(f"ONNX operator {op_type} has two import handlers")
    _ONNX_IMPORT[op_type] = handler
    if reads_tables:
        _ONNX_TABLE_READERS.add(op_type)


def _unregistered(what: str) -> UnregisteredOperatorError:
    return UnregisteredOperatorError(f"{what} is not a registered operator; registered: "
                                     f"{', '.join(registered_names())} (see docs/architecture.md, "
                                     f"'Adding an operator')")


def rule_for_module(module: Any) -> OperatorRule:
    """The rule of a module's exact type, else of its nearest registered base class."""
    for cls in type(module).__mro__:
        rule = _BY_TARGET.get(cls)
        if rule is not None:
            return rule
    raise _unregistered(f"module type {type(module).__name__}")


def rule_for_function(function: Callable) -> OperatorRule:
    rule = _BY_TARGET.get(function)
    if rule is None:
        raise _unregistered(f"function {getattr(function, '__name__', function)}")
    return rule


def rule_for_target(target: Any) -> OperatorRule | None:
    """The rule registered for exactly ``target``, or None."""
    return _BY_TARGET.get(target)


def rule_for_record(type_name: str) -> OperatorRule:
    """The rule of a module type stored in an int8 model file, by its class name."""
    rule = _BY_RECORD.get(type_name)
    if rule is None:
        raise ConfigError(f"unknown module type {type_name!r} in an int8 model; known: {sorted(_BY_RECORD)}")
    return rule


def onnx_import_handler(op_type: str) -> Callable | None:
    return _ONNX_IMPORT.get(op_type)


def onnx_import_reads_tables(op_type: str) -> bool:
    return op_type in _ONNX_TABLE_READERS


def onnx_import_ops() -> tuple[str, ...]:
    return tuple(sorted(_ONNX_IMPORT))


def registered_rules() -> tuple[OperatorRule, ...]:
    return tuple(_BY_TARGET.values())


def registered_names() -> list[str]:
    return sorted(rule.name for rule in _BY_TARGET.values())


def call_arguments(node) -> dict[str, Any]:
    """The arguments of a ``call_function`` node by parameter name, defaults filled in
    (``F.max_pool2d(x, 2)`` -> ``{"x": x, "kernel_size": 2, "stride": None, ...}``)."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"node {node.name!r} calls {getattr(node.target, '__name__', node.target)} with "
                          f"arguments it does not take: {e}") from e
    bound.apply_defaults()
    return dict(bound.arguments)
