"""Shape propagation: run the graph once on example inputs and record each node's
output ``shape`` and ``dtype`` in ``node.meta``.

It runs without recording gradients and with the model temporarily in eval mode,
so it changes no state (BatchNorm running statistics, dropout generators).
Tuple outputs record a tuple of shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qatcore.autograd import no_grad
from qatcore.graph.graph_module import GraphModule
from qatcore.graph.node import Node
from qatcore.graph.passes.pass_result import PassResult
from qatcore.tensor import Tensor

__all__ = ["propagate_shapes"]


def _describe(value: Any) -> tuple[Any, Any] | None:
    if isinstance(value, (Tensor, np.ndarray)):
        return tuple(value.shape), value.dtype
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, (Tensor, np.ndarray)) for v in value):
        return tuple(tuple(v.shape) for v in value), tuple(v.dtype for v in value)
    return None


def propagate_shapes(gm: GraphModule, *example_inputs) -> PassResult:
    """Record ``meta["shape"]`` and ``meta["dtype"]`` on every node that yields arrays."""
    modes = {m: m.training for m in gm.modules()}

    def observe(node: Node, value: Any) -> None:
        described = _describe(value)
        if described is not None:
            node.meta["shape"], node.meta["dtype"] = described

    gm.eval()
    try:
        with no_grad():
            result = gm.run(tuple(example_inputs), {}, observe)
    finally:
        for module, mode in modes.items():
            module.training = mode
    described = _describe(result)
    if described is not None:
        output = gm.graph.output_node
        output.meta["shape"], output.meta["dtype"] = described
    return PassResult(gm, False)
