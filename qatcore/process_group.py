"""The reductions a data-parallel run asks of the layers below it.

In a data-parallel run every process (a *rank*) holds the same model and sees its own
share of each global batch. Three things in the lower layers must then see the global
batch rather than the local share: BatchNorm's batch statistics, the observers' batch
ranges and histograms, and nothing else below the training loop (the gradients are
averaged above, by ``qatcore.distributed.DataParallel``). Those layers ask this module
for the group they run in and reduce through it:

    group = current_group()          # None outside a data-parallel run (or with 1 rank)
    total = group.allreduce(a, "sum")  # elementwise over the ranks: "sum", "min" or "max"

A :class:`ProcessGroup` is installed for a block of code with :func:`use_group`; the
setting is a ``ContextVar``, so threads (and the simulated ranks of
``qatcore.distributed.ThreadGroup``) each have their own. Every rank must make the same
reductions in the same order, which holds when they run the same model on the same code
path: all branches taken after a reduction depend on its (equal) result only.

Contract for implementations: ``allreduce`` returns a new array of ``a``'s shape and
dtype, and the same bits on every rank.

>>> import numpy as np
>>> current_group() is None
True
>>> class Doubling(ProcessGroup):   # two ranks that happen to hold the same values
...     rank, world_size = 0, 2
...     def allreduce(self, array, op="sum"):
...         return array * 2 if op == "sum" else array.copy()
>>> with use_group(Doubling()):
...     current_group().allreduce(np.array([1.5, 2.0])).tolist()
[3.0, 4.0]
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
from typing import Iterator

import numpy as np

__all__ = ["ProcessGroup", "PendingReduction", "REDUCE_OPS", "current_group", "use_group", "set_group",
           "local_batch_size"]

REDUCE_OPS = ("sum", "min", "max")

_GROUP: contextvars.ContextVar[ProcessGroup | None] = contextvars.ContextVar("qatcore_process_group", default=None)


class ProcessGroup(abc.ABC):
    """The ranks of a data-parallel run, as the lower layers see them."""

    rank: int
    world_size: int

    @abc.abstractmethod
    def allreduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """The elementwise ``op`` ("sum", "min" or "max") of ``array`` over every rank: a new
        array of the same shape and dtype, bitwise equal on every rank."""

    def iallreduce(self, array: np.ndarray, op: str = "sum") -> PendingReduction:
        """Start ``allreduce(array, op)``; ``.wait()`` on the result gives its value. Groups
        that can overlap the reduction with computation override this; by default it is
        done at once."""
        return PendingReduction(self.allreduce(array, op))

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """Rank ``root``'s ``array`` on every rank (a new array). By default a sum in which
        every other rank contributes zeros, which reproduces root's values exactly (a
        negative zero becomes a positive one)."""
        mine = np.asarray(array)
        return self.allreduce(mine if self.rank == root else np.zeros_like(mine), "sum")

    def barrier(self) -> None:
        """Return once every rank has called it."""
        self.allreduce(np.zeros(1, dtype=np.int64), "sum")


class PendingReduction:
    """A reduction started by ``ProcessGroup.iallreduce``; ``wait()`` returns its result."""

    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def wait(self) -> np.ndarray:
        return self._value


def current_group() -> ProcessGroup | None:
    """The group installed by :func:`use_group` in this context, or None when there is none
    or it has a single rank (then nothing needs reducing)."""
    group = _GROUP.get()
    return group if group is not None and group.world_size > 1 else None


def set_group(group: ProcessGroup | None) -> None:
    """Install ``group`` for the rest of this context (a process's main thread: the rest of
    the program); ``qatcore.distributed.init`` calls it. None removes it."""
    _GROUP.set(group)


@contextlib.contextmanager
def use_group(group: ProcessGroup | None) -> Iterator[ProcessGroup | None]:
    """Install ``group`` (None: no group) for the block; the previous setting is restored."""
    token = _GROUP.set(group)
    try:
        yield group
    finally:
        _GROUP.reset(token)


def local_batch_size(args: tuple) -> int:
    """This rank's batch size in a forward called with ``args``: the first argument's axis 0
    (1 when it has none). ``DataParallel`` weights each rank's gradients by it, and the QAT
    statistics weight each rank's recorded gradients the same way."""
    first = args[0] if args else None
    shape = getattr(getattr(first, "data", first), "shape", ())
    return int(shape[0]) if len(shape) else 1
