"""A plain training loop and evaluation, shared by the CLI, the tests and the
benchmarks. Nothing in it knows about quantization: the same functions train a
float model and its QAT-prepared version.

>>> import numpy as np
>>> from qatcore.data import DataLoader, load_digits
>>> from qatcore.models import MLP
>>> from qatcore.optim import SGD
>>> x_train, y_train, x_test, y_test = load_digits()
>>> model = MLP()
>>> optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> loader = DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(0))
>>> for epoch in range(3):
...     loss = train_one_epoch(model, loader, optimizer)
>>> evaluate_accuracy(model, x_test, y_test) > 0.8
True
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from qatcore.autograd import no_grad
from qatcore.nn import Module
from qatcore.nn import functional as F
from qatcore.tensor import Tensor

__all__ = ["train_one_epoch", "predict", "evaluate_accuracy"]


def train_one_epoch(
    model: Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    optimizer,
    loss_fn: Callable = F.cross_entropy,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """One pass over ``batches``: forward, loss, backward, optimizer step.

    Returns the mean training loss; ``on_step(step, loss)`` is called after every
    step (progress display, statistics).
    """
    model.train()
    total, count = 0.0, 0
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss = loss_fn(model(Tensor._from_array(np.asarray(x), requires_grad=False)), y)
        loss.backward()
        optimizer.step()
        value = loss.item()
        total += value * len(x)
        count += len(x)
        if on_step is not None:
            on_step(step, value)
    return total / max(count, 1)


def predict(model: Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Model outputs for ``x`` in eval mode, without recording a graph."""
    model.eval()
    outputs = []
    with no_grad():
        for start in range(0, len(x), batch_size):
            out = model(Tensor._from_array(np.asarray(x[start:start + batch_size]), requires_grad=False))
            outputs.append(out.data)
    return np.concatenate(outputs) if outputs else np.empty((0,), dtype=np.float32)


def evaluate_accuracy(model: Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Fraction of samples whose arg-max output equals the label."""
    logits = predict(model, x, batch_size)
    return float(np.mean(np.argmax(logits, axis=1) == y))
