"""``Node``: one operation of a :class:`~qatcore.graph.Graph`.

A node has an opcode, a target, arguments and a unique name:

============== ============================== ===========================================
opcode         target                         meaning
============== ============================== ===========================================
``input``      the input's name (str)         a model input (positional or keyword)
``call_module`` a dotted submodule name (str) ``module(*args, **kwargs)``
``call_function`` a callable                  ``target(*args, **kwargs)``
``get_attr``   a dotted attribute path (str)  a parameter or buffer of the owning module
``output``     ``"output"``                   ``args[0]`` (any nesting of tuples, lists,
                                               dicts and nodes) is what the graph returns
============== ============================== ===========================================

``args``/``kwargs`` may nest Nodes inside tuples, lists and dicts; ``users`` are
the nodes whose arguments mention this one (kept up to date by the Graph).
``meta`` is a plain dict where passes attach data (``"shape"``, ``"dtype"``,
quantization parameters): passes never set other attributes on a node.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

__all__ = ["Node", "OPCODES", "map_nodes", "iter_nodes", "target_name"]

OPCODES = ("input", "call_module", "call_function", "get_attr", "output")


def map_nodes(value: Any, fn: Callable[[Node], Any]) -> Any:
    """``value`` with every Node ``n`` inside it replaced by ``fn(n)`` (structure kept)."""
    if isinstance(value, Node):
        return fn(value)
    if type(value) is tuple:
        return tuple(map_nodes(v, fn) for v in value)
    if type(value) is list:
        return [map_nodes(v, fn) for v in value]
    if type(value) is dict:
        return {k: map_nodes(v, fn) for k, v in value.items()}
    return value


def iter_nodes(value: Any) -> Iterator[Node]:
    """Every Node inside ``value``, in order."""
    if isinstance(value, Node):
        yield value
    elif type(value) in (tuple, list):
        for v in value:
            yield from iter_nodes(v)
    elif type(value) is dict:
        for v in value.values():
            yield from iter_nodes(v)


def target_name(target: Any) -> str:
    """A readable name for a node target (functions by their qualified name)."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", "") or ""
    qualname = getattr(target, "__qualname__", None) or repr(target)
    if module == "qatcore.nn.functional":
        return f"F.{qualname}"
    if module in ("_operator", "operator"):
        return f"operator.{qualname}"
    return qualname


class Node:
    """One operation; create nodes through a Graph, which keeps ``users`` right."""

    __slots__ = ("graph", "name", "op", "target", "_args", "_kwargs", "users", "meta")

    def __init__(self, graph, name: str, op: str, target: Any, args: tuple, kwargs: dict) -> None:
        self.graph = graph
        self.name = name
        self.op = op
        self.target = target
        self._args: tuple = ()
        self._kwargs: dict = {}
        self.users: dict[Node, None] = {}  # an ordered set
        self.meta: dict[str, Any] = {}
        self._set_arguments(tuple(args), dict(kwargs))

    @property
    def args(self) -> tuple:
        return self._args

    @args.setter
    def args(self, value: tuple) -> None:
        self._set_arguments(tuple(value), self._kwargs)

    @property
    def kwargs(self) -> dict:
        return self._kwargs

    @kwargs.setter
    def kwargs(self, value: dict) -> None:
        self._set_arguments(self._args, dict(value))

    def _set_arguments(self, args: tuple, kwargs: dict) -> None:
        for old in self.all_input_nodes:
            old.users.pop(self, None)
        self._args, self._kwargs = args, kwargs
        for new in self.all_input_nodes:
            new.users[self] = None

    @property
    def all_input_nodes(self) -> list[Node]:
        """The distinct nodes this node reads, in order of first appearance."""
        seen: dict[Node, None] = {}
        for n in iter_nodes((self._args, self._kwargs)):
            seen[n] = None
        return list(seen)

    def replace_input_with(self, old: Node, new: Node) -> None:
        """Read ``new`` wherever this node read ``old``."""
        self._set_arguments(
            map_nodes(self._args, lambda n: new if n is old else n),
            map_nodes(self._kwargs, lambda n: new if n is old else n),
        )

    def replace_all_uses_with(self, replacement: Node) -> list[Node]:
        """Make every user of this node read ``replacement`` instead; returns those users."""
        users = list(self.users)
        for user in users:
            user.replace_input_with(self, replacement)
        return users

    def format_target(self) -> str:
        return target_name(self.target)

    def __repr__(self) -> str:
        return self.name
