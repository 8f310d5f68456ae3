"""``ShardedLoader``: each rank's share of every global batch of a ``DataLoader``.

In a data-parallel run every rank builds the same ``DataLoader`` (same arrays, global
batch size and generator seed), so every rank draws the same order and the same global
batches. The sharded loader yields, of global batch ``b`` (its samples ``s_0 .. s_{B-1}``),
the contiguous part ``np.array_split(range(B), world_size)[rank]``: the shares are
disjoint, cover the batch, and differ in size by at most one sample (rank order: the
first ``B mod world_size`` ranks take one more).

Its ``state_dict`` is the global loader's, which says nothing about the world size: a run
saved with 2 ranks resumes with 1 or 4 ranks at the same global batch.

>>> import numpy as np
>>> from qatcore.data import DataLoader
>>> x, y = np.arange(10.0)[:, None], np.arange(10)
>>> [yb.tolist() for _, yb in ShardedLoader(DataLoader(x, y, batch_size=4), rank=1, world_size=2)]
[[2, 3], [6, 7], [9]]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from qatcore.data.loader import DataLoader
from qatcore.errors import ConfigError

__all__ = ["ShardedLoader", "share_bounds"]


def share_bounds(batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s share of a batch of ``batch`` samples."""
    base, extra = divmod(batch, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedLoader:
    """Rank ``rank`` of ``world_size``'s share of every batch of ``loader`` (module docstring).

    Raises:
        ConfigError: a bad rank or world size, or a global batch (the last one too, unless
            the loader drops it) smaller than the world size, which would leave a rank with
            no sample.
    """

    def __init__(self, loader: DataLoader, rank: int, world_size: int) -> None:
        if not isinstance(loader, DataLoader):
            raise ConfigError(f"ShardedLoader: loader must be a DataLoader, got {type(loader).__name__}")
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"ShardedLoader: {name} must be an int, got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"ShardedLoader: need 0 <= rank < world_size, got rank {rank} of {world_size}")
        smallest = loader.batch_size
        remainder = loader.num_samples % loader.batch_size
        if remainder and not loader.drop_last:
            smallest = remainder
        if loader.num_samples < loader.batch_size and not loader.drop_last:
            smallest = loader.num_samples
        if smallest < world_size:
            raise ConfigError(
                f"ShardedLoader: a global batch of {smallest} samples cannot be shared by {world_size} ranks "
                f"(batch_size {loader.batch_size}, {loader.num_samples} samples); use a larger batch, fewer "
                "ranks, or drop_last=True")
        self.loader, self.rank, self.world_size = loader, int(rank), int(world_size)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int:
        """The global batch size."""
        return self.loader.batch_size

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for xb, yb in self.loader:
            start, stop = share_bounds(xb.shape[0], self.rank, self.world_size)
            yield xb[start:stop], yb[start:stop]

    def state_dict(self) -> dict[str, Any]:
        """The global loader's state (no world size in it)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
