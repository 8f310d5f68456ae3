"""Depthwise conv2d speed on MobileNetV2's depthwise layers: the direct kernels next to im2col + GEMM.

Prints one JSON object. For each 3x3 depthwise layer of ``qatcore.models.MobileNetV2`` on 32x32
inputs (from ``MOBILENET_V2_CIFAR_STAGES``), float32, batch 64 (``--batch``), the median time of
one forward + input gradient + weight gradient:

- ``gemm_ms``: ``ops.Conv2d`` with groups == C (im2col, a batch of C one-row GEMMs, col2im);
- ``serial_ms`` / ``parallel_ms``: ``kernels.depthwise_conv`` forced onto its serial / parallel
  driver (``PARALLEL_MIN_MACS`` set out of reach / to 0);
- ``after_blas_serial_ms`` / ``after_blas_parallel_ms``: the same, each run started right after a
  multithreaded float32 matmul (512 x 512 x 4096), when OpenBLAS's threads still spin, as in a
  network where the depthwise conv follows a 1x1 convolution;
- ``macs``: N*C*OH*OW*kh*kw, the multiply-adds of one pass, to set ``PARALLEL_MIN_MACS`` against.

Usage: ``python benchmarks/bench_depthwise_conv.py [--batch N] [--repeats N] [--quick]``
(``--quick``: batch 8, 3 repeats)
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numba
import numpy as np
from timing import median_time_s, settle

from qatcore import ops, tensor
from qatcore.kernels import depthwise_conv
from qatcore.models.mobilenet_v2 import MOBILENET_V2_CIFAR_STAGES


def depthwise_layers():
    """(channels, size, stride) of each distinct 3x3 depthwise layer of MobileNetV2 on 32x32 inputs."""
    layers, channels, size = [], 32, 32
    for expansion, out_channels, blocks, first_stride in MOBILENET_V2_CIFAR_STAGES:
        for block in range(blocks):
            stride = first_stride if block == 0 else 1
            if (channels * expansion, size, stride) not in layers:
                layers.append((channels * expansion, size, stride))
            size = (size + 2 - 2 - 1) // stride + 1
            channels = out_channels
    return layers


def layer_figures(channels, size, stride, batch, repeats, blas):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, size, size), dtype=np.float32)
    weight = rng.standard_normal((channels, 1, 3, 3), dtype=np.float32)
    bias = np.zeros(channels, np.float32)
    window = (stride, stride, 1, 1, 1, 1)

    def direct():
        out = depthwise_conv.depthwise_conv2d_forward(x, weight, bias, *window)
        depthwise_conv.depthwise_conv2d_input_grad(out, weight, size, size, *window)
        depthwise_conv.depthwise_conv2d_weight_grad(out, x, 3, 3, *window)

    def gemm():
        ts = [tensor(x, requires_grad=True), tensor(weight, requires_grad=True)]
        out = ops.Conv2d.apply(*ts, None, stride=(stride, stride), padding=(1, 1), dilation=(1, 1), groups=channels)
        out.backward(out.numpy())

    out_size = (size + 2 - 2 - 1) // stride + 1
    figures = {"channels": channels, "size": size, "stride": stride,
               "macs": batch * channels * out_size * out_size * 9}
    settle()
    figures["gemm_ms"] = 1e3 * median_time_s(gemm, repeats)
    original = depthwise_conv.PARALLEL_MIN_MACS
    try:
        for name, threshold in (("serial", 1 << 62), ("parallel", 0)):
            depthwise_conv.PARALLEL_MIN_MACS = threshold
            settle()
            figures[f"{name}_ms"] = 1e3 * median_time_s(direct, repeats)
            figures[f"after_blas_{name}_ms"] = 1e3 * median_time_s(direct, repeats, before=blas)
    finally:
        depthwise_conv.PARALLEL_MIN_MACS = original
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 8, 3
    rng = np.random.default_rng(1)
    a = rng.standard_normal((512, 512), dtype=np.float32)
    b = rng.standard_normal((512, 4096), dtype=np.float32)

    def blas():
        np.matmul(a, b)

    result = {
        "machine": {"cpu_count": os.cpu_count(), "numba_threads": numba.config.NUMBA_NUM_THREADS,
                    "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                    "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")},
        "batch": args.batch,
        "layers": [layer_figures(c, s, st, args.batch, args.repeats, blas) for c, s, st in depthwise_layers()],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
