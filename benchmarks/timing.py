"""Timing helpers shared by the benchmark scripts (run as scripts, so this folder is on
sys.path and ``from timing import ...`` finds this file)."""

from __future__ import annotations

import os
import platform
import statistics
import time

__all__ = ["median_time_s", "settle", "SETTLE_S", "machine_info", "run_sections"]

# The environment variables that change how fast numpy's BLAS and numba's threads run.
SPEED_ENVIRONMENT = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                     "NUMBA_NUM_THREADS")

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


def machine_info() -> dict:
    """What a benchmark figure depends on: CPU (and its VNNI support), cores, versions, numba's
    threads, the BLAS environment variables and the load average when the run started."""
    import llvmlite.binding as llvm
    import numba
    import numpy as np

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    features = llvm.get_host_cpu_features()
    return {"cpu": model, "llvm_cpu": llvm.get_host_cpu_name(), "cores": os.cpu_count(),
            "avx512_vnni": bool(features.get("avx512vnni", False)), "avx_vnni": bool(features.get("avxvnni", False)),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
            "llvm": ".".join(map(str, llvm.llvm_version_info)), "numba_threads": numba.get_num_threads(),
            "env": {key: os.environ.get(key) for key in SPEED_ENVIRONMENT},
            "load_average_1min_at_start": os.getloadavg()[0]}


def run_sections(result: dict, sections: dict, names, args) -> dict:
    """Run ``sections[name](args)`` for each name into ``result`` (a section returning None is
    left out), then note in ``result["machine"]`` numba's threading layer (None when no
    parallel region ran) and the load average at the end. Returns ``result``."""
    import numba

    for name in names:
        figures = sections[name](args)
        if figures is not None:
            result[name] = figures
    try:
        result["machine"]["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region ran
        result["machine"]["numba_threading_layer"] = None
    result["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    return result
