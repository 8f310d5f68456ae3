"""Symbolic tracing: run a model's ``forward`` on :class:`Proxy` values and record
what it does as a :class:`~qatcore.graph.Graph`.

- A call of a *leaf* module (the built-in layers of :mod:`qatcore.nn`, plus any
  type or name given in ``leaf_modules``) becomes one ``call_module`` node; other
  modules (Sequential, your own blocks) are traced through.
- A functional op (``qatcore.nn.functional``) or Tensor operator/method applied to
  a Proxy becomes a ``call_function`` node whose target is the functional op.
- A parameter or buffer of the model used directly becomes a ``get_attr`` node.
- Python control flow runs once, on the Proxies: loops unroll, and branching on a
  *tensor value* (``if x.sum() > 0``) is impossible, so it raises
  :class:`~qatcore.errors.TraceError` naming the module and the source line.
  Such models run in eager mode (the QAT preparer swaps modules instead).

>>> import numpy as np
>>> from qatcore.models import MLP
>>> gm = trace(MLP(hidden=(4,)), example_inputs=(np.zeros((2, 1, 8, 8), np.float32),))
>>> [n.op for n in gm.graph.nodes]
['input', 'call_module', 'call_module', 'call_module', 'call_module', 'output']
>>> gm.graph.nodes[-2].meta["shape"]
(2, 10)
"""

from __future__ import annotations

import inspect
import linecache
import operator
import os
import sys
from typing import Any, Iterable

from qatcore.errors import TraceError
from qatcore.graph.graph import Graph
from qatcore.graph.graph_module import GraphModule
from qatcore.graph.node import Node, map_nodes
from qatcore.graph.passes.shape_propagation import propagate_shapes
from qatcore.nn import functional as F
from qatcore.nn.container import ModuleList, Sequential
from qatcore.nn.module import Module
from qatcore.symbolic import SymbolicValue
from qatcore.tensor import Tensor

__all__ = ["Proxy", "Tracer", "trace", "copy_graph", "is_default_leaf"]

_GRAPH_DIR = os.path.dirname(os.path.abspath(__file__))
_QATCORE_DIR = os.path.dirname(_GRAPH_DIR)

# Tensor methods that are the functional op of the same name and signature.
_METHODS = {
    name: getattr(F, name)
    for name in ("sum", "mean", "max", "var", "flatten", "transpose", "exp", "log", "sqrt",
                 "relu", "sigmoid", "tanh", "clamp", "softmax", "log_softmax")
}


def is_default_leaf(module: Module) -> bool:
    """The built-in layers of qatcore.nn are leaves; containers are traced through."""
    return type(module).__module__.startswith("qatcore.nn.") and type(module) not in (Sequential, ModuleList)


