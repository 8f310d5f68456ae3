"""Fake-quantization kernel speed on 16M float32 elements, next to baselines measured in the same run.

Prints one JSON object:

- ``numpy_copyto_ms``: one ``np.copyto`` of the array into a preallocated one (read + write of
  every element, the memory-bandwidth yardstick);
- for ``per_tensor`` and ``per_channel_axis0`` (shape (256, 256, 256), axis 0), the median time of
  ``fake_quantize_forward`` and of forward + ``fake_quantize_backward`` (STE, and LSQ+ for the
  backward alone), with throughput in Melem/s and the ratio to ``np.copyto`` (the outputs are
  new arrays, so both include the first touch of freshly allocated memory, which copyto does not);
- ``serial_forward_backward_ms`` and ``after_blas_forward_backward_ms``: the same forward +
  STE backward forced onto the serial driver, and (the default driver) timed right after a
  matmul, when OpenBLAS's spinning threads compete with a parallel region;
- the same forward and forward + backward (autograd) for ``torch.fake_quantize_per_tensor_affine``
  / ``per_channel_affine`` when torch is installed.

Usage: ``python benchmarks/bench_fake_quant.py [--repeats N] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numba
import numpy as np
from timing import median_time_s

from qatcore.kernels import fake_quant

SHAPE = (256, 256, 256)
QUICK_SHAPE = (64, 128, 128)
QMIN, QMAX = -128, 127


def figures(seconds: float, size: int, copyto_s: float) -> dict:
    return {"ms": 1e3 * seconds, "throughput_melem_s": size / seconds / 1e6,
            "vs_numpy_copyto": seconds / copyto_s}


def make_inputs(shape, axis):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    grad = rng.standard_normal(shape, dtype=np.float32)
    channels = 1 if axis is None else shape[axis]
    # the grid spans 2 to 6 standard deviations: a few values are clipped
    scale = (4.0 / 127 * rng.uniform(0.5, 1.5, channels)).astype(np.float32)
    zero_point = np.zeros(channels, np.float32)
    return x, grad, scale, zero_point


def qatcore_figures(shape, axis, repeats: int, copyto_s: float) -> dict:
    x, grad, scale, zero_point = make_inputs(shape, axis)

    def forward():
        return fake_quant.fake_quantize_forward(x, scale, zero_point, QMIN, QMAX, axis)

    def backward(mode):
        return fake_quant.fake_quantize_backward(grad, x, scale, zero_point, QMIN, QMAX, axis, mode, 1e-4)

    def forward_backward():
        forward()
        backward("ste")

    size = x.size
    result = {
        "forward": figures(median_time_s(forward, repeats), size, copyto_s),
        "forward_backward_ste": figures(median_time_s(forward_backward, repeats), size, copyto_s),
        "backward_lsq_plus": figures(median_time_s(lambda: backward("lsq+"), repeats), size, copyto_s),
    }
    threshold = fake_quant.PARALLEL_MIN_ELEMENTS
    try:
        fake_quant.PARALLEL_MIN_ELEMENTS = 2**62
        result["serial_forward_backward_ms"] = 1e3 * median_time_s(forward_backward, repeats)
    finally:
        fake_quant.PARALLEL_MIN_ELEMENTS = threshold
    a = np.random.default_rng(1).standard_normal((256, 256), dtype=np.float32)
    after_blas_s = median_time_s(forward_backward, repeats, before=lambda: a @ a)
    result["after_blas_forward_backward_ms"] = 1e3 * after_blas_s
    return result


def torch_figures(shape, axis, repeats: int, copyto_s: float) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    x, grad, scale, zero_point = (torch.from_numpy(a) for a in make_inputs(shape, axis))
    x.requires_grad_()
    int_zero_point = zero_point.to(torch.int32)

    def forward():
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, float(scale[0]), int(zero_point[0]), QMIN, QMAX)
        return torch.fake_quantize_per_channel_affine(x, scale, int_zero_point, axis, QMIN, QMAX)

    def forward_backward():
        x.grad = None
        forward().backward(grad)

    size = x.numel()
    with torch.no_grad():
        forward_s = median_time_s(forward, repeats)
    return {
        "forward": figures(forward_s, size, copyto_s),
        "forward_backward_ste": figures(median_time_s(forward_backward, repeats), size, copyto_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions of each measurement")
    parser.add_argument("--quick", action="store_true", help="1M elements, few repetitions (a smoke run)")
    args = parser.parse_args()
    shape = QUICK_SHAPE if args.quick else SHAPE
    repeats = 3 if args.quick else args.repeats
    source = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    target = np.empty_like(source)
    copyto_s = median_time_s(lambda: np.copyto(target, source), repeats)
    result = {
        "benchmark": "fake_quant",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "numpy": np.__version__, "numba": numba.__version__, "python": platform.python_version(),
                    "numba_threads": numba.get_num_threads()},
        "shape": list(shape),
        "elements": int(source.size),
        "quant_range": [QMIN, QMAX],
        "parallel_min_elements": fake_quant.PARALLEL_MIN_ELEMENTS,
        "numpy_copyto_ms": 1e3 * copyto_s,
        "qatcore": {
            "per_tensor": qatcore_figures(shape, None, repeats, copyto_s),
            "per_channel_axis0": qatcore_figures(shape, 0, repeats, copyto_s),
        },
    }
    try:
        result["machine"]["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region ran (arrays below parallel_min_elements)
        result["machine"]["numba_threading_layer"] = None
    per_tensor = torch_figures(shape, None, repeats, copyto_s)
    if per_tensor is not None:
        import torch

        result["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                           "per_tensor": per_tensor,
                           "per_channel_axis0": torch_figures(shape, 0, repeats, copyto_s)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
