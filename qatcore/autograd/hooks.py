"""Hooks into the backward pass: when a leaf's gradient is ready, and when the pass ends.

Data-parallel training needs both (``qatcore.distributed.DataParallel``): it starts
averaging a bucket of gradients across ranks as soon as the bucket's last gradient has
been accumulated, while the pass goes on through earlier layers, and waits for every
bucket once the pass has finished, before the optimizer reads ``.grad``.

- :func:`register_grad_ready_hook` ``(tensor, hook)``: after a backward pass has
  accumulated a gradient into the leaf ``tensor.grad``, ``hook(tensor)`` runs. The
  registry holds the tensor weakly; ``handle.remove()`` unregisters the hook.
- :func:`queue_callback` ``(fn)``: only during a backward pass (from a hook or a
  Function's backward): ``fn()`` runs once that pass has visited every node. Each thread
  has its own passes.

>>> import qatcore
>>> x = qatcore.tensor([1.0, 2.0], requires_grad=True)
>>> events = []
>>> handle = register_grad_ready_hook(x, lambda t: (events.append(t.grad.tolist()),
...                                                  queue_callback(lambda: events.append("end"))))
>>> (x * x).sum().backward()
>>> events
[[2.0, 4.0], 'end']
>>> handle.remove()
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from typing import Callable

from qatcore.errors import GradientError
from qatcore.tensor import Tensor

__all__ = ["register_grad_ready_hook", "queue_callback", "GradHookHandle", "run_grad_ready_hooks",
           "backward_pass"]

# id(tensor) -> (weak reference to it, {key: hook}); entries go when their tensor dies
_HOOKS: dict[int, tuple[weakref.ref, dict[int, Callable[[Tensor], None]]]] = {}
_KEYS = itertools.count()
# per thread, one list of queued callbacks per backward pass in progress (nested passes stack)
_PASSES = threading.local()


def _callback_stack() -> list[list[Callable[[], None]]]:
    stack = getattr(_PASSES, "stack", None)
    if stack is None:
        stack = _PASSES.stack = []
    return stack


class GradHookHandle:
    """Returned by :func:`register_grad_ready_hook`; ``remove()`` unregisters the hook."""

    def __init__(self, tensor_id: int, key: int) -> None:
        self._tensor_id, self._key = tensor_id, key

    def remove(self) -> None:
        entry = _HOOKS.get(self._tensor_id)
        if entry is not None:
            entry[1].pop(self._key, None)
            if not entry[1]:
                del _HOOKS[self._tensor_id]


def register_grad_ready_hook(tensor: Tensor, hook: Callable[[Tensor], None]) -> GradHookHandle:
    """Run ``hook(tensor)`` each time a backward pass has accumulated into ``tensor.grad``."""
    if not isinstance(tensor, Tensor) or not tensor.requires_grad or not tensor.is_leaf:
        raise GradientError("register_grad_ready_hook: expected a leaf Tensor with requires_grad=True "
                            f"(such as a Parameter), got {type(tensor).__name__}")
    tensor_id = id(tensor)
    entry = _HOOKS.get(tensor_id)
    if entry is None or entry[0]() is not tensor:
        entry = (weakref.ref(tensor, functools.partial(_forget, tensor_id)), {})
        _HOOKS[tensor_id] = entry
    key = next(_KEYS)
    entry[1][key] = hook
    return GradHookHandle(tensor_id, key)


def _forget(tensor_id: int, ref: weakref.ref, hooks: dict = _HOOKS) -> None:
    """A hooked tensor died: drop its entry, unless its id already names a newer tensor's.
    (Bound into the weak reference with ``hooks``: at interpreter exit the module's globals
    may be gone.)"""
    entry = hooks.get(tensor_id)
    if entry is not None and entry[0] is ref:
        del hooks[tensor_id]


def run_grad_ready_hooks(tensor: Tensor) -> None:
    """The engine calls this after accumulating into a leaf's ``.grad``."""
    if not _HOOKS:
        return
    entry = _HOOKS.get(id(tensor))
    if entry is not None and entry[0]() is tensor:
        for hook in list(entry[1].values()):
            hook(tensor)


def queue_callback(fn: Callable[[], None]) -> None:
    """During a backward pass, run ``fn()`` once the pass has finished (in queue order)."""
    stack = _callback_stack()
    if not stack:
        raise GradientError("queue_callback: only a backward pass in progress can queue a callback")
    stack[-1].append(fn)


class backward_pass:  # noqa: N801 - used as a context manager by the engine
    """The engine's bracket around one pass: opens a callback queue, runs it on success."""

    def __enter__(self) -> None:
        _callback_stack().append([])

    def __exit__(self, exc_type, exc, tb) -> None:
        queued = _callback_stack().pop()
        if exc_type is None:
            for fn in queued:
                fn()
