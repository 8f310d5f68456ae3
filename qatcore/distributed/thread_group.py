"""``ThreadGroup``: N simulated ranks as N threads of one process.

It reduces exactly as an MPI group does (every rank gets the same bits), so the
equivalences of a data-parallel run (synchronized BatchNorm, observers on the global
batch, averaged gradients) can be shown and tested in one process, without MPI. The
reduction takes the ranks' arrays in rank order: ``((a0 op a1) op a2) ...``.

>>> import numpy as np
>>> from qatcore.process_group import current_group
>>> def work(group):
...     return float(current_group().allreduce(np.array([group.rank + 1.0]), "sum")[0])
>>> ThreadGroup.run(3, work)
[6.0, 6.0, 6.0]
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from qatcore.errors import ConfigError, DistributedError
from qatcore.process_group import REDUCE_OPS, ProcessGroup, use_group

__all__ = ["ThreadGroup"]

_COMBINE = {"sum": np.add, "min": np.minimum, "max": np.maximum}


class _Shared:
    def __init__(self, world_size: int, timeout: float) -> None:
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[np.ndarray | None] = [None] * world_size


class ThreadGroup(ProcessGroup):
    """One simulated rank; :meth:`run` makes the group and runs a function on every rank."""

    def __init__(self, rank: int, world_size: int, shared: _Shared) -> None:
        self.rank, self.world_size, self._shared = rank, world_size, shared

    def allreduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        if op not in REDUCE_OPS:
            raise ConfigError(f"ThreadGroup.allreduce: op must be one of {REDUCE_OPS}, got {op!r}")
        shared = self._shared
        shared.slots[self.rank] = np.asarray(array)
        try:
            shared.barrier.wait()
            parts = shared.slots
            if any(p.shape != parts[0].shape for p in parts):
                raise DistributedError(
                    f"ThreadGroup.allreduce: the ranks reduce arrays of different shapes "
                    f"{[p.shape for p in parts]}; every rank must make the same reductions in the same order")
            result = parts[0].copy()
            for part in parts[1:]:
                _COMBINE[op](result, part, out=result)
            shared.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        except threading.BrokenBarrierError:
            raise DistributedError(f"ThreadGroup: rank {self.rank} waited for ranks that failed or "
                                   "stopped reducing") from None
        return result

    @classmethod
    def run(cls, world_size: int, fn: Callable[[ThreadGroup], Any], timeout: float = 60.0) -> list[Any]:
        """Run ``fn(group)`` on ``world_size`` threads, each inside ``use_group(its group)``;
        returns their results in rank order. An exception on any rank breaks the group (the
        others raise DistributedError instead of waiting) and is re-raised here."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"ThreadGroup.run: world_size must be a positive int, got {world_size!r}")
        shared = _Shared(world_size, timeout)
        results: list[Any] = [None] * world_size
        errors: list[BaseException | None] = [None] * world_size

        def main(rank: int) -> None:
            group = cls(rank, world_size, shared)
            try:
                with use_group(group):
                    results[rank] = fn(group)
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors[rank] = e
                shared.barrier.abort()

        threads = [threading.Thread(target=main, args=(rank,), name=f"rank {rank}") for rank in range(world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        first = next((e for e in errors if e is not None and not isinstance(e, DistributedError)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results
