"""Run every benchmark script, one after another, and write one JSON file.

    python benchmarks/run_all.py [--output benchmarks.json] [--quick]

(``qatcore bench`` runs this.) The file holds the environment (CPU, core count,
Python, numpy / numba / torch versions, BLAS and numba thread counts, load
average) and each script's own JSON under its name. The scripts run in separate
processes and in sequence, so none measures another's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = ("bench_train_step", "bench_qat_step", "bench_fake_quant", "bench_int8", "bench_onnx", "bench_transformer",
           "bench_lowbit")


def environment() -> dict:
    import numba
    import numpy as np

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "load_average_1min": os.getloadavg()[0],
    }
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = None
    try:
        from threadpoolctl import threadpool_info  # optional: present with scikit-learn, say
        info["blas"] = [{k: pool.get(k) for k in ("internal_api", "num_threads", "version")}
                        for pool in threadpool_info()]
    except ImportError:
        info["blas"] = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas")
    try:
        import torch

        info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    except ImportError:
        info["torch"] = None
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks.json"))
    parser.add_argument("--quick", action="store_true", help="a smoke run with few repetitions")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    result = {"environment": environment(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": {}}
    status = 0
    for name in SCRIPTS:
        command = [sys.executable, str(here / f"{name}.py")] + (["--quick"] if args.quick else [])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            result["results"][name] = {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
            status = 1
            continue
        result["results"][name] = json.loads(done.stdout)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
