"""Every operator qatcore can prepare, convert, save and exchange with ONNX, one file per
family; see :mod:`qatcore.quantization.qat.operators.registry` for what a rule holds and
docs/architecture.md ("Adding an operator") for a walk through adding one.

Importing this package fills the registry (each family module registers its rules when
it is imported).
"""

from __future__ import annotations

from typing import Any

from qatcore.graph.node import Node
from qatcore.quantization.qat.operators import (  # noqa: F401  (imported to register their rules)
    activation,
    arithmetic,
    attention,
    lowbit,
    normalization,
    pooling,
    quantizer,
    shape,
    transformer,
    weighted,
)
from qatcore.quantization.qat.operators.registry import (
    OperatorRule,
    QATRole,
    RecordRule,
    UnregisteredOperatorError,
    call_arguments,
    onnx_import_handler,
    onnx_import_ops,
    onnx_import_reads_tables,
    register,
    register_onnx_import,
    registered_names,
    registered_rules,
    rule_for_function,
    rule_for_module,
    rule_for_record,
    rule_for_target,
)

__all__ = [
    "OperatorRule", "QATRole", "RecordRule", "UnregisteredOperatorError", "register", "register_onnx_import",
    "rule_for_module", "rule_for_function", "rule_for_target", "rule_for_record", "rule_for_node", "call_arguments",
    "onnx_import_handler", "onnx_import_ops", "onnx_import_reads_tables", "registered_rules", "registered_names",
]


def rule_for_node(node: Node, module: Any | None = None) -> OperatorRule:
    """The rule of a ``call_module`` node (``module`` is the called module) or a
    ``call_function`` node."""
    if node.op == "call_module":
        return rule_for_module(module)
    return rule_for_function(node.target)
