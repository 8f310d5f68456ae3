"""``SymbolicValue``: the base of values that stand in for tensors while a graph
is being recorded (the tracer's Proxy).

The functional API and ``Module.__call__`` check for it so that, during tracing,
an op applied to a symbolic value is *recorded* instead of computed. Keeping the
base class here (below ``qatcore.nn``) lets the low layers cooperate with the
tracer in :mod:`qatcore.graph` without importing it.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

__all__ = ["SymbolicValue", "find_symbolic"]


class SymbolicValue(abc.ABC):
    """A value known only by the operation that will produce it."""

    __slots__ = ()

    @abc.abstractmethod
    def record_function(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """Record ``fn(*args, **kwargs)``; return the symbolic result."""

    @abc.abstractmethod
    def record_module_call(self, module: Any, args: tuple, kwargs: dict) -> Any:
        """Record (or trace through) ``module(*args, **kwargs)``."""


def find_symbolic(args: tuple, kwargs: dict) -> SymbolicValue | None:
    """The first SymbolicValue among args/kwargs (one level into lists and tuples)."""
    for value in args:
        if isinstance(value, SymbolicValue):
            return value
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, SymbolicValue):
                    return item
    for value in kwargs.values():
        if isinstance(value, SymbolicValue):
            return value
    return None
