"""Pattern matching: find chains of operations such as Conv2d -> BatchNorm2d -> ReLU.

A pattern is a sequence of *elements*, each either a Module type (matches a
``call_module`` node whose module is an instance of it) or a function (matches a
``call_function`` node with that target). A match is a chain of nodes where each
node's first argument is the previous node, and every node but the last has
exactly one user (the next one), so the chain can be replaced as a unit without
changing what anything else sees.

>>> import numpy as np
>>> from qatcore import nn
>>> from qatcore.graph import trace
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3, rng=np.random.default_rng(0)), nn.BatchNorm2d(2), nn.ReLU())
>>> gm = trace(model)
>>> [[n.name for n in match] for match in find_chains(gm, [nn.Conv2d, nn.BatchNorm2d, nn.ReLU])]
[['_0', '_1', '_2']]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from qatcore.graph.graph_module import GraphModule
from qatcore.graph.node import Node
from qatcore.nn.module import Module

__all__ = ["node_matches", "find_chains", "replace_chain_with_module", "replace_chain_with_subgraph"]


def node_matches(gm: GraphModule, node: Node, element: Any) -> bool:
    """Does ``node`` match one pattern element (a Module type or a function)?"""
    if isinstance(element, type) and issubclass(element, Module):
        return node.op == "call_module" and isinstance(gm.get_submodule(node.target), element)
    return node.op == "call_function" and node.target is element


def find_chains(gm: GraphModule, pattern: Sequence[Any]) -> list[list[Node]]:
    """Every non-overlapping chain of nodes matching ``pattern``, in graph order."""
    matches: list[list[Node]] = []
    used: set[Node] = set()
    for start in gm.graph.nodes:
        if start in used or not node_matches(gm, start, pattern[0]):
            continue
        chain = [start]
        for element in pattern[1:]:
            last = chain[-1]
            if len(last.users) != 1:
                break
            nxt = next(iter(last.users))
            if nxt in used or not nxt.args or nxt.args[0] is not last or not node_matches(gm, nxt, element):
                break
            if sum(1 for n in nxt.all_input_nodes if n is last) != 1:
                break
            chain.append(nxt)
        if len(chain) == len(pattern):
            matches.append(chain)
            used.update(chain)
    return matches


def replace_chain_with_module(gm: GraphModule, chain: list[Node], name: str, module: Module,
                              make_args: Callable[[list[Node]], tuple] | None = None) -> Node:
    """Replace ``chain`` by one call of ``module``, registered on ``gm`` under ``name``
    (a dotted path; the parent must exist). The new node takes the first node's
    arguments (or ``make_args(chain)``) and stands where the last node stood."""
    parent_path, _, leaf = name.rpartition(".")
    gm.get_submodule(parent_path).add_module(leaf, module)
    graph = gm.graph
    args = make_args(chain) if make_args is not None else chain[0].args
    new = graph.insert_after(chain[-1], "call_module", name, args, dict(chain[0].kwargs))
    new.meta.update(chain[-1].meta)  # same output value: same shape and dtype
    chain[-1].replace_all_uses_with(new)
    for node in reversed(chain):
        graph.erase(node)
    graph.rename(new, chain[0].name)  # the layer keeps its name in printed graphs
    return new


def replace_chain_with_subgraph(gm: GraphModule, chain: list[Node],
                                build: Callable[[Callable[..., Node], tuple], Node]) -> Node:
    """Replace ``chain`` by nodes that ``build`` creates.

    ``build(add, inputs)`` receives ``add(op, target, args, kwargs=None)``, which
    inserts a node before the chain's last node and returns it, and the chain's
    first arguments; it returns the node whose value replaces the chain's output.
    """
    graph = gm.graph
    anchor = chain[-1]

    def add(op: str, target: Any, args: tuple = (), kwargs: dict | None = None) -> Node:
        return graph.insert_before(anchor, op, target, args, kwargs)

    result = build(add, chain[0].args)
    result.meta.update(anchor.meta)
    anchor.replace_all_uses_with(result)
    for node in reversed(chain):
        graph.erase(node)
    return result
