"""Integer-only int8 kernels next to float32 baselines measured in the same run.

Prints one JSON object with one entry per section (``SECTIONS``):

- ``gemm``: for (M, N, K) = 1024^3 and 256x1024x1024, ``int8_gemm_int32`` (int32 output) and
  ``int8_linear`` (requantized uint8 output) in GOPS (2*M*N*K integer operations / s, packed
  weights), next to numpy float32 matmul in GFLOP/s on the same shape; also the int8 GEMM on
  the serial driver (one core) and right after a float matmul (``after_blas``: OpenBLAS's
  spinning threads then delay numba's parallel region);
- ``conv``: ``int8_conv2d`` at N=32, C=K=64, 56x56, 3x3, padding 1, requantized to uint8,
  next to qatcore's float conv2d forward (``qatcore.nn.functional.conv2d`` under no_grad);
- ``torch``: when torch is installed, ``torch.ao.nn.quantized.Linear`` / ``Conv2d`` (quint8
  activations, per-channel qint8 weights) on the same shapes with the x86 (fbgemm) engine;
- ``digits_cnn_inference``: DigitsCNN on the digits test set, float vs converted int8 model;
- ``lookup``: an ``Int8Lookup`` (a sigmoid as a 256-entry table) on 4M uint8 values, next to
  ``np.copyto`` of the same uint8 array and to the float path it replaces (float32 sigmoid on
  the dequantized values, then quantization);
- ``parity``: the realistic networks (ResNet-20, ResNet-56, MobileNetV2 on the 32x32x3 digits)
  at random init and after 3 QAT steps, with 8-bit weights and with 4-bit LSQ weights (8-bit
  activations), in both requantization arithmetics: ``parity_report`` of the int8 model
  against the QAT model's eval forward (the lowest exact fraction over the layers, the most
  steps apart, ``passes``), and ONNX Runtime against the int8 model on the exported file in
  both forms (``onnxruntime_agreement``: the lowest fraction of equal integers over the values,
  the most steps apart); and, for each network (8-bit, fixed point, trained), int8 inference
  at batch 64 next to our float path and ONNX Runtime on the exported QDQ file;
- ``machine`` (not a section; always present): CPU, cores, versions, numba's threads and
  threading layer, the load average (other processes on a shared machine show up there),
  and the vector instructions of the int8 tile's inner loop as LLVM compiles it here.

Phases that call BLAS run after the int8 phases, and each int8 phase starts after a pause, so
that the int8 figures (but for ``after_blas``) are not measured against spinning BLAS threads.

A further section is a function ``name(args) -> dict`` added to ``SECTIONS``.

Usage: ``python benchmarks/bench_int8.py [--repeats N] [--quick] [--sections NAME ...]``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import warnings

import numba
import numpy as np
from reference_models import CIFAR_MODELS, cifar_qat_model, digits_cnn_float_qat_int8
from timing import machine_info, median_time_s, run_sections, settle

from qatcore.kernels import int8_conv, int8_gemm
from qatcore.kernels.requantize import quantize_multiplier

GEMM_SHAPES = [(1024, 1024, 1024), (256, 1024, 1024)]  # (M, N, K)
QUICK_GEMM_SHAPES = [(256, 256, 256), (64, 256, 256)]
CONV_SHAPE = dict(n=32, c=64, k=64, h=56, w=56, kernel=3, padding=1)
QUICK_CONV_SHAPE = dict(CONV_SHAPE, n=2)


def requantization(channels: int, rng):
    """Per-channel int32 bias, M0 and shift for real multipliers around 2^-10."""
    multiplier, shift = quantize_multiplier(2.0 ** rng.uniform(-11, -9, channels))
    return rng.integers(-(2**16), 2**16, channels).astype(np.int32), multiplier, shift


def gemm_operands(m: int, n: int, k: int):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    return x, w, rng


def gemm_figures(shape, repeats: int) -> dict:
    m, n, k = shape
    ops = 2 * m * n * k
    x, w, rng = gemm_operands(m, n, k)
    packed = int8_gemm.pack_weights(w)
    bias, multiplier, shift = requantization(n, rng)

    def gemm():
        return int8_gemm.int8_gemm_int32(x, 128, packed)

    def linear():
        return int8_gemm.int8_linear(x, 128, packed, bias, multiplier, shift, 3, 0, 255, np.uint8)

    settle()
    gemm_s = median_time_s(gemm, repeats)
    linear_s = median_time_s(linear, repeats)
    threshold = int8_gemm.PARALLEL_MIN_MACS
    try:
        int8_gemm.PARALLEL_MIN_MACS = 2**62
        serial_s = median_time_s(gemm, repeats)
    finally:
        int8_gemm.PARALLEL_MIN_MACS = threshold
    xf, wf = x.astype(np.float32), np.ascontiguousarray(w.T.astype(np.float32))
    matmul_s = median_time_s(lambda: xf @ wf, repeats)
    after_blas_s = median_time_s(gemm, repeats, before=lambda: xf @ wf)
    int8_gops, float_gflops = ops / gemm_s / 1e9, ops / matmul_s / 1e9
    return {
        "shape_mnk": list(shape),
        "parallel": m * n * k >= threshold,
        "int8_gemm_int32_gops": int8_gops,
        "int8_linear_uint8_gops": ops / linear_s / 1e9,
        "int8_gemm_serial_gops": ops / serial_s / 1e9,
        "int8_gemm_after_blas_gops": ops / after_blas_s / 1e9,
        "numpy_float32_matmul_gflops": float_gflops,
        "int8_vs_float32": int8_gops / float_gflops,
    }


def gemm_section(args) -> dict:
    return {"x".join(map(str, shape)): gemm_figures(shape, args.repeats) for shape in args.gemm_shapes}


def conv_operands(s):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (s["n"], s["c"], s["h"], s["w"]), dtype=np.uint8)
    w = rng.integers(-127, 128, (s["k"], s["c"], s["kernel"], s["kernel"]), dtype=np.int8)
    return x, w, rng


def conv_ops(s) -> int:
    return 2 * s["n"] * s["k"] * s["c"] * s["kernel"] ** 2 * s["h"] * s["w"]  # padding keeps h x w


def conv_section(args) -> dict:
    import qatcore.nn.functional as F
    from qatcore import Tensor, no_grad

    s = args.conv_shape
    x, w, rng = conv_operands(s)
    packed = int8_gemm.pack_weights(w)
    bias, multiplier, shift = requantization(s["k"], rng)
    repeats = max(3, args.repeats // 4)

    def int8():
        return int8_conv.int8_conv2d(x, 128, packed, bias, multiplier, shift, 3, 0, 255, np.uint8,
                                     padding=s["padding"])

    settle()
    int8_s = median_time_s(int8, repeats)
    threshold = int8_conv.PARALLEL_MIN_MACS
    try:
        int8_conv.PARALLEL_MIN_MACS = 2**62
        serial_s = median_time_s(int8, repeats)
    finally:
        int8_conv.PARALLEL_MIN_MACS = threshold
    xf, wf = Tensor(x.astype(np.float32)), Tensor(w.astype(np.float32))
    bf = Tensor(bias.astype(np.float32))

    def float_forward():
        with no_grad():
            return F.conv2d(xf, wf, bf, padding=s["padding"])

    float_s = median_time_s(float_forward, repeats)
    return {
        "shape": s,
        "int8_conv2d_ms": 1e3 * int8_s,
        "int8_conv2d_gops": conv_ops(s) / int8_s / 1e9,
        "int8_conv2d_serial_ms": 1e3 * serial_s,
        "qatcore_float32_conv2d_forward_ms": 1e3 * float_s,
        "qatcore_float32_conv2d_forward_gflops": conv_ops(s) / float_s / 1e9,
        "int8_speedup_vs_float32": float_s / int8_s,
    }


def torch_section(args) -> dict | None:
    try:
        import torch
        import torch.ao.nn.quantized as nnq
    except ImportError:
        return None
    engines = torch.backends.quantized.supported_engines
    engine = "x86" if "x86" in engines else "fbgemm" if "fbgemm" in engines else None
    if engine is None:
        return {"version": torch.__version__, "skipped": f"no x86/fbgemm engine in {engines}"}
    torch.backends.quantized.engine = engine
    torch.manual_seed(0)
    result = {"version": torch.__version__, "engine": engine, "threads": torch.get_num_threads()}
    with warnings.catch_warnings():  # quantized tensor constructors are deprecated in torch 2.x
        warnings.simplefilter("ignore")

        def per_channel(weight):
            scales = weight.abs().amax(dim=tuple(range(1, weight.dim()))).double() / 127
            return torch.quantize_per_channel(weight, scales, torch.zeros(weight.shape[0], dtype=torch.long), 0,
                                              torch.qint8)

        for m, n, k in args.gemm_shapes:
            layer = nnq.Linear(k, n)
            layer.set_weight_bias(per_channel(torch.randn(n, k)), torch.zeros(n))
            layer.scale, layer.zero_point = 0.05, 3
            qx = torch.quantize_per_tensor(torch.rand(m, k), 1 / 255, 0, torch.quint8)
            settle()  # numba's and BLAS's threads stop spinning
            with torch.no_grad():
                seconds = median_time_s(lambda: layer(qx), args.repeats)  # noqa: B023 (timed right here)
            result[f"int8_linear_{m}x{n}x{k}_gops"] = 2 * m * n * k / seconds / 1e9
        s = args.conv_shape
        layer = nnq.Conv2d(s["c"], s["k"], s["kernel"], padding=s["padding"])
        layer.set_weight_bias(per_channel(torch.randn(s["k"], s["c"], s["kernel"], s["kernel"])), torch.zeros(s["k"]))
        layer.scale, layer.zero_point = 0.05, 3
        qx = torch.quantize_per_tensor(torch.rand(s["n"], s["c"], s["h"], s["w"]), 1 / 255, 0, torch.quint8)
        settle()
        with torch.no_grad():
            seconds = median_time_s(lambda: layer(qx), max(3, args.repeats // 4))
    result["int8_conv2d_ms"] = 1e3 * seconds
    result["int8_conv2d_gops"] = conv_ops(s) / seconds / 1e9
    return result


def digits_cnn_inference(args) -> dict:
    """DigitsCNN inference on the 359 digits test images (one batch): the float model, the
    QAT model in eval mode and the converted int8 model (Quantize ... Dequantize)."""
    from qatcore.autograd import no_grad

    _, x_test, model, qat, int8_model = digits_cnn_float_qat_int8()
    repeats = max(5, args.repeats)
    with no_grad():
        settle()
        float_ms = 1e3 * median_time_s(lambda: model(x_test), repeats)
        qat_ms = 1e3 * median_time_s(lambda: qat(x_test), repeats)
        settle()
        int8_ms = 1e3 * median_time_s(lambda: int8_model(x_test), repeats)
    return {"batch": int(len(x_test)), "float_ms": float_ms, "qat_eval_ms": qat_ms, "int8_ms": int8_ms,
            "int8_speedup_over_float": float_ms / int8_ms}


def lookup_section(args) -> dict:
    """A unary activation as an integer lookup table vs the float computation it replaces."""
    from qatcore.autograd import no_grad
    from qatcore.nn import functional as F
    from qatcore.quantization.int8_layers import Quantize
    from qatcore.quantization.qat.int8_model import Int8Value
    from qatcore.quantization.qat.operators.activation import Int8Lookup, lookup_table

    count = 1 << (18 if args.quick else 22)
    q = np.random.default_rng(0).integers(0, 256, count, dtype=np.uint8)
    x_grid = Int8Value(0.05, 128, 0, 255, "x")
    y_grid = Int8Value(1 / 255, 0, 0, 255, "y")
    lookup = Int8Lookup(lookup_table(F.sigmoid, x_grid, y_grid), 0, y_grid.scale, 0, 0, 255)
    quantize = Quantize(y_grid.scale, 0, 0, 255)
    target = np.empty_like(q)
    repeats = max(5, args.repeats)

    def float_path():
        reals = (q.astype(np.float32) - np.float32(128)) * np.float32(0.05)
        return quantize(F.sigmoid(reals))

    with no_grad():
        settle()
        copy_ms = 1e3 * median_time_s(lambda: np.copyto(target, q), repeats)
        lookup_ms = 1e3 * median_time_s(lambda: lookup(q), repeats)
        float_ms = 1e3 * median_time_s(float_path, repeats)
        equal = bool(np.array_equal(lookup(q), float_path()))
    return {"elements": count, "int8_lookup_ms": lookup_ms, "copyto_uint8_ms": copy_ms,
            "float_sigmoid_and_quantize_ms": float_ms, "lookup_over_copy": lookup_ms / copy_ms,
            "float_over_lookup": float_ms / lookup_ms, "lookup_equals_float_path": equal}


def parity_section(args) -> dict:
    """The realistic networks: exactness of the int8 model and of ONNX Runtime (module docstring)."""
    from qatcore.autograd import no_grad
    from qatcore.data import load_digits
    from qatcore.quantization.config import QuantizationConfig
    from qatcore.quantization.qat import parity_report

    try:
        import onnxruntime

        from qatcore.interop.onnx import export_onnx
        from qatcore.interop.onnxruntime_agreement import onnxruntime_agreement
    except ImportError:
        onnxruntime = None
    _, _, x_test, _ = load_digits(image_size=32, channels=3)
    x, many = x_test[:64], x_test[:256]  # ONNX Runtime compares 256 images: one-step differences are rare
    configs = {"8bit": QuantizationConfig(), "4w8a_lsq": QuantizationConfig.lsq_4bit_weights()}
    names = CIFAR_MODELS[:1] if args.quick else CIFAR_MODELS
    result = {}
    for name in names:
        rows = []
        for config_name, config in configs.items():
            for requantization in ("fixed_point", "float32"):
                for steps in (0, 3):
                    preparer, qat, float_model = cifar_qat_model(name, config.replace(requantization=requantization),
                                                                 steps)
                    int8_model = preparer.convert_to_quantized(qat)
                    report = parity_report(qat, int8_model, x)
                    row = {"config": config_name, "requantization": requantization, "qat_steps": steps,
                           "layers": len(report.layers), "passes": report.passes,
                           "min_exact": min(v.exact for v in (*report.layers, report.output)),
                           "max_steps": max(v.max_lsb for v in (*report.layers, report.output)),
                           "top1_agreement": report.top1_agreement}
                    if onnxruntime is not None:
                        for form in ("qdq", "qoperator"):
                            agreement = onnxruntime_agreement(int8_model, many, format=form)
                            row[f"onnxruntime_{form}"] = {
                                "exact": agreement.exact, "min_equal": min(v.equal for v in agreement.values),
                                "max_steps": max(v.max_steps for v in agreement.values)}
                    rows.append(row)
                    if (config_name, requantization, steps) == ("8bit", "fixed_point", 3):
                        timing = {}
                        repeats = max(3, args.repeats // 4)
                        with no_grad():
                            settle()
                            timing["float_ms"] = 1e3 * median_time_s(lambda: float_model(x), repeats)  # noqa: B023
                            settle()
                            timing["int8_ms"] = 1e3 * median_time_s(lambda: int8_model(x), repeats)  # noqa: B023
                        if onnxruntime is not None:
                            import tempfile
                            with tempfile.TemporaryDirectory() as folder:
                                path = os.path.join(folder, "model.onnx")
                                export_onnx(int8_model, path, x[:1])
                                session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
                                feed = {session.get_inputs()[0].name: x}
                                timing["onnxruntime_int8_ms"] = 1e3 * median_time_s(
                                    lambda: session.run(None, feed), repeats)  # noqa: B023
                        result.setdefault(name, {})["inference_batch_64"] = timing
        result.setdefault(name, {})["parity"] = rows
    return result


SECTIONS = {"gemm": gemm_section, "conv": conv_section, "torch": torch_section,
            "digits_cnn_inference": digits_cnn_inference, "lookup": lookup_section, "parity": parity_section}


def hottest_loop(asm: str) -> dict:
    """Vector mnemonics of the loop (a label up to the jump back to it) with the most
    multiply-add instructions."""
    lines = asm.splitlines()
    best, best_madds = collections.Counter(), -1
    for start, line in enumerate(lines):
        label = re.match(r"^(\.LBB\w+):", line)
        if label is None:
            continue
        for end in range(start + 1, len(lines)):
            if re.search(r"\bj\w+\s+" + re.escape(label.group(1)) + r"$", lines[end]):
                body = "\n".join(lines[start:end + 1])
                counts = collections.Counter(re.findall(r"\n\s+(?:\{vex\}\s+)?(v[a-z0-9]+)", body))
                madds = sum(v for op, v in counts.items() if "dp" in op or "madd" in op or "mul" in op)
                if madds > best_madds:
                    best, best_madds = counts, madds
                break
    return dict(best.most_common())


def inner_loop_instructions() -> dict:
    """The 4x4 tile's inner loops as LLVM compiles them here, compiled afresh (code loaded from
    the on-disk cache cannot be inspected): the explicit vpdpbusd loop where the CPU has
    AVX-512 VNNI, and the auto-vectorised loop that runs everywhere else (and on K % 64)."""
    a, b, acc = np.zeros((4, 64), np.uint8), np.zeros((4, 64), np.int8), np.zeros((4, 4), np.int32)
    result = {}
    use_vnni = int8_gemm.USE_VNNI
    for name, flag in (("vnni_loop", True), ("vectorised_loop", False)):
        if flag and not use_vnni:
            continue
        try:
            int8_gemm.USE_VNNI = flag  # read when the fresh copy compiles, at its first call
            tile = numba.njit(int8_gemm._dot_4x4.py_func)
            tile(a, 0, 0, b, 0, 64, acc, 0, 0, False)
        finally:
            int8_gemm.USE_VNNI = use_vnni
        result[name] = hottest_loop(tile.inspect_asm(tile.signatures[0]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions of each GEMM measurement")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions (a smoke run)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="the sections to run (default: all)")
    args = parser.parse_args()
    args.gemm_shapes = QUICK_GEMM_SHAPES if args.quick else GEMM_SHAPES
    args.conv_shape = QUICK_CONV_SHAPE if args.quick else CONV_SHAPE
    if args.quick:
        args.repeats = 3
    result = {"benchmark": "int8", "machine": machine_info(),
              "parallel_min_macs": int8_gemm.PARALLEL_MIN_MACS, "units": "GOPS = 2*M*N*K / s / 1e9"}
    run_sections(result, SECTIONS, args.sections, args)
    result["machine"]["int8_tile_inner_loop"] = inner_loop_instructions()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
