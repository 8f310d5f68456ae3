"""``Graph``: an ordered list of :class:`Node` s with a small editing API and a lint.

Invariants (checked by :meth:`Graph.lint`, which tests run after every pass):

1. the nodes are in topological order: a node's inputs come before it;
2. names are unique;
3. ownership: every node, and every node it reads, belongs to this graph;
4. ``users`` are exact: ``a in b.users`` iff ``b`` reads ``a``;
5. exactly one ``output`` node, last, and ``input`` nodes come first;
6. every ``call_module`` target (and ``get_attr`` path) exists in the owning module;
7. every node other than the inputs is reachable backwards from the output (no dead code).

>>> import qatcore.nn.functional as F
>>> g = Graph()
>>> x = g.input("x")
>>> y = g.call_function(F.relu, (x,))
>>> _ = g.output(y)
>>> g.lint()
>>> print(g)
name    op             target  args     kwargs
------  -------------  ------  -------  ------
x       input          x
relu    call_function  F.relu  (x,)
output  output         output  (relu,)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import numpy as np

from qatcore.errors import GraphError
from qatcore.graph.node import OPCODES, Node, iter_nodes, target_name
from qatcore.nn.module import Module
from qatcore.tensor import Tensor
from qatcore.text_table import text_table

__all__ = ["Graph", "resolve_attribute"]


def _base_name(op: str, target: Any) -> str:
    if op == "output":
        return "output"
    text = target if isinstance(target, str) else getattr(target, "__name__", None) or "node"
    text = re.sub(r"[^0-9a-zA-Z_]+", "_", text).strip("_").lower() or "node"
    return ("_" + text) if text[0].isdigit() else text


class Graph:
    """Ordered nodes of one computation."""

    def __init__(self) -> None:
        self._nodes: list[Node] = []
        self._names: set[str] = set()
        self._name_counts: dict[str, int] = {}

    # ---- reading ------------------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        """The nodes in order (a copy: safe to edit the graph while iterating)."""
        return list(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: Node) -> bool:
        return node.graph is self and node in self._nodes

    def find_nodes(self, op: str, target: Any = None) -> list[Node]:
        return [n for n in self._nodes if n.op == op and (target is None or n.target == target)]

    @property
    def output_node(self) -> Node:
        outputs = self.find_nodes("output")
        if len(outputs) != 1:
            raise GraphError(f"graph has {len(outputs)} output nodes, expected exactly 1")
        return outputs[0]

    # ---- creating -----------------------------------------------------------------------
    def _unique_name(self, candidate: str) -> str:
        if candidate not in self._names:
            return candidate
        count = self._name_counts.get(candidate, 0)
        while True:
            count += 1
            name = f"{candidate}_{count}"
            if name not in self._names:
                self._name_counts[candidate] = count
                return name

    def _make(self, op: str, target: Any, args: tuple, kwargs: dict | None, name: str | None) -> Node:
        if op not in OPCODES:
            raise GraphError(f"unknown opcode {op!r}; the opcodes are {OPCODES}")
        for n in iter_nodes((args, kwargs or {})):
            if n.graph is not self:
                raise GraphError(f"node {n.name} belongs to another graph")
        node_name = self._unique_name(name or _base_name(op, target))
        self._names.add(node_name)
        return Node(self, node_name, op, target, args, kwargs or {})

    def create_node(self, op: str, target: Any, args: tuple = (), kwargs: dict | None = None,
                    name: str | None = None) -> Node:
        """Append a node at the end of the graph."""
        node = self._make(op, target, args, kwargs, name)
        self._nodes.append(node)
        return node

    def insert_before(self, anchor: Node, op: str, target: Any, args: tuple = (),
                      kwargs: dict | None = None, name: str | None = None) -> Node:
        """Create a node placed immediately before ``anchor``."""
        index = self._index(anchor)
        node = self._make(op, target, args, kwargs, name)
        self._nodes.insert(index, node)
        return node

    def insert_after(self, anchor: Node, op: str, target: Any, args: tuple = (),
                     kwargs: dict | None = None, name: str | None = None) -> Node:
        """Create a node placed immediately after ``anchor``."""
        index = self._index(anchor)
        node = self._make(op, target, args, kwargs, name)
        self._nodes.insert(index + 1, node)
        return node

    def input(self, name: str) -> Node:
        return self.create_node("input", name, name=name)

    def call_module(self, target: str, args: tuple = (), kwargs: dict | None = None) -> Node:
        return self.create_node("call_module", target, args, kwargs)

    def call_function(self, fn: Callable, args: tuple = (), kwargs: dict | None = None) -> Node:
        return self.create_node("call_function", fn, args, kwargs)

    def get_attr(self, target: str) -> Node:
        return self.create_node("get_attr", target)

    def output(self, value: Any) -> Node:
        return self.create_node("output", "output", (value,))

    # ---- editing ------------------------------------------------------------------------
    def _index(self, node: Node) -> int:
        if node.graph is not self:
            raise GraphError(f"node {node.name} belongs to another graph")
        try:
            return self._nodes.index(node)
        except ValueError:
            raise GraphError(f"node {node.name} is not in this graph (erased?)") from None

    def replace_all_uses_with(self, old: Node, new: Node) -> list[Node]:
        """Make every user of ``old`` read ``new``; returns the users changed."""
        self._index(old)
        self._index(new)
        return old.replace_all_uses_with(new)

    def erase(self, node: Node) -> None:
        """Remove a node that nothing reads any more."""
        index = self._index(node)
        if node.users:
            raise GraphError(
                f"cannot erase {node.name}: it is still read by "
                f"{', '.join(u.name for u in node.users)}"
            )
        node.args, node.kwargs = (), {}
        del self._nodes[index]
        self._names.discard(node.name)

    def rename(self, node: Node, name: str) -> None:
        """Give ``node`` a new name (which must be free)."""
        self._index(node)
        if name == node.name:
            return
        if name in self._names:
            raise GraphError(f"cannot rename {node.name} to {name!r}: the name is taken")
        self._names.discard(node.name)
        self._names.add(name)
        node.name = name

    def move_before(self, node: Node, anchor: Node) -> None:
        """Move an existing node to just before ``anchor``."""
        del self._nodes[self._index(node)]
        self._nodes.insert(self._index(anchor), node)

    # ---- checking -----------------------------------------------------------------------
    def lint(self, module: Any = None) -> None:
        """Check every invariant in the module docstring; GraphError names the first broken one.

        ``module`` (the owning module) enables the call_module/get_attr target checks.
        """
        names: set[str] = set()
        position = {node: i for i, node in enumerate(self._nodes)}
        for i, node in enumerate(self._nodes):
            if node.graph is not self:
                raise GraphError(f"lint: node {node.name} belongs to another graph")
            if node.op not in OPCODES:
                raise GraphError(f"lint: node {node.name} has unknown opcode {node.op!r}")
            if node.name in names:
                raise GraphError(f"lint: two nodes are named {node.name!r}")
            names.add(node.name)
            for source in node.all_input_nodes:
                if source.graph is not self or source not in position:
                    raise GraphError(f"lint: {node.name} reads {source.name}, which is not in this graph")
                if position[source] >= i:
                    raise GraphError(
                        f"lint: {node.name} reads {source.name}, which comes after it (not topological)"
                    )
                if node not in source.users:
                    raise GraphError(f"lint: {node.name} reads {source.name} but is not among its users")
            for user in node.users:
                if user not in position or node not in user.all_input_nodes:
                    raise GraphError(
                        f"lint: {node.name} lists {user.name} as a user, but it does not read it"
                    )
        outputs = [n for n in self._nodes if n.op == "output"]
        if len(outputs) != 1 or self._nodes[-1] is not outputs[0]:
            raise GraphError(f"lint: expected exactly one output node, last; found {len(outputs)}")
        seen_other = False
        for node in self._nodes:
            if node.op == "input" and seen_other:
                raise GraphError(f"lint: input {node.name} comes after other nodes")
            seen_other = seen_other or node.op != "input"
        if module is not None:
            for node in self._nodes:
                if node.op in ("call_module", "get_attr"):
                    resolve_attribute(module, node.target, node)
        reachable = set()
        stack = [outputs[0]]
        while stack:
            node = stack.pop()
            if node in reachable:
                continue
            reachable.add(node)
            stack.extend(node.all_input_nodes)
        dead = [n.name for n in self._nodes if n.op != "input" and n not in reachable]
        if dead:
            raise GraphError(f"lint: nodes not reachable from the output: {', '.join(dead)}")

    # ---- printing -----------------------------------------------------------------------
    def _rows(self) -> list[list[str]]:
        show_shape = any("shape" in n.meta for n in self._nodes)
        header = ["name", "op", "target", "args", "kwargs"] + (["shape"] if show_shape else [])
        rows = [header]
        for n in self._nodes:
            args = _format_value(n.args)
            kwargs = "" if not n.kwargs else _format_value(n.kwargs)
            if n.op == "input":
                args = ""
            row = [n.name, n.op, target_name(n.target), args, kwargs]
            if show_shape:
                shape = n.meta.get("shape")
                row.append("" if shape is None else str(tuple(shape)))
            rows.append(row)
        return rows

    def __str__(self) -> str:
        return "\n".join(text_table(self._rows()))

    def to_dot(self, name: str = "graph") -> str:
        """The graph in Graphviz DOT form (render with ``dot -Tpng``)."""
        lines = [f"digraph {_dot_id(name)} {{", "  rankdir=TB;", "  node [shape=box, fontname=monospace];"]
        for n in self._nodes:
            label = f"{n.name}\\n{n.op}: {target_name(n.target)}"
            if "shape" in n.meta:
                label += f"\\n{tuple(n.meta['shape'])}"
            lines.append(f"  {_dot_id(n.name)} [label=\"{label}\"];")
        for n in self._nodes:
            for source in n.all_input_nodes:
                lines.append(f"  {_dot_id(source.name)} -> {_dot_id(n.name)};")
        lines.append("}")
        return "\n".join(lines)


def _dot_id(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def _format_value(value: Any) -> str:
    if isinstance(value, Node):
        return value.name
    if type(value) is tuple:
        inner = ", ".join(_format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if type(value) is list:
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if type(value) is dict:
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (np.ndarray, Tensor)):
        return f"<array {tuple(value.shape)} {value.dtype}>"
    return repr(value)


def resolve_attribute(module: Any, path: str, node: Node | None = None) -> Any:
    """The attribute at dotted ``path`` below ``module`` (GraphError if missing)."""
    current = module
    for part in path.split("."):
        found = None
        if isinstance(current, Module):
            found = current.get_child(part)
            if found is None:
                found = current.get_state(part)
        if found is None:
            where = f" (node {node.name})" if node is not None else ""
            raise GraphError(f"lint: {path!r}{where} does not exist in the owning module")
        current = found
    return current


def nodes_in_order(nodes: Iterable[Node]) -> list[Node]:
    """``nodes`` sorted by their position in their graph."""
    nodes = list(nodes)
    if not nodes:
        return []
    order = {n: i for i, n in enumerate(nodes[0].graph._nodes)}
    return sorted(nodes, key=order.__getitem__)
