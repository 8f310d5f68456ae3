"""Where a training step's time goes: per primitive op and input shape (a layer, in practice),
forward and backward, for a network of bench_scale.py.

Prints one JSON object: ``step_ms`` (the median of the profiled steps, which the timers slow a
little), ``ops``: one entry per (op, input shapes) with ``calls`` per step and ``forward_ms`` /
``backward_ms`` per step, largest first, and ``by_op``: the same summed per op, with its share
of the step. Every op's time includes the kernels it calls; what is left of the step is Python,
the optimizer and the loss.

The timers wrap ``Function.apply`` (forward) and each Function's ``backward`` by patching the
classes in this process only; nothing in qatcore knows about them.

Usage: ``python benchmarks/profile_step.py [--model resnet20|resnet56|mobilenetv2] [--mode float|qat]
[--steps N]``
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

from bench_scale import BATCH, build_qatcore, load_batches, prepare_qatcore_qat, qatcore_step
from reference_models import CIFAR_MODELS
from timing import machine_info

from qatcore.autograd.function import Function


def _shape_key(arrays) -> str:
    return " ".join("x".join(map(str, a.shape)) for a in arrays if a is not None and hasattr(a, "shape"))


class OpTimer:
    """Accumulates forward and backward wall time per (op class, input shapes)."""

    def __init__(self):
        self.forward_s = collections.defaultdict(float)
        self.backward_s = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.enabled = False

    def install(self):
        timer = self
        original_apply = Function.apply.__func__

        def timed_apply(cls, *inputs, **params):
            if not timer.enabled:
                return original_apply(cls, *inputs, **params)
            start = time.perf_counter()
            out = original_apply(cls, *inputs, **params)
            key = (cls.__name__, _shape_key([None if t is None else t.data for t in inputs]))
            timer.forward_s[key] += time.perf_counter() - start
            timer.calls[key] += 1
            if out._ctx is not None:
                out._ctx.profile_key = key
            return out

        Function.apply = classmethod(timed_apply)
        for cls in _all_subclasses(Function):
            if "backward" in cls.__dict__:
                cls.backward = _timed_backward(cls.__dict__["backward"], timer)


def _timed_backward(backward, timer):
    def timed(self, g):
        start = time.perf_counter()
        grads = backward(self, g)
        key = self.__dict__.get("profile_key")
        if timer.enabled and key is not None:
            timer.backward_s[key] += time.perf_counter() - start
        return grads

    return timed


def _all_subclasses(cls):
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=CIFAR_MODELS, default="resnet20")
    parser.add_argument("--mode", choices=("float", "qat"), default="float")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps, after 2 warm-up steps")
    args = parser.parse_args()
    x, y = load_batches()
    model = build_qatcore(args.model).train() if args.mode == "float" else prepare_qatcore_qat(args.model, x)[1]
    step = qatcore_step(model, x[:BATCH], y[:BATCH])
    timer = OpTimer()
    timer.install()
    for _ in range(2):
        step()
    timer.enabled = True
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_ms = 1e3 * statistics.median(times)
    keys = set(timer.forward_s) | set(timer.backward_s)
    ops = [{"op": op, "inputs": shapes, "calls": timer.calls[(op, shapes)] / args.steps,
            "forward_ms": 1e3 * timer.forward_s[(op, shapes)] / args.steps,
            "backward_ms": 1e3 * timer.backward_s[(op, shapes)] / args.steps} for op, shapes in keys]
    ops.sort(key=lambda e: -(e["forward_ms"] + e["backward_ms"]))
    by_op = collections.defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0})
    for entry in ops:
        by_op[entry["op"]]["forward_ms"] += entry["forward_ms"]
        by_op[entry["op"]]["backward_ms"] += entry["backward_ms"]
    total = {op: {**v, "share_of_step": (v["forward_ms"] + v["backward_ms"]) / step_ms} for op, v in by_op.items()}
    total = dict(sorted(total.items(), key=lambda kv: -kv[1]["share_of_step"]))
    print(json.dumps({"benchmark": "profile_step", "model": args.model, "mode": args.mode, "batch": BATCH,
                      "machine": machine_info(), "step_ms": step_ms, "by_op": total, "ops": ops}, indent=1))


if __name__ == "__main__":
    main()
