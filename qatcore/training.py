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
>>> epochs = []
>>> for epoch in range(3):
...     loss = train_one_epoch(model, loader, optimizer, on_epoch=epochs.append)
>>> evaluate_accuracy(model, x_test, y_test) > 0.8
True
>>> epochs[-1].loss == loss, epochs[-1].samples, epochs[-1].accuracy > 0.8
(True, 1438, True)
>>> str(epochs[-1]).split("  ")[0][:5]
'loss '
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from qatcore.autograd import no_grad
from qatcore.nn import Module
from qatcore.nn import functional as F
from qatcore.tensor import Tensor

__all__ = ["EpochResult", "train_one_epoch", "predict", "evaluate_accuracy"]


@dataclass(frozen=True)
class EpochResult:
    """What one call of :func:`train_one_epoch` measured.

    Fields:
        loss: the mean training loss over the epoch's samples.
        accuracy: the fraction of the epoch's samples whose arg-max output equals the
            label, read from the training-mode outputs as the model trained (no extra
            forward pass); None when the outputs are not (N, classes) scores with
            integer labels (a regression loss, say).
        samples, steps: how many samples and optimizer steps the epoch had.
        time_s: its wall time in seconds.
    """

    loss: float
    accuracy: float | None
    samples: int
    steps: int
    time_s: float

    def __str__(self) -> str:
        accuracy = "" if self.accuracy is None else f"  train accuracy {100 * self.accuracy:.2f}%"
        return f"loss {self.loss:.4f}{accuracy}  {self.time_s:.1f} s"


def _correct(logits: np.ndarray, y) -> int | None:
    """Samples whose arg-max output is the label, or None when that means nothing here."""
    labels = np.asarray(y)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        return None
    return int(np.sum(np.argmax(logits, axis=1) == labels))


def train_one_epoch(
    model: Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    optimizer,
    loss_fn: Callable = F.cross_entropy,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> float:
    """One pass over ``batches``: forward, loss, backward, optimizer step.

    Returns the mean training loss. ``on_step(step, loss)`` is called after every step
    (progress display, statistics); ``on_epoch(result)`` once at the end with the
    epoch's :class:`EpochResult` (loss, training accuracy, time), for a log line.
    """
    model.train()
    start = time.perf_counter()
    total, count, correct, steps = 0.0, 0, 0, 0
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        output = model(Tensor._from_array(np.asarray(x), requires_grad=False))
        loss = loss_fn(output, y)
        loss.backward()
        optimizer.step()
        value = loss.item()
        total += value * len(x)
        count += len(x)
        steps += 1
        if correct is not None:
            hits = _correct(output.data, y)
            correct = None if hits is None else correct + hits
        if on_step is not None:
            on_step(step, value)
    mean_loss = total / max(count, 1)
    if on_epoch is not None:
        accuracy = None if correct is None or count == 0 else correct / count
        on_epoch(EpochResult(mean_loss, accuracy, count, steps, time.perf_counter() - start))
    return mean_loss


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
