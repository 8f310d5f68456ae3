"""``GraphModule``: a Module that runs a :class:`Graph` by interpretation.

It holds the traced model's layers, parameters and buffers: the *same* objects,
registered under the same names, so its ``state_dict()`` keys equal the original
model's and an optimizer built on the original's parameters trains it. Container
modules (Sequential, your own blocks) are mirrored by :class:`Submodules`
holders, so a pass that replaces a layer of the GraphModule never changes the
traced model.

Running it walks the nodes in order with an environment mapping each node to
its value:

- ``input``: the next positional argument (or the keyword of that name),
- ``call_module``: ``self.get_submodule(target)(*args, **kwargs)``,
- ``call_function``: ``target(*args, **kwargs)``,
- ``get_attr``: the parameter or buffer at the dotted path,
- ``output``: the value of ``args[0]``, returned.

Because every call is the very function or module the eager model called, in the
same order, a traced model computes bit-identical outputs and gradients.
"""

from __future__ import annotations

from typing import Any, Callable

from qatcore.errors import GraphError
from qatcore.graph.graph import Graph, resolve_attribute
from qatcore.graph.node import Node, map_nodes
from qatcore.nn.module import Module

__all__ = ["GraphModule", "Submodules"]


class Submodules(Module):
    """Holds submodules (and direct parameters and buffers) of a traced container on
    behalf of a GraphModule; it has no forward of its own (the graph has the calls)."""

    def forward(self, *args, **kwargs):
        raise GraphError("Submodules only hold modules for a GraphModule; call the GraphModule")


def _adopt_state(target: Module, source: Module) -> None:
    """Register source's direct parameters and buffers on target: the same objects."""
    for name, parameter in source.named_parameters(recurse=False):
        target.register_parameter(name, parameter)
    for name, buffer in source.named_buffers(recurse=False):
        target.register_buffer(name, buffer, persistent=source.is_persistent(name))


def _own_hierarchy(target: Module, source: Module, prefix: str, called: set[str]) -> None:
    """Mirror source's children on target. Modules the graph calls, and modules without
    children, are shared; other containers become Submodules holders, so a pass can
    replace a layer in the GraphModule without touching the traced model."""
    for name, child in source.named_children():
        path = f"{prefix}{name}"
        if path in called or next(child.named_children(), None) is None:
            target.add_module(name, child)
            continue
        holder = Submodules()
        _adopt_state(holder, child)
        holder.training = child.training
        _own_hierarchy(holder, child, path + ".", called)
        target.add_module(name, holder)


class GraphModule(Module):
    """A Module whose forward is a Graph (see the module docstring)."""

    def __init__(self, root: Module, graph: Graph, class_name: str | None = None) -> None:
        super().__init__()
        called = {n.target for n in graph.nodes if n.op == "call_module"}
        _own_hierarchy(self, root, "", called)
        _adopt_state(self, root)
        self.graph = graph
        # a callable (gm, args, kwargs, observe) that may compute the graph its own way,
        # returning NotImplemented to leave it to the plain interpretation below (the QAT
        # engine installs one that evaluates a QAT model in integer arithmetic)
        self.interpreter = None
        self.class_name = class_name or type(root).__name__
        self.training = root.training

    def lint(self) -> None:
        """Check the graph's invariants, including that targets exist in this module."""
        self.graph.lint(self)

    def forward(self, *args, **kwargs):
        return self.run(args, kwargs)

    def run(self, args: tuple, kwargs: dict, observe: Callable[[Node, Any], None] | None = None):
        """Interpret the graph on ``args``; ``observe(node, value)`` sees every node's value
        (shape propagation and statistics use it)."""
        if self.interpreter is not None:
            result = self.interpreter(self, args, kwargs, observe)
            if result is not NotImplemented:
                return result
        env: dict[Node, Any] = {}
        positional = list(args)
        position = 0
        for node in self.graph.nodes:
            op = node.op
            if op == "input":
                if position < len(positional):
                    env[node] = positional[position]
                    position += 1
                elif node.target in kwargs:
                    env[node] = kwargs[node.target]
                else:
                    raise GraphError(f"{self.class_name}: missing input {node.target!r}")
                if observe is not None:
                    observe(node, env[node])
                continue
            node_args = map_nodes(node.args, env.__getitem__)
            node_kwargs = map_nodes(node.kwargs, env.__getitem__)
            if op == "call_module":
                env[node] = self.get_submodule(node.target)(*node_args, **node_kwargs)
            elif op == "call_function":
                env[node] = node.target(*node_args, **node_kwargs)
            elif op == "get_attr":
                env[node] = resolve_attribute(self, node.target, node)
            else:  # output
                return node_args[0]
            if observe is not None:
                observe(node, env[node])
        raise GraphError(f"{self.class_name}: the graph has no output node")

    def extra_repr(self) -> str:
        return f"class_name={self.class_name!r}"

    def print_readable(self) -> str:
        """The graph as a table, headed by the model's class name."""
        return f"{self.class_name}\n{self.graph}"
