"""Dead-code elimination: erase every node whose value nothing uses.

Inputs stay (they are the model's signature). A ``call_module`` or
``call_function`` node is removed only when it has no users; modules are assumed
free of side effects that matter (the one exception in qatcore, a BatchNorm
running-statistics update, is never dead because its output is used).
"""

from __future__ import annotations

from qatcore.graph.graph_module import GraphModule
from qatcore.graph.passes.pass_result import PassResult

__all__ = ["eliminate_dead_code"]


def eliminate_dead_code(gm: GraphModule) -> PassResult:
    """Erase unused nodes, last first, until none is left."""
    changed = False
    for node in reversed(gm.graph.nodes):
        if node.op in ("input", "output") or node.users:
            continue
        gm.graph.erase(node)
        changed = True
    return PassResult(gm, changed)
