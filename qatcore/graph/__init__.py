"""The module graph IR: nodes, graphs, GraphModule, the tracer, pattern matching and passes.

See docs/ir.md for the grammar, the invariants lint checks and how to write a pass.
"""

from qatcore.graph.graph import Graph
from qatcore.graph.graph_module import GraphModule
from qatcore.graph.node import OPCODES, Node
from qatcore.graph.passes import PassResult, eliminate_dead_code, fuse_for_inference, propagate_shapes
from qatcore.graph.pattern import (
    find_chains,
    node_matches,
    replace_chain_with_module,
    replace_chain_with_subgraph,
)
from qatcore.graph.tracer import Proxy, Tracer, copy_graph, trace

__all__ = ["Graph", "GraphModule", "Node", "OPCODES", "PassResult", "Proxy", "Tracer", "trace",
           "propagate_shapes", "eliminate_dead_code", "fuse_for_inference", "find_chains",
           "node_matches", "replace_chain_with_module", "replace_chain_with_subgraph", "copy_graph"]
