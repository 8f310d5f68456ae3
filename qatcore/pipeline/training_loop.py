"""The epoch loop of both training stages, which stops cleanly between two steps.

A run is interrupted only at a step boundary, where the model, optimizer, schedule,
data loader and generator are consistent with each other and can be saved; resuming
from that state then reproduces the uninterrupted run exactly. The loop asks
``should_stop()`` after every step; :func:`stop_on_sigint` turns Ctrl-C into such a
request instead of a ``KeyboardInterrupt`` somewhere inside backward.

>>> import numpy as np
>>> from qatcore.data import DataLoader, load_digits
>>> from qatcore.models import MLP
>>> from qatcore.optim import SGD, CosineAnnealingLR
>>> x_train, y_train, _, _ = load_digits()
>>> model = MLP()
>>> optimizer = SGD(model.parameters(), lr=0.05)
>>> loader = DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(0))
>>> steps = []
>>> train_epochs(model, loader, optimizer, CosineAnnealingLR(optimizer, T_max=2), range(2),
...              label="float", on_progress=steps.append, should_stop=lambda: len(steps) == 30)
1
>>> steps[-1][:31]
'float epoch 2/2  batch 7/23  lo'
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

import numpy as np

from qatcore.data import DataLoader, ShardedLoader
from qatcore.distributed import DataParallel
from qatcore.nn import Module
from qatcore.process_group import current_group
from qatcore.training import EpochResult, train_one_epoch

__all__ = ["train_epochs", "stop_on_sigint"]


class _StopRequested(Exception):
    """Raised from the step callback to leave train_one_epoch between two steps."""


def train_epochs(model: Module, loader: DataLoader, optimizer, schedule, epochs: range, *, label: str,
                 on_progress: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_epoch: Callable[[str], None] | None = None,
                 after_epoch: Callable[[int], None] | None = None) -> int | None:
    """Train ``model`` for the ``epochs`` (a range of epoch indices, ``range(first, total)``),
    stepping ``schedule`` after each whole epoch; then ``after_epoch(next epoch index)`` runs
    (the run saves its resume point there, so a crash loses at most one epoch).

    In a data-parallel run (``qatcore.process_group.current_group()`` set), the model trains
    wrapped in ``DataParallel`` on this rank's ``ShardedLoader`` share of each global batch of
    ``loader``, and a stop requested on any rank stops every rank after the same step.

    After every step, ``on_progress`` gets a line such as ``"QAT epoch 2/3  batch 5/23
    loss 0.0412"`` and ``should_stop()`` is asked whether to stop. After every epoch,
    ``on_epoch`` gets a line such as ``"QAT epoch 2/3  loss 0.0398  train accuracy 98.96%
    1.4 s"`` (``EpochResult``; after a resumed epoch, of its remaining batches only).

    Returns:
        None when every epoch ran; otherwise the epoch index in which training stopped
        (that epoch's schedule step not taken, the loader mid-epoch), the state to save.
    """
    group = current_group()
    batches, trained = loader, model
    if group is not None:
        batches, trained = ShardedLoader(loader, group.rank, group.world_size), DataParallel(model, group)
    for epoch in epochs:
        def on_step(step: int, value: float, epoch: int = epoch) -> None:
            if on_progress is not None:
                on_progress(f"{label} epoch {epoch + 1}/{epochs.stop}  batch {step + 1}/{len(loader)}  "
                            f"loss {value:.4f}")
            if _stop_agreed(should_stop, group):
                raise _StopRequested()

        def on_epoch_end(result: EpochResult, epoch: int = epoch) -> None:
            if on_epoch is not None:
                on_epoch(f"{label} epoch {epoch + 1}/{epochs.stop}  {result}")

        try:
            train_one_epoch(trained, batches, optimizer, on_step=on_step, on_epoch=on_epoch_end)
        except _StopRequested:
            return epoch
        schedule.step()
        if after_epoch is not None:
            after_epoch(epoch + 1)
    return None


def _stop_agreed(should_stop: Callable[[], bool] | None, group) -> bool:
    """``should_stop()``, or, in a data-parallel run, whether it is True on any rank."""
    local = should_stop is not None and should_stop()
    if group is None:
        return local
    return bool(group.allreduce(np.array([local], dtype=np.int64), "max")[0])


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """Inside the block, Ctrl-C (SIGINT) only records a stop request; yields the
    ``should_stop`` check for :func:`train_epochs`. The previous handler is restored on
    exit. Off the main thread, where Python cannot handle signals, nothing is installed
    and the check stays False."""
    requested = False

    def handle(signum, frame) -> None:
        nonlocal requested
        requested = True

    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, handle) if installed else None
    try:
        yield lambda: requested
    finally:
        if installed:  # a handler set outside Python reads back as None
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
