"""``DataLoader``: mini-batches over a pair of numpy arrays, resumable mid-epoch.

Each ``iter(loader)`` is one epoch. With ``shuffle=True`` the epoch's order is
``rng.permutation(N)`` drawn from the caller's ``np.random.Generator`` (without one,
from a generator the loader spawns from qatcore's default generator, which
:func:`qatcore.manual_seed` fixes), so the whole sequence of epochs is fixed by the
generator's seed. Batch ``b`` of an epoch
holds the samples ``order[b * batch_size : (b + 1) * batch_size]``; there are
``ceil(N / batch_size)`` batches, or ``floor(N / batch_size)`` with ``drop_last``.

For checkpointing, :meth:`DataLoader.state_dict` records the generator state from
which the current epoch's order was drawn, that order, and the index of the next
batch. :meth:`DataLoader.load_state_dict` puts the generator back, draws the
order again (leaving the generator exactly where the uninterrupted run left it),
and makes the next ``iter()`` continue the interrupted epoch from that batch.
Resumption is exact when the loader owns its generator; if other code draws
from the same generator during an epoch, those draws are not replayed.

>>> import numpy as np
>>> x, y = np.arange(10.0).reshape(5, 2), np.arange(5)
>>> [yb.tolist() for _, yb in DataLoader(x, y, batch_size=2)]
[[0, 1], [2, 3], [4]]
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np

from qatcore.errors import ConfigError
from qatcore.random import spawn_generator

__all__ = ["DataLoader"]

_STATE_KEYS = ("num_samples", "batch_size", "drop_last", "shuffle", "epoch",
               "next_batch", "rng_state", "order")


class DataLoader:
    """Iterate ``(x_batch, y_batch)`` over the first axis of ``x`` and ``y``.

    Args:
        x: inputs, a numpy array with at least one dimension; axis 0 indexes samples.
        y: targets, a numpy array with the same length as ``x`` along axis 0.
        batch_size: positive number of samples a batch.
        shuffle: draw a new random order every epoch.
        rng: the ``np.random.Generator`` the orders are drawn from; the loader
            advances it by one ``permutation`` call per epoch. None: shuffling
            loaders spawn a generator of their own from qatcore's default generator
            (``qatcore.random.spawn_generator``). Unused when ``shuffle`` is False.
        drop_last: leave out the last batch of an epoch when it is smaller than
            ``batch_size``.

    Yields (per ``iter()``, one epoch):
        ``(x_batch, y_batch)``: slices (views) of ``x`` and ``y`` in order, or
        copies gathered by the permutation when shuffling.

    Raises:
        ConfigError: an argument is of the wrong type or out of range.

    >>> import numpy as np
    >>> loader = DataLoader(np.zeros((10, 3)), np.arange(10), batch_size=4,
    ...                     shuffle=True, rng=np.random.default_rng(0))
    >>> len(loader), sorted(int(i) for _, yb in loader for i in yb) == list(range(10))
    (3, True)
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int = 64,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        for name, array in (("x", x), ("y", y)):
            if not isinstance(array, np.ndarray) or array.ndim == 0:
                raise ConfigError(
                    f"DataLoader: {name} must be a numpy array with at least one dimension, "
                    f"got {type(array).__name__}"
                    + (" with 0 dimensions" if isinstance(array, np.ndarray) else "")
                )
        if x.shape[0] != y.shape[0]:
            raise ConfigError(
                f"DataLoader: x and y must have the same length along axis 0, "
                f"got x with {x.shape[0]} and y with {y.shape[0]} samples"
            )
        if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                or batch_size < 1):
            raise ConfigError(f"DataLoader: batch_size must be a positive int, got {batch_size!r}")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise ConfigError(f"DataLoader: {name} must be True or False, got {flag!r}")
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise ConfigError(
                f"DataLoader: rng must be a numpy.random.Generator "
                f"(e.g. np.random.default_rng(seed)) or None, got {type(rng).__name__}"
            )
        if shuffle and rng is None:
            rng = spawn_generator()  # the loader's own stream, so its state_dict resumes exactly
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rng = rng
        # Progress of the current epoch; an epoch is started by __iter__.
        self._epoch = 0  # number of epochs started so far
        self._epoch_rng_state: dict[str, Any] | None = None  # rng state the order came from
        self._order: np.ndarray | None = None  # None when not shuffling
        self._next_batch = 0
        self._resume_pending = False  # set by load_state_dict: next iter() continues

    @property
    def num_samples(self) -> int:
        """Number of samples (length of ``x`` along axis 0)."""
        return int(self.x.shape[0])

    def __len__(self) -> int:
        """Number of batches in one epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return (self.num_samples + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Start the next epoch, or continue the epoch restored by ``load_state_dict``."""
        resuming = self._resume_pending and self._epoch > 0 and self._next_batch < len(self)
        self._resume_pending = False
        if not resuming:
            self._start_epoch()
        return self._batches(self._epoch, self._order, self._next_batch)

    def _start_epoch(self) -> None:
        self._epoch += 1
        self._next_batch = 0
        if self.shuffle:
            self._epoch_rng_state = copy.deepcopy(self.rng.bit_generator.state)
            self._order = self.rng.permutation(self.num_samples)

    def _batches(
        self, epoch: int, order: np.ndarray | None, batch_index: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # An iterator from an earlier iter() stops updating the loader's progress
        # once a newer epoch has started, so state_dict() follows the newest epoch.
        while batch_index < len(self):
            start = batch_index * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            batch_index += 1
            if epoch == self._epoch:
                self._next_batch = batch_index
            if order is None:
                yield self.x[start:stop], self.y[start:stop]
            else:
                rows = order[start:stop]
                yield self.x[rows], self.y[rows]

    def state_dict(self) -> dict[str, Any]:
        """The progress of the loader as plain Python/numpy values (copies).

        Returns:
            a dict with ``num_samples``, ``batch_size``, ``drop_last``, ``shuffle``
            (to check the state fits the loader it is loaded into), ``epoch`` (epochs
            started), ``next_batch`` (index of the next batch of the current epoch),
            ``rng_state`` (the generator's ``bit_generator.state`` at the start of
            the current epoch, or now if no epoch has started; None when not
            shuffling) and ``order`` (the current epoch's permutation as int64, or
            None when not shuffling or before the first epoch).

        >>> import numpy as np
        >>> loader = DataLoader(np.zeros((6, 1)), np.arange(6), batch_size=2,
        ...                     shuffle=True, rng=np.random.default_rng(1))
        >>> batches = iter(loader)
        >>> _ = next(batches)
        >>> state = loader.state_dict()
        >>> state["epoch"], state["next_batch"]
        (1, 1)
        """
        if not self.shuffle:
            rng_state = None
        elif self._epoch == 0:
            rng_state = copy.deepcopy(self.rng.bit_generator.state)
        else:
            rng_state = copy.deepcopy(self._epoch_rng_state)
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "epoch": self._epoch,
            "next_batch": self._next_batch,
            "rng_state": rng_state,
            "order": None if self._order is None else self._order.astype(np.int64, copy=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict`; the next ``iter()`` resumes.

        The remaining batches of the interrupted epoch, and every later epoch, are
        the ones the uninterrupted run would have produced. With ``shuffle`` the
        loader's ``rng`` is set back to ``state["rng_state"]`` and advanced by
        redrawing the epoch's order, which must equal ``state["order"]``.

        Args:
            state: a dict from :meth:`state_dict` of a loader with the same number
                of samples, ``batch_size``, ``drop_last`` and ``shuffle``.

        Raises:
            ConfigError: a key is missing, unknown, of the wrong type or does not
                fit this loader; the message names the key.

        >>> import numpy as np
        >>> def make():
        ...     return DataLoader(np.arange(8), np.arange(8), batch_size=3,
        ...                       shuffle=True, rng=np.random.default_rng(7))
        >>> first = make()
        >>> batches = iter(first)
        >>> _ = next(batches)
        >>> second = make()
        >>> second.load_state_dict(first.state_dict())
        >>> [b.tolist() for b, _ in second] == [b.tolist() for b, _ in batches]
        True
        """
        self._check_state(state)
        epoch, next_batch = int(state["epoch"]), int(state["next_batch"])
        order = None
        if self.shuffle:
            try:
                self.rng.bit_generator.state = copy.deepcopy(state["rng_state"])
            except (TypeError, ValueError, KeyError) as error:
                raise ConfigError(
                    f"DataLoader.load_state_dict: key 'rng_state' does not fit this loader's "
                    f"{type(self.rng.bit_generator).__name__} generator "
                    f"({type(error).__name__}: {error})"
                ) from error
            if epoch > 0:
                epoch_rng_state = copy.deepcopy(self.rng.bit_generator.state)
                order = self.rng.permutation(self.num_samples)
                if not np.array_equal(order, state["order"]):
                    raise ConfigError(
                        "DataLoader.load_state_dict: key 'order' is not the permutation "
                        "drawn from key 'rng_state'; the state is inconsistent"
                    )
                self._epoch_rng_state = epoch_rng_state
        self._epoch, self._next_batch, self._order = epoch, next_batch, order
        self._resume_pending = True

    def _check_state(self, state: dict[str, Any]) -> None:
        where = "DataLoader.load_state_dict"
        if not isinstance(state, dict):
            raise ConfigError(f"{where}: state must be a dict, got {type(state).__name__}")
        for key in _STATE_KEYS:
            if key not in state:
                raise ConfigError(f"{where}: key {key!r} is missing")
        for key in state:
            if key not in _STATE_KEYS:
                raise ConfigError(
                    f"{where}: key {key!r} is unknown; expected keys {list(_STATE_KEYS)}"
                )
        for key in ("num_samples", "batch_size", "epoch", "next_batch"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ConfigError(f"{where}: key {key!r} must be a non-negative int, got {value!r}")
        for key in ("drop_last", "shuffle"):
            if not isinstance(state[key], bool):
                raise ConfigError(f"{where}: key {key!r} must be True or False, "
                                  f"got {state[key]!r}")
        expected = {"num_samples": self.num_samples, "batch_size": self.batch_size,
                    "drop_last": self.drop_last, "shuffle": self.shuffle}
        for key, value in expected.items():
            if state[key] != value:
                raise ConfigError(
                    f"{where}: key {key!r} is {state[key]!r} but this loader has {value!r}"
                )
        if state["next_batch"] > len(self):
            raise ConfigError(
                f"{where}: key 'next_batch' is {state['next_batch']} but an epoch has only "
                f"{len(self)} batches"
            )
        if state["epoch"] == 0 and state["next_batch"] != 0:
            raise ConfigError(
                f"{where}: key 'next_batch' must be 0 before the first epoch (epoch=0), "
                f"got {state['next_batch']}"
            )
        if not self.shuffle:
            for key in ("rng_state", "order"):
                if state[key] is not None:
                    raise ConfigError(f"{where}: key {key!r} must be None when shuffle=False")
            return
        if not isinstance(state["rng_state"], dict):
            raise ConfigError(f"{where}: key 'rng_state' must be a dict "
                              f"(a bit_generator.state), got {type(state['rng_state']).__name__}")
        order = state["order"]
        if state["epoch"] == 0:
            if order is not None:
                raise ConfigError(f"{where}: key 'order' must be None before the first epoch")
        elif not isinstance(order, np.ndarray) or order.shape != (self.num_samples,):
            raise ConfigError(
                f"{where}: key 'order' must be a numpy array of shape ({self.num_samples},), got "
                + (f"shape {order.shape}" if isinstance(order, np.ndarray)
                   else type(order).__name__)
            )
