"""Data-parallel QAT throughput on MPI, and the scaling model of docs/distributed.md.

ResNet-20 QAT training steps (default 8-bit config, 64 samples per rank per step, the
32x32x3 digits), in three configurations measured in this run:

- ``one_process_one_thread``: the baseline (OPENBLAS_NUM_THREADS=1, NUMBA_NUM_THREADS=1);
- ``one_process_two_threads``: the same process with two BLAS/numba threads;
- ``two_processes_one_thread``: ``mpiexec -n 2``, one thread each, ``DataParallel``
  (global batch 128: each rank trains on the same number of samples per step as the baseline).

Throughput is samples per second of the global batch (median step time). The target of
issue 18: two processes >= 1.8x one process of one thread.

The two-rank run also counts what the ranks reduce per step (calls and bytes, by kind:
gradient buckets, BatchNorm statistics, observer ranges, the rest), which feeds the
scaling model: per step, every reduction of ``S`` bytes over ``p`` ranks costs what the
better of the two classic allreduce algorithms costs (Thakur, Rabenseifner and Gropp 2005;
latency ``alpha`` per message, bandwidth ``beta``):

    ring (large S):                T = 2 (p - 1) alpha + 2 (p - 1) / p * S / beta
    recursive doubling (small S):  T = log2(p) * (alpha + S / beta)

and the projected efficiency is ``t_step / (t_step + sum T)`` with ``t_step`` the
measured one-thread step (no overlap of communication with computation assumed: a
lower bound). The TinyGPT line uses a
stated parameter count and an assumed step time (issue 19 will measure it).

    python benchmarks/bench_distributed.py                          # prints one JSON object
    python benchmarks/bench_distributed.py --steps 4 --processes 1  # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BATCH = 64
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
TWO_THREADS = {"OPENBLAS_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
LINKS = {"10 Gb/s Ethernet": (25e-6, 10e9 / 8), "100 Gb/s InfiniBand": (3e-6, 100e9 / 8)}
RANKS = (8, 16, 32, 64)
# TinyGPT-size (issue 19's default TinyGPT): 4 layers, d_model 128, 65-character vocabulary, 64
# positions, untied head: per block 12 d^2 + 13 d (qkv, proj, the MLP, two LayerNorms), plus the
# embeddings (V + T) d, the final LayerNorm 2 d and the head V d; float32 gradients, no BatchNorm,
# no activation observers (per-token dynamic activation quantization reduces nothing); its step
# time is assumed.
TINYGPT_PARAMETERS = 4 * (12 * 128 ** 2 + 13 * 128) + (65 + 64) * 128 + 2 * 128 + 65 * 128
TINYGPT_ASSUMED_STEP_S = 0.5


def child(steps: int, distributed: bool) -> None:
    """One configuration: time ``steps`` QAT steps (after 2 warm-up steps); rank 0 prints JSON."""
    sys.path.insert(0, str(HERE))
    from reference_models import build_cifar

    import qatcore.nn.functional as F
    from qatcore import no_grad
    from qatcore.data import load_digits
    from qatcore.optim import SGD
    from qatcore.process_group import use_group
    from qatcore.quantization.qat import QATPreparer

    group, counts = None, {}
    if distributed:
        from qatcore.distributed import MPIGroup
        group = MPIGroup.world()
        counts = _count_reductions(group)
        waited = _time_waits(group)
    rank, world = (0, 1) if group is None else (group.rank, group.world_size)
    x_all, y_all, _, _ = load_digits(image_size=32, channels=3)
    x = np.ascontiguousarray(x_all[rank * BATCH:(rank + 1) * BATCH])
    y = np.ascontiguousarray(y_all[rank * BATCH:(rank + 1) * BATCH])
    with use_group(group):
        model = QATPreparer().prepare_for_qat(build_cifar("resnet20"))
        model.train()
        with no_grad():
            model(x)
        if group is not None:
            from qatcore.distributed import DataParallel
            model = DataParallel(model, group)
        optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9)
        times = []
        for index in range(steps + 2):
            if group is not None:
                group.barrier()
            start = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if group is not None:
                group.barrier()
            times.append(time.perf_counter() - start)
            if index == 1:
                for value in counts.values():
                    value.update(calls=0, bytes=0)
                if group is not None:
                    waited.update(s=0.0, waits=0)
    step_s = float(np.median(times[2:]))
    if rank == 0:
        waits = {} if group is None else {"waiting_ms_per_step": 1e3 * waited["s"] / steps,
                                          "waits_per_step": waited["waits"] / steps}
        print(json.dumps({"ranks": world, "step_ms": 1e3 * step_s, "samples_per_s": world * BATCH / step_s, **waits,
                          "reduced_per_step": {kind: {"calls": c["calls"] / steps, "bytes": c["bytes"] / steps}
                                               for kind, c in counts.items()}}), flush=True)


def _time_waits(group) -> dict:
    """Wrap the group's waits (every reduction, barrier and gather waits in one) to add up the
    time rank 0 spends waiting for the others: communication plus the other ranks' lateness."""
    waited = {"s": 0.0, "waits": 0}
    original = group._wait_until

    def timed(done, what):
        start = time.perf_counter()
        try:
            return original(done, what)
        finally:
            waited["s"] += time.perf_counter() - start
            waited["waits"] += 1

    group._wait_until = timed
    return waited


