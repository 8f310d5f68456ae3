"""Training-step and conv2d speed, each next to a baseline measured in the same run.

Prints one JSON object:

- ``digits_cnn_step_ms``: median time of one training step (forward, cross-entropy,
  backward, SGD step) of DigitsCNN at batch 64;
- ``conv2d_fwd_bwd_gflops``: conv2d forward + backward (input and weight gradients)
  at N=32, C=K=64, H=W=56, 3x3, padding 1; FLOPs counted as 3 GEMMs of
  2 * N * K * C * 9 * H * W each;
- ``numpy_matmul_1024_gflops``: numpy float32 matmul at 1024^3, the machine's BLAS rate;
- the same step and conv figures for PyTorch eager CPU when torch is installed.

Usage: ``python benchmarks/bench_train_step.py [--repeats N] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
from timing import median_time_s

import qatcore.nn.functional as F
from qatcore import Tensor
from qatcore.models import DigitsCNN
from qatcore.optim import SGD


def numpy_matmul_gflops(n: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    seconds = median_time_s(lambda: a @ b, repeats)
    return 2 * n**3 / seconds / 1e9


def qatcore_step_ms(repeats: int) -> float:
    rng = np.random.default_rng(0)
    model = DigitsCNN()
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = rng.random((64, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, size=64)

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(Tensor._from_array(x, False)), y)
        loss.backward()
        optimizer.step()

    return 1e3 * median_time_s(step, repeats, warmup=5)


CONV_SHAPE = dict(n=32, c=64, k=64, h=56, w=56, kernel=3)


def conv_flops() -> float:
    s = CONV_SHAPE
    return 3 * 2 * s["n"] * s["k"] * s["c"] * s["kernel"] ** 2 * s["h"] * s["w"]


def qatcore_conv_gflops(repeats: int) -> float:
    s = CONV_SHAPE
    rng = np.random.default_rng(0)
    x = Tensor(rng.random((s["n"], s["c"], s["h"], s["w"]), dtype=np.float32), requires_grad=True)
    w = Tensor(rng.random((s["k"], s["c"], 3, 3), dtype=np.float32) - 0.5, requires_grad=True)
    g = rng.random((s["n"], s["k"], s["h"], s["w"]), dtype=np.float32)

    def fwd_bwd():
        x.grad = w.grad = None
        F.conv2d(x, w, padding=1).backward(g)

    return conv_flops() / median_time_s(fwd_bwd, repeats, warmup=1) / 1e9


def torch_figures(repeats: int, step_only: bool = False) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(128, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step_ms = 1e3 * median_time_s(step, repeats, warmup=5)
    if step_only:
        return {"digits_cnn_step_ms": step_ms}
    s = CONV_SHAPE
    xc = torch.rand(s["n"], s["c"], s["h"], s["w"], requires_grad=True)
    wc = (torch.rand(s["k"], s["c"], 3, 3) - 0.5).requires_grad_()
    gc = torch.rand(s["n"], s["k"], s["h"], s["w"])

    def fwd_bwd():
        xc.grad = wc.grad = None
        torch.nn.functional.conv2d(xc, wc, padding=1).backward(gc)

    conv = conv_flops() / median_time_s(fwd_bwd, max(3, repeats // 10), warmup=1) / 1e9
    return {"version": torch.__version__, "threads": torch.get_num_threads(),
            "digits_cnn_step_ms": step_ms, "conv2d_fwd_bwd_gflops": conv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed repetitions of the step")
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    args = parser.parse_args()
    repeats = 5 if args.quick else args.repeats
    conv_repeats = 2 if args.quick else 10
    # The small-model step first: after a multithreaded BLAS call (the 1024^3 matmul, the
    # large conv) OpenBLAS's threads keep spinning for a while and slow what follows.
    step_ms = qatcore_step_ms(repeats)
    torch_step = torch_figures(repeats, step_only=True)
    conv = qatcore_conv_gflops(conv_repeats)
    matmul = numpy_matmul_gflops(1024, 3 if args.quick else 20)
    result = {
        "benchmark": "train_step",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "numpy": np.__version__, "python": platform.python_version()},
        "numpy_matmul_1024_gflops": matmul,
        "qatcore": {"digits_cnn_step_ms": step_ms, "conv2d_fwd_bwd_gflops": conv,
                    "conv2d_vs_numpy_matmul": conv / matmul},
        "conv2d_shape": CONV_SHAPE,
    }
    torch_result = torch_figures(repeats)
    if torch_result is not None:
        torch_result["digits_cnn_step_ms"] = torch_step["digits_cnn_step_ms"]
        torch_result["conv2d_vs_numpy_matmul"] = torch_result["conv2d_fwd_bwd_gflops"] / matmul
        result["torch"] = torch_result
        result["qatcore"]["step_vs_torch"] = step_ms / torch_result["digits_cnn_step_ms"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