def _user_frame() -> tuple[str, int]:
    """File and line of the innermost caller outside qatcore (the model's code)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_QATCORE_DIR + os.sep):
            return filename, frame.f_lineno
        frame = frame.f_back
    return "<unknown>", 0


class Proxy(SymbolicValue):
    """Stands for the value of ``node`` while ``tracer`` records a graph."""

    __slots__ = ("node", "tracer")
    __array_ufunc__ = None  # numpy scalars defer to our reflected operators

    def __init__(self, node: Node, tracer: Tracer) -> None:
        self.node, self.tracer = node, tracer

    def __repr__(self) -> str:
        return f"Proxy({self.node.name})"

    # ---- SymbolicValue -----------------------------------------------------------------
    def record_function(self, fn, args, kwargs):
        return self.tracer.create_proxy("call_function", fn, args, kwargs)

    def record_module_call(self, module, args, kwargs):
        return self.tracer.call_module(module, args, kwargs)

    # ---- operators (each is the functional op, like Tensor's) ----------------------------
    def __add__(self, other):
        return F.add(self, other)

    def __radd__(self, other):
        return F.add(other, self)

    def __sub__(self, other):
        return F.sub(self, other)

    def __rsub__(self, other):
        return F.sub(other, self)

    def __mul__(self, other):
        return F.mul(self, other)

    def __rmul__(self, other):
        return F.mul(other, self)

    def __truediv__(self, other):
        return F.div(self, other)

    def __rtruediv__(self, other):
        return F.div(other, self)

    def __neg__(self):
        return F.neg(self)

    def __pow__(self, exponent):
        return F.pow(self, exponent)

    def __matmul__(self, other):
        return F.matmul(self, other)

    def __rmatmul__(self, other):
        return F.matmul(other, self)

    def __getitem__(self, index):
        return self.tracer.create_proxy("call_function", operator.getitem, (self, index), {})

    # ---- methods --------------------------------------------------------------------------
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return F.reshape(self, shape)

    view = reshape

    def permute(self, *dims):
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        return F.permute(self, dims)

    @property
    def shape(self):
        return self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})

    def size(self, dim=None):
        shape = self.shape
        return shape if dim is None else shape[dim]

    def __getattr__(self, name: str):
        if name in _METHODS:
            fn = _METHODS[name]
            return lambda *args, **kwargs: fn(self, *args, **kwargs)
        if name in ("dtype", "ndim"):
            return self.tracer.create_proxy("call_function", getattr, (self, name), {})
        raise TraceError(
            f"tracing: Tensor attribute {name!r} is not supported on a traced value; traced code "
            f"may use the operators, {', '.join(sorted(_METHODS))}, reshape, view, permute, "
            f"shape, size, dtype and ndim"
        )

    # ---- what a value-dependent program needs, and tracing cannot give -------------------
    def _value_needed(self, what: str):
        filename, line = _user_frame()
        code = linecache.getline(filename, line).strip()
        module = self.tracer.current_module_description()
        raise TraceError(
            f"cannot trace {module}: {what} of a traced tensor ({self.node.name}) decides what "
            f"runs at {filename}:{line}: `{code}`. Tracing records one path; models whose "
            f"control flow depends on tensor values run in eager mode (the QAT preparer's "
            f"module-swap fallback handles them)."
        )

    def __bool__(self):
        self._value_needed("the truth value")

    def __lt__(self, other):
        self._value_needed("a comparison")

    def __le__(self, other):
        self._value_needed("a comparison")

    def __gt__(self, other):
        self._value_needed("a comparison")

    def __ge__(self, other):
        self._value_needed("a comparison")

    def __len__(self):
        self._value_needed("the length")

    def __iter__(self):
        self._value_needed("iteration over the elements")

    def __int__(self):
        self._value_needed("the int value")

    def __float__(self):
        self._value_needed("the float value")

    def __index__(self):
        self._value_needed("the index value")


class Tracer:
    """Records one model's forward as a Graph (see the module docstring)."""

    def __init__(self, root: Module, leaf_modules: Iterable = ()) -> None:
        self.root = root
        self.graph = Graph()
        self.module_names = {id(m): name for name, m in root.named_modules()}
        self.tensor_names: dict[int, str] = {}
        for prefix, module in root.named_modules():
            dot = f"{prefix}." if prefix else ""
            for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                self.tensor_names.setdefault(id(value), dot + name)
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        unknown = [t for t in leaf_modules if not isinstance(t, (type, str))]
        if unknown:
            raise TraceError(f"trace: leaf_modules holds {unknown!r}; give Module types or dotted names")
        self.attr_nodes: dict[str, Node] = {}
        self.module_stack: list[tuple[str, Module]] = []

    def current_module_description(self) -> str:
        name, module = self.module_stack[-1] if self.module_stack else ("", self.root)
        return f"{type(module).__name__} {name!r}" if name else f"{type(module).__name__} (the root)"

    def is_leaf(self, name: str, module: Module) -> bool:
        if name in self.leaf_names or isinstance(module, self.leaf_types):
            return True
        return is_default_leaf(module)

    def _as_argument(self, value: Any) -> Any:
        if isinstance(value, Proxy):
            if value.tracer is not self:
                raise TraceError("tracing: a value from another trace was used")
            return value.node
        if isinstance(value, Tensor) and id(value) in self.tensor_names:
            path = self.tensor_names[id(value)]
            if path not in self.attr_nodes:
                self.attr_nodes[path] = self.graph.get_attr(path)
            return self.attr_nodes[path]
        if type(value) in (tuple, list):
            return type(value)(self._as_argument(v) for v in value)
        if type(value) is dict:
            return {k: self._as_argument(v) for k, v in value.items()}
        return value

    def create_proxy(self, op: str, target: Any, args: tuple, kwargs: dict) -> Proxy:
        node = self.graph.create_node(
            op, target, self._as_argument(tuple(args)), self._as_argument(dict(kwargs))
        )
        return Proxy(node, self)

    def call_module(self, module: Module, args: tuple, kwargs: dict) -> Any:
        name = self.module_names.get(id(module))
        if name is None:
            filename, line = _user_frame()
            raise TraceError(
                f"cannot trace {self.current_module_description()}: it calls a "
                f"{type(module).__name__} that is not registered as a submodule "
                f"({filename}:{line}); assign it to an attribute in __init__"
            )
        if self.is_leaf(name, module):
            return self.create_proxy("call_module", name, args, kwargs)
        self.module_stack.append((name, module))
        try:
            return module.forward(*args, **kwargs)
        finally:
            self.module_stack.pop()

    def trace(self) -> Graph:
        signature = inspect.signature(self.root.forward)
        proxies = []
        for parameter in signature.parameters.values():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TraceError(
                    f"cannot trace {type(self.root).__name__}: forward takes *{parameter.name}; "
                    f"tracing needs named inputs"
                )
            proxies.append(Proxy(self.graph.input(parameter.name), self))
        result = self.root.forward(*proxies)
        self.graph.output(map_nodes(self._as_argument(result), lambda n: n))
        return self.graph


def copy_graph(graph: Graph) -> Graph:
    """A new Graph with the same nodes (names, targets, arguments, meta) in the same order."""
    new = Graph()
    env: dict[Node, Node] = {}
    for node in graph.nodes:
        if node.op == "input":
            env[node] = new.input(node.target)
        elif node.op == "output":
            env[node] = new.output(map_nodes(node.args[0], env.__getitem__))
        else:
            env[node] = new.create_node(node.op, node.target, map_nodes(node.args, env.__getitem__),
                                        map_nodes(node.kwargs, env.__getitem__), name=node.name)
        env[node].meta.update(node.meta)
    return new


def trace(module: Module, example_inputs: tuple | None = None, leaf_modules: Iterable = ()) -> GraphModule:
    """Trace ``module`` into a GraphModule sharing its submodules and parameters.

    Args:
        module: the model (left unchanged). A GraphModule (an imported model, say) is
            not traced again: the result runs a copy of its graph.
        example_inputs: optional inputs (arrays or Tensors); when given, every node's
            output ``shape`` and ``dtype`` are recorded in ``node.meta``.
        leaf_modules: extra Module types or dotted names to keep as single nodes.

    Raises:
        TraceError: the model branches on tensor values, calls an unregistered
            module, or takes ``*args``.
    """
    if isinstance(module, GraphModule):
        # already a graph (an imported model, say): its trace is a copy of that graph
        graph = copy_graph(module.graph)
        gm = GraphModule(module, graph, class_name=module.class_name)
    else:
        graph = Tracer(module, leaf_modules).trace()
        gm = GraphModule(module, graph)
    gm.lint()
    if example_inputs is not None:
        propagate_shapes(gm, *example_inputs)
    return gm
