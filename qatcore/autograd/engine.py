"""Reverse-mode differentiation over the recorded graph.

``backward(root, grad)`` visits every Tensor that ``root`` depends on in reverse
topological order and applies the chain rule

    dL/d(input_j) = sum over uses of  Function.backward(dL/d(output))_j

accumulating into ``.grad`` of each leaf that requires a gradient (leaves keep
what earlier backward calls left there: gradients accumulate until zeroed). After a
leaf's accumulation its grad-ready hooks run, and callbacks queued during the pass run
once it ends (:mod:`qatcore.autograd.hooks`).

The topological order comes from an *iterative* depth-first search with an
explicit stack, so a chain of any length (tested at 10,000 ops) never meets
Python's recursion limit, unlike a recursive walk.

This module sits above :mod:`qatcore.tensor` and binds :func:`backward` there
when it is imported: that is what ``Tensor.backward`` runs.
"""

from __future__ import annotations

import numpy as np

from qatcore.autograd.hooks import backward_pass, run_grad_ready_hooks
from qatcore.errors import GradientError, ShapeError
from qatcore.tensor import Tensor, bind_backward

__all__ = ["backward", "sum_to_shape", "topological_order"]


def sum_to_shape(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Undo numpy broadcasting: sum ``grad`` down to ``shape``.

    Leading axes that broadcasting added are summed away; axes where ``shape``
    has 1 but ``grad`` does not are summed with keepdims.

    >>> sum_to_shape(np.ones((2, 3, 4)), (3, 1)).tolist()
    [[8.0], [8.0], [8.0]]
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise ShapeError(f"gradient of shape {grad.shape} cannot be summed to shape {shape}")
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    if grad.shape != shape:
        raise ShapeError(f"gradient of shape {grad.shape} does not broadcast to shape {shape}")
    return grad


def topological_order(root: Tensor) -> list[Tensor]:
    """Tensors ``root`` depends on (that require grad), inputs before outputs."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        ctx = node._ctx
        if ctx is not None:
            for parent in ctx.inputs:
                if parent is not None and parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def backward(root: Tensor, grad: np.ndarray) -> None:
    """Accumulate d(root)/d(leaf) * grad into every leaf's ``.grad``."""
    if not root.requires_grad:
        raise GradientError(
            "backward() on a tensor that does not require grad: no input of the "
            "computation had requires_grad=True (or it ran under no_grad())"
        )
    with backward_pass():
        _backward(root, grad)


def _backward(root: Tensor, grad: np.ndarray) -> None:
    grads: dict[int, np.ndarray] = {id(root): grad}
    order = topological_order(root)
    while order:
        # popped, not iterated: a tensor the backward pass is done with is not kept alive here
        node = order.pop()
        g = grads.pop(id(node), None)
        if g is None:
            continue
        ctx = node._ctx
        if ctx is None:
            node._accumulate_grad(g)
            run_grad_ready_hooks(node)
            continue
        if ctx.released:
            raise GradientError(
                f"backward() through {type(ctx).__name__} a second time: the first backward() "
                "freed what it saved; run the forward pass again"
            )
        input_grads = ctx.backward(g)
        inputs, needs_input_grad = ctx.inputs, ctx.needs_input_grad
        ctx.release()
        if len(input_grads) != len(inputs):
            raise GradientError(
                f"{type(ctx).__name__}.backward returned {len(input_grads)} gradients "
                f"for {len(inputs)} inputs"
            )
        for parent, needs, pg in zip(inputs, needs_input_grad, input_grads):
            if not needs or pg is None:
                continue
            pg = sum_to_shape(np.asarray(pg), parent.data.shape)
            if pg.dtype != parent.data.dtype:
                pg = pg.astype(parent.data.dtype)
            key = id(parent)
            prev = grads.get(key)
            grads[key] = pg if prev is None else prev + pg


bind_backward(backward)
