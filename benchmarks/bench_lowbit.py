"""int4 / int2 weight kernels (kernels/lowbit_gemm.py) next to baselines measured in the same run.

Prints one JSON object with one entry per section (``SECTIONS``):

- ``gemv_int4``: one activation row against a 4096 x 4096 int4 matrix, group 32 and group 128,
  ``weight_only_lowbit_gemm`` (symmetric weights, float64 sums) next to numpy's float32 GEMV
  ``x @ W.T`` on a float32 matrix of the same shape (``numpy_over_ours``: the speedup; target
  >= 2); also ours on one thread (``serial_ms``);
- ``gemv_int2``: the same with int2 weights;
- ``gemm_8da4w``: (256 x 4096) x (4096 x 4096), int4 weights in groups of 32 (and 128),
  ``dynamic_int8_lowbit_gemm`` next to ``int8_gemm.int8_gemm_int32`` on the same shape (int8
  weights, packed once; ``int8_over_ours``: target >= 1) and numpy's float32 matmul, in GOPS
  (2 * M * N * K / s); ``quantize_per_token_ms`` for the 256 x 4096 activations apart;
- ``weight_only_gemm``: (256 x 4096) x (4096 x 4096), int4, group 32, ``weight_only_lowbit_gemm``
  next to numpy's float32 matmul;
- ``machine`` (not a section; always present): ``timing.machine_info()``, which paths the
  kernels take here (``lowbit_gemm.USE_VNNI``, ``USE_LOOKUP``), numba's threading layer and
  the load average at the end.

Each figure is the median over ``--rounds`` rounds of a median over ``--repeats`` calls, ours
and the baselines timed in turns within a round, so that another job's load falls on all of
them alike; every measurement starts after a pause (``timing.settle``), so that the threads
that spin after the one before (OpenBLAS's for numpy's baselines, numba's OpenMP workers for
ours) have let the cores go.

- ``decode``: TinyGPT, batch 1, one token at a time with a key/value cache (``TinyGPT.decode``):
  our float model next to its converted int4 weight-only and 8da4w copies (eager mode, packed
  weights, the kernels above), in milliseconds per token (target: int4 >= 1.5x faster than
  float), at the default size (4 x 128) and at a width whose weights come from memory (2 x 1024);

A further section is a function ``name(args) -> dict`` added to ``SECTIONS``.

Usage: ``python benchmarks/bench_lowbit.py [--repeats N] [--rounds N] [--quick] [--sections NAME ...]``
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
from timing import machine_info, median_time_s, run_sections, settle

from qatcore.kernels import int8_gemm, lowbit_gemm
from qatcore.kernels.lowbit_pack import grid, pack_lowbit

GEMV_SHAPE = (4096, 4096)  # (N, K)
GEMM_SHAPE = (256, 4096, 4096)  # (M, N, K)
QUICK_GEMV_SHAPE = (1024, 1024)
QUICK_GEMM_SHAPE = (64, 1024, 1024)


def in_turns(functions: dict, args) -> dict:
    """{name: median seconds}: each round times every function (a median over args.repeats
    calls), in turns, each after a pause: the threads of the one before (OpenBLAS's, numba's
    OpenMP workers) spin for a while after their last call, and would take the cores."""
    times = {name: [] for name in functions}
    for _ in range(args.rounds):
        for name, function in functions.items():
            settle()
            times[name].append(median_time_s(function, args.repeats))
    return {name: statistics.median(values) for name, values in times.items()}


def weights(rng, rows: int, depth: int, bits: int, group_size: int):
    """(w_packed, w_scale): uniform integers on the grid, scales around 2^-6."""
    qmin, qmax = grid(bits)
    w_q = rng.integers(qmin, qmax, (rows, depth), endpoint=True)
    return pack_lowbit(w_q, bits), (2.0 ** rng.uniform(-7, -5, (rows, depth // group_size))).astype(np.float32)


def gemv_group(args, x, matrix, w_packed, bits, w_scale, group_size) -> dict:
    def ours():
        return lowbit_gemm.weight_only_lowbit_gemm(x, w_packed, bits, w_scale, None, group_size)

    ours()  # compiles
    times = in_turns({"ours": ours, "numpy": lambda: x @ matrix.T}, args)
    threshold = lowbit_gemm.PARALLEL_MIN_MACS
    try:
        lowbit_gemm.PARALLEL_MIN_MACS = 2**62
        settle()
        serial_s = median_time_s(ours, args.repeats)
    finally:
        lowbit_gemm.PARALLEL_MIN_MACS = threshold
    return {"ours_ms": 1e3 * times["ours"], "serial_ms": 1e3 * serial_s,
            "numpy_float32_gemv_ms": 1e3 * times["numpy"], "numpy_over_ours": times["numpy"] / times["ours"]}


def gemv_figures(args, bits: int) -> dict:
    rows, depth = args.gemv_shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, depth)).astype(np.float32)
    matrix = rng.standard_normal((rows, depth)).astype(np.float32)
    result = {"shape_nk": [rows, depth], "bits": bits}
    for group_size in (32, 128):
        w_packed, w_scale = weights(rng, rows, depth, bits, group_size)
        result[f"group_{group_size}"] = gemv_group(args, x, matrix, w_packed, bits, w_scale, group_size)
    return result


def gemv_int4(args) -> dict:
    return gemv_figures(args, 4)


def gemv_int2(args) -> dict:
    return gemv_figures(args, 2)


def gemm_8da4w_group(args, activations, packed8, matrix_t, w_packed, w_scale, group_size) -> dict:
    x, x_q, x_zero, x_scale = activations
    ops = 2 * x.shape[0] * matrix_t.shape[1] * x.shape[1]

    def ours():
        return lowbit_gemm.dynamic_int8_lowbit_gemm(x_q, x_zero, x_scale, w_packed, 4, w_scale, group_size)

    def int8():
        return int8_gemm.int8_gemm_int32(x_q, 0, packed8)

    ours(), int8()  # compile
    times = in_turns({"ours": ours, "int8": int8, "numpy": lambda: x @ matrix_t}, args)
    return {"ours_ms": 1e3 * times["ours"], "ours_gops": ops / times["ours"] / 1e9,
            "int8_gemm_int32_ms": 1e3 * times["int8"], "int8_gemm_int32_gops": ops / times["int8"] / 1e9,
            "numpy_float32_matmul_ms": 1e3 * times["numpy"], "numpy_float32_gflops": ops / times["numpy"] / 1e9,
            "int8_over_ours": times["int8"] / times["ours"], "numpy_over_ours": times["numpy"] / times["ours"]}


def gemm_8da4w(args) -> dict:
    m, n, k = args.gemm_shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    activations = (x, *lowbit_gemm.quantize_per_token(x))
    packed8 = int8_gemm.pack_weights(rng.integers(-8, 8, (n, k), dtype=np.int8))
    matrix_t = np.ascontiguousarray(rng.standard_normal((n, k)).astype(np.float32).T)
    result = {"shape_mnk": [m, n, k], "bits": 4, "units": "GOPS = 2*M*N*K / s / 1e9"}
    for group_size in (32, 128):
        w_packed, w_scale = weights(rng, n, k, 4, group_size)
        result[f"group_{group_size}"] = gemm_8da4w_group(args, activations, packed8, matrix_t, w_packed, w_scale,
                                                         group_size)
    settle()
    result["quantize_per_token_ms"] = 1e3 * median_time_s(lambda: lowbit_gemm.quantize_per_token(x), args.repeats)
    return result


def weight_only_gemm(args) -> dict:
    m, n, k = args.gemm_shape
    ops = 2 * m * n * k
    rng = np.random.default_rng(2)
    x = rng.standard_normal((m, k)).astype(np.float32)
    matrix_t = np.ascontiguousarray(rng.standard_normal((n, k)).astype(np.float32).T)
    w_packed, w_scale = weights(rng, n, k, 4, 32)

    def ours():
        return lowbit_gemm.weight_only_lowbit_gemm(x, w_packed, 4, w_scale, None, 32)

    ours()
    times = in_turns({"ours": ours, "numpy": lambda: x @ matrix_t}, args)
    return {"shape_mnk": [m, n, k], "bits": 4, "group_size": 32,
            "ours_ms": 1e3 * times["ours"], "ours_gflops": ops / times["ours"] / 1e9,
            "numpy_float32_matmul_ms": 1e3 * times["numpy"], "numpy_float32_gflops": ops / times["numpy"] / 1e9,
            "numpy_over_ours": times["numpy"] / times["ours"]}


# ---- one-token decoding of TinyGPT (the converted model) ----------------------------------------
def _decode_models(n_layer: int, n_embd: int, n_head: int, block_size: int):
    """(float TinyGPT, its int4 weight-only and 8da4w converted copies), eager mode so they
    decode with a key/value cache; the quantized ones after one calibration forward."""
    from qatcore.autograd.grad_mode import no_grad
    from qatcore.models import TinyGPT
    from qatcore.quantization.config import QuantizationConfig
    from qatcore.quantization.qat import QATPreparer

    def model():
        return TinyGPT(65, block_size, n_layer, n_embd, n_head, rng=np.random.default_rng(0)).eval()

    tokens = np.random.default_rng(1).integers(0, 65, (1, block_size))
    models = {"float": model()}
    for name, config in (("int4", QuantizationConfig.int4_weight_only(32)),
                         ("8da4w", QuantizationConfig.int8_dynamic_activation_int4_weight(32))):
        preparer = QATPreparer(mode="eager")
        qat = preparer.prepare_for_qat(model(), config)
        with no_grad():
            qat(tokens)
        models[name] = preparer.convert_to_quantized(qat.eval())
    return models, tokens


def _decode_ms(model, tokens: np.ndarray, repeats: int) -> float:
    """Median milliseconds per token of decoding ``tokens`` one at a time with the cache
    (after a one-token prompt), batch 1."""
    from qatcore.autograd.grad_mode import no_grad

    def run():
        with no_grad():
            _, cache = model.decode(tokens[:, :1])
            for t in range(1, tokens.shape[1]):
                _, cache = model.decode(tokens[:, t:t + 1], cache)

    return 1e3 * median_time_s(run, repeats, warmup=1) / (tokens.shape[1] - 1)


def decode(args) -> dict:
    """TinyGPT, batch 1, one token at a time with a key/value cache: float vs the converted int4
    weight-only and 8da4w models (packed weights, low-bit kernels), at the default size
    (4 x 128: weights in L2, the step is Python and numpy call overhead) and at a width where
    the weights are read from memory (2 x 1024: 12 MiB of float32 per block's qkv, 16 MiB per fc)."""
    result = {}
    sizes = (("default 4x128", (4, 128, 4, 64)), ("wide 2x1024", (2, 1024, 8, 32)))
    for label, size in sizes[:1] if args.quick else sizes:
        models, tokens = _decode_models(*size)
        runs = {name: [] for name in models}
        for _ in range(args.rounds):  # in turns, each after a pause
            for name, model in models.items():
                settle()
                runs[name].append(_decode_ms(model, tokens, max(1, args.repeats // 10)))
        ms = {name: statistics.median(v) for name, v in runs.items()}
        result[label] = {
            "layers_x_width": list(size[:2]), "tokens": size[3] - 1,
            "ms_per_token": {name: round(v, 3) for name, v in ms.items()},
            "speedup_vs_float": {name: round(ms["float"] / v, 2) for name, v in ms.items() if name != "float"},
        }
    return result


# name -> function(args) -> dict; a new section is one more entry
SECTIONS = {"gemv_int4": gemv_int4, "gemv_int2": gemv_int2, "gemm_8da4w": gemm_8da4w,
            "weight_only_gemm": weight_only_gemm, "decode": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls in each round of a measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement, in turns")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions (a smoke run)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="the sections to run (default: all)")
    args = parser.parse_args()
    args.gemv_shape = QUICK_GEMV_SHAPE if args.quick else GEMV_SHAPE
    args.gemm_shape = QUICK_GEMM_SHAPE if args.quick else GEMM_SHAPE
    if args.quick:
        args.repeats, args.rounds = 3, 1
    machine = machine_info()
    machine.update(use_vnni=bool(lowbit_gemm.USE_VNNI), use_lookup=bool(lowbit_gemm.USE_LOOKUP),
                   parallel_min_macs=lowbit_gemm.PARALLEL_MIN_MACS)
    result = {"benchmark": "lowbit", "machine": machine}
    run_sections(result, SECTIONS, args.sections, args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