def _count_reductions(group) -> dict:
    """Wrap the group's reductions to count calls and bytes per step, by the caller's kind."""
    counts = {kind: {"calls": 0, "bytes": 0}
              for kind in ("gradients", "batch_norm", "observers", "statistics", "other")}

    def kind_of() -> str:
        frame = sys._getframe(2)
        for _ in range(8):
            name = frame.f_code.co_filename
            if "data_parallel" in name:
                return "gradients" if frame.f_code.co_name in ("_launch", "_finish") else "other"
            if "statistics" in name:
                return "statistics"
            if "normalization" in name:
                return "batch_norm"
            if "observer" in name:
                return "observers"
            frame = frame.f_back
            if frame is None:
                break
        return "other"

    original = group.iallreduce  # every reduction goes through it (allreduce waits on one)

    def counted(array, op="sum"):
        entry = counts[kind_of()]
        entry["calls"] += 1
        entry["bytes"] += np.asarray(array).nbytes
        return original(array, op)

    group.iallreduce = counted
    return counts


def _run_child(env_extra: dict, steps: int, ranks: int = 1) -> dict:
    env = {**os.environ, **env_extra}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--steps", str(steps)]
    if ranks > 1:
        from qatcore.distributed import find_mpiexec
        command = [find_mpiexec(), "-n", str(ranks)] + command + ["--distributed"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict]) -> dict:
    """The run with the median step time, with every run's step time beside it."""
    ordered = sorted(runs, key=lambda run: run["step_ms"])
    return {**ordered[len(ordered) // 2], "step_ms_each_process": [run["step_ms"] for run in runs]}


def allreduce_s(size_bytes: float, ranks: int, alpha: float, beta: float) -> float:
    """An allreduce's time for ``size_bytes`` over ``ranks``: the better of ring and recursive
    doubling (module docstring)."""
    ring = 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * size_bytes / beta
    doubling = math.log2(ranks) * (alpha + size_bytes / beta)
    return min(ring, doubling)


def scaling_model(step_s: float, reduced: dict) -> dict:
    """Projected efficiency of ResNet-20 QAT (the measured reductions) and TinyGPT (stated)."""
    projections = {}
    for link, (alpha, beta) in LINKS.items():
        for ranks in RANKS:
            comm = sum(entry["calls"] * allreduce_s(entry["bytes"] / max(entry["calls"], 1), ranks, alpha, beta)
                       for entry in reduced.values() if entry["calls"])
            gpt_bytes = 4 * TINYGPT_PARAMETERS
            # its gradients in two buckets, the batch size and the stop flag
            gpt_comm = (2 * allreduce_s(gpt_bytes / 2, ranks, alpha, beta)
                        + 2 * allreduce_s(8, ranks, alpha, beta))
            projections[f"{link}, {ranks} ranks"] = {
                "resnet20_comm_ms": 1e3 * comm, "resnet20_efficiency": step_s / (step_s + comm),
                "tinygpt_comm_ms": 1e3 * gpt_comm,
                "tinygpt_efficiency": TINYGPT_ASSUMED_STEP_S / (TINYGPT_ASSUMED_STEP_S + gpt_comm)}
    return {"formula": "per reduction T(S,p) = min(2(p-1) alpha + 2(p-1)/p S/beta, log2(p) (alpha + S/beta)); "
                       "efficiency t/(t + sum T), no overlap",
            "links": {link: {"alpha_s": a, "beta_bytes_per_s": b} for link, (a, b) in LINKS.items()},
            "resnet20_step_s": step_s, "tinygpt_parameters": TINYGPT_PARAMETERS,
            "tinygpt_assumed_step_s": TINYGPT_ASSUMED_STEP_S, "projections": projections}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes per configuration; the figures are their medians")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.distributed)
        return
    sys.path.insert(0, str(HERE))
    from timing import machine_info

    # A process's step time is bimodal here (the same work takes ~490 or ~700 ms, by process,
    # whatever the configuration): each configuration runs in --processes fresh processes,
    # interleaved, and the figures are their medians (every process's figure is listed).
    runs: dict[str, list[dict]] = {"one": [], "two_threads": [], "two_processes": []}
    for _ in range(args.processes):
        runs["one"].append(_run_child(ONE_THREAD, args.steps))
        runs["two_threads"].append(_run_child(TWO_THREADS, args.steps))
        runs["two_processes"].append(_run_child(ONE_THREAD, args.steps, ranks=2))
    one, two_threads, two_processes = (_median_run(runs[k]) for k in ("one", "two_threads", "two_processes"))
    reduced = two_processes["reduced_per_step"]
    print(json.dumps({
        "benchmark": "bench_distributed", "model": "resnet20 QAT (default 8-bit)", "batch_per_rank": BATCH,
        "steps": args.steps, "processes_per_configuration": args.processes, "machine": machine_info(),
        "one_process_one_thread": one, "one_process_two_threads": two_threads,
        "two_processes_one_thread": two_processes,
        "speedup_two_processes": two_processes["samples_per_s"] / one["samples_per_s"],
        "speedup_two_threads": two_threads["samples_per_s"] / one["samples_per_s"],
        "target_two_processes": 1.8,
        "scaling_model": scaling_model(one["step_ms"] / 1e3, reduced),
    }, indent=2))


if __name__ == "__main__":
    main()
