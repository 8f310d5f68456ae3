"""Timing helpers shared by the benchmark scripts (run as scripts, so this folder is on
sys.path and ``from timing import ...`` finds this file)."""

from __future__ import annotations

import statistics
import time

__all__ = ["median_time_s", "settle", "SETTLE_S"]

# OpenBLAS's threads spin for a while after each call; a phase that must not see them waits this long.
SETTLE_S = 0.5


def median_time_s(fn, repeats: int, warmup: int = 2, before=None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones;
    ``before()``, if given, runs untimed before each call."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def settle() -> None:
    """Wait for BLAS and numba worker threads to stop spinning."""
    time.sleep(SETTLE_S)
