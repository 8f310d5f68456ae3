"""TinyGPT training-step speed (issue 19), each figure next to a baseline measured in the same run.

The model is TinyGPT at its default size (65 characters, 64 positions, 4 layers, 128
channels, 4 heads; 818,176 parameters), batch 32, one fixed batch of Tiny Shakespeare
windows. A step is forward, cross-entropy, backward and an AdamW step (lr 3e-4, weight
decay 0.1 on every parameter, in both frameworks).

Prints one JSON object:

- ``float``: our step (``qatcore_step_ms``), PyTorch eager's on the same model
  (``torch_step_ms``, ``benchmarks/torch_tiny_gpt.py``) and ``qatcore_over_torch``
  (target <= 1.5);
- ``qat``: the step under 8da4w (int8 per-token dynamic asymmetric activations, int4
  per-group symmetric weights, group 32): ours (``QuantizationConfig.
  int8_dynamic_activation_int4_weight(group_size=32)``, the default ``QATPreparer``, whose
  statistics sample every 10th step, so whole cycles of 10 steps are timed:
  ``qatcore_qat_step_ms``; statistics off: ``qatcore_qat_step_no_statistics_ms``), over our
  float step (``qat_over_float``, target <= 1.3), torchao's QAT step on the PyTorch model
  (``torchao_qat_step_ms``, ``torchao_api``) and ours over it (``qatcore_over_torchao``,
  target <= 1.0). Both quantize the same layers, every Linear (16 in the blocks and the
  head: ``*_quantized_linears``), neither the embeddings nor attention's matmuls;
  ``"torchao": "skipped: ..."`` when torchao is missing;
- ``float_step_profile``: where our float step's time goes: cProfile's own time (tottime)
  summed per source file (an op's file, a kernel's file, the autograd engine, the
  optimizer; ``by_file``) and per function of this repository (``by_function``, as
  ``file:Class.method``, so an op's forward and backward are apart), the time of a
  function outside the repository (a numpy call) charged to its callers in the repository
  in proportion to the time spent under each; numba kernels and numpy's operators (``@``,
  ``+``) are no call events, so their time is their caller's own; ``step_ms_profiled`` is
  the profiled step, which the profiler slows; ``qat_step_profile``: the same for the
  8da4w QAT step (statistics off);
- ``machine``: ``timing.machine_info()``, PyTorch's version and threads (its default: one
  per core) and the load average at the end (another job that started during the run).

Every step figure is a median over ``--repeats`` steps, the five steps (ours and PyTorch's
float, ours with and without statistics and torchao's QAT) timed in turns over
``--rounds`` rounds, so that another job's load falls on all of them alike.

Usage: ``python benchmarks/bench_transformer.py [--repeats N] [--rounds N] [--quick] [--no-profile]``
"""

from __future__ import annotations

import argparse
import ast
import collections
import cProfile
import functools
import json
import os
import pstats
import statistics
import time
from pathlib import Path

import numpy as np
from timing import machine_info, settle

import qatcore.nn.functional as F
from qatcore.data import DataLoader, load_text, text_windows
from qatcore.models import TinyGPT
from qatcore.optim import AdamW
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.qat import QATPreparer, StatisticsConfig

SIZES = dict(vocabulary_size=65, block_size=64, n_layer=4, n_embd=128, n_head=4)
BATCH = 32
GROUP_SIZE = 32
OPTIMIZER = dict(lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
STATISTICS_CYCLE = 10  # the default StatisticsConfig samples every 10th step
REPO = Path(__file__).resolve().parents[1]


def one_batch() -> tuple[np.ndarray, np.ndarray]:
    """The first batch of a seed-0 shuffled loader over the training windows (B, T) int64."""
    text = load_text()
    x, y = text_windows(text.train, SIZES["block_size"])
    loader = DataLoader(x, y, batch_size=BATCH, shuffle=True, rng=np.random.default_rng(0), drop_last=True)
    return next(iter(loader))


# ---- steps -------------------------------------------------------------------------------------------
def qatcore_step(model, x: np.ndarray, y: np.ndarray):
    vocabulary = SIZES["vocabulary_size"]
    optimizer = AdamW(model.parameters(), **OPTIMIZER)
    targets = y.reshape(-1)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x).reshape(-1, vocabulary), targets).backward()
        optimizer.step()

    return step


def torch_step(model, x: np.ndarray, y: np.ndarray):
    import torch

    vocabulary = SIZES["vocabulary_size"]
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMIZER)  # one group: decay on every parameter
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y).reshape(-1)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs).reshape(-1, vocabulary), targets).backward()
        optimizer.step()

    return step


def interleaved_step_ms(steps: dict, repeats: int, rounds: int) -> dict[str, float]:
    """The median wall time of one step of each entry of ``steps`` (name -> (step, steps a call)),
    in ms. The entries take turns: ``rounds`` rounds, each timing ``repeats / rounds`` steps of
    every entry, a settle before each entry's turn, so a load that comes and goes on the
    machine falls on all of them alike. A call of ``steps a call`` > 1 steps (a statistics
    cycle) is timed whole and counted per step."""
    times = {name: [] for name in steps}
    for step, per_call in steps.values():
        for _ in range(max(1, 3 // per_call)):  # warm-up: numba's cached kernels load, BLAS buffers grow
            step()
    for _ in range(rounds):
        for name, (step, per_call) in steps.items():
            settle()
            for _ in range(max(1, repeats // rounds // per_call)):
                start = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - start) / per_call)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def statistics_cycle(step):
    """``STATISTICS_CYCLE`` steps in one call: the default statistics sample one step in that many."""
    def cycle():
        for _ in range(STATISTICS_CYCLE):
            step()

    return cycle


# ---- models -----------------------------------------------------------------------------------------
def torch_model():
    import torch
    from torch_tiny_gpt import TorchTinyGPT

    torch.manual_seed(0)
    return TorchTinyGPT(**SIZES).train()


def torchao_8da4w(model):
    """``model`` prepared in place by torchao's QAT for 8da4w, and the API's name."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=GROUP_SIZE, is_symmetric=True)
    quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"))
    return model, ("torchao.quantization.quantize_(model, QATConfig(activation_config=IntxFakeQuantizeConfig("
                   "torch.int8, 'per_token', is_symmetric=False), weight_config=IntxFakeQuantizeConfig("
                   f"torch.int4, group_size={GROUP_SIZE}, is_symmetric=True), step='prepare'))")


# ---- figures ----------------------------------------------------------------------------------------
def _count(model, class_name: str) -> int:
    return sum(type(m).__name__ == class_name for m in model.modules())


def step_figures(x, y, repeats: int, rounds: int) -> tuple[dict, dict]:
    """(float figures, QAT figures) of the module docstring, all steps timed in turns."""
    config = QuantizationConfig.int8_dynamic_activation_int4_weight(group_size=GROUP_SIZE)
    qat = QATPreparer().prepare_for_qat(TinyGPT(**SIZES, rng=np.random.default_rng(0)), config)
    quiet = QATPreparer(statistics=StatisticsConfig(enabled=False)).prepare_for_qat(
        TinyGPT(**SIZES, rng=np.random.default_rng(0)), config)
    steps = {"qatcore_step_ms": (qatcore_step(TinyGPT(**SIZES, rng=np.random.default_rng(0)), x, y), 1),
             "qatcore_qat_step_ms": (statistics_cycle(qatcore_step(qat, x, y)), STATISTICS_CYCLE),
             "qatcore_qat_step_no_statistics_ms": (qatcore_step(quiet, x, y), 1)}
    qat_result = {"config": f"QuantizationConfig.int8_dynamic_activation_int4_weight(group_size={GROUP_SIZE})",
                  "qatcore_quantized_linears": _count(qat, "QATLinear")}
    try:
        import torch  # noqa: F401
    except ImportError:
        torch_missing = "skipped: PyTorch is not installed"
    else:
        torch_missing = None
        steps["torch_step_ms"] = (torch_step(torch_model(), x, y), 1)
        try:
            torchao_model, api = torchao_8da4w(torch_model())
        except ImportError as e:
            qat_result["torchao"] = f"skipped: {e}"
        else:
            steps["torchao_qat_step_ms"] = (torch_step(torchao_model, x, y), 1)
            qat_result.update(torchao_api=api, torchao_quantized_linears=_count(torchao_model, "FakeQuantizedLinear"))
    ms = interleaved_step_ms(steps, repeats, rounds)

    float_result = {"qatcore_step_ms": ms["qatcore_step_ms"]}
    if torch_missing:
        float_result["torch"] = qat_result["torchao"] = torch_missing
    else:
        float_result.update(torch_step_ms=ms["torch_step_ms"],
                            qatcore_over_torch=ms["qatcore_step_ms"] / ms["torch_step_ms"],
                            target_qatcore_over_torch=1.5)
    qat_result.update(qatcore_qat_step_ms=ms["qatcore_qat_step_ms"],
                      qatcore_qat_step_no_statistics_ms=ms["qatcore_qat_step_no_statistics_ms"],
                      qat_over_float=ms["qatcore_qat_step_ms"] / ms["qatcore_step_ms"], target_qat_over_float=1.3)
    if "torchao_qat_step_ms" in ms:
        qat_result.update(torchao_qat_step_ms=ms["torchao_qat_step_ms"],
                          qatcore_over_torchao=ms["qatcore_qat_step_ms"] / ms["torchao_qat_step_ms"],
                          target_qatcore_over_torchao=1.0)
    return float_result, qat_result


def _source_file(filename: str) -> str:
    """A file of this repository relative to its root; anything else (the standard library,
    numpy's Python code) by its last two path parts."""
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(REPO))
    except (ValueError, OSError):
        return "/".join(path.parts[-2:])


@functools.cache
def _classes_by_line(filename: str) -> tuple[tuple[int, int, str], ...]:
    """(first line, last line, name) of every class defined in ``filename``."""
    try:
        tree = ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError, ValueError):
        return ()
    return tuple((node.lineno, node.end_lineno, node.name) for node in ast.walk(tree) if isinstance(node, ast.ClassDef))


def _function_label(filename: str, line: int, name: str) -> str:
    """``file:Class.function`` (the innermost class whose lines hold ``line``), or ``file:function``."""
    enclosing = [c for c in _classes_by_line(filename) if c[0] <= line <= c[1]]
    owner = max(enclosing, key=lambda c: c[0])[2] + "." if enclosing else ""
    return f"{_source_file(filename)}:{owner}{name}"


def _in_repository(filename: str) -> bool:
    return filename != "~" and Path(filename).resolve().is_relative_to(REPO)


def profile_by_file(step, steps: int) -> dict:
    """cProfile's tottime of ``steps`` calls of ``step``, per source file and per function of
    this repository, per step (module docstring). The own time of a function outside the
    repository (a numpy C function, or numpy's Python code such as ``_methods._sum``) goes to
    its callers, in proportion to the time spent under each, and on up until it reaches a
    function of the repository: that function's line in the table is the time it cost."""
    for _ in range(3):
        step()
    settle()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    per_function = collections.defaultdict(float)

    def charge(function, seconds: float, path: frozenset) -> None:
        if _in_repository(function[0]):
            per_function[function] += seconds
            return
        callers = {caller: entry[3] for caller, entry in stats.get(function, (0, 0, 0, 0, {}))[4].items()
                   if caller not in path}  # cumtime under each caller; a recursion is not followed round
        total = sum(callers.values())
        if not callers:
            per_function[("(outside the repository)", 0, "")] += seconds
            return
        for caller, under in callers.items():
            charge(caller, seconds * (under / total if total else 1.0 / len(callers)), path | {function})

    for function, (_, _, tottime, _, _) in stats.items():
        charge(function, tottime, frozenset())
    per_file = collections.defaultdict(float)
    labelled = collections.defaultdict(float)
    for (filename, line, name), seconds in per_function.items():
        if filename == "(outside the repository)":
            per_file[filename] += seconds
            continue
        per_file[_source_file(filename)] += seconds
        labelled[_function_label(filename, line, name)] += seconds
    total_s = sum(per_file.values())

    def table(seconds_by_key, key_name, count):
        ranked = sorted(seconds_by_key.items(), key=lambda item: -item[1])[:count]
        return [{key_name: key, "ms_per_step": 1e3 * s / steps, "share": s / total_s} for key, s in ranked]

    return {"step_ms_profiled": 1e3 * total_s / steps, "steps": steps,
            "by_file": [row for row in table(per_file, "file", len(per_file)) if row["share"] >= 0.005],
            "by_function": table(labelled, "function", 20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60, help="timed steps per figure")
    parser.add_argument("--rounds", type=int, default=3, help="turns the figures take (see interleaved_step_ms)")
    parser.add_argument("--quick", action="store_true", help="a few repetitions (a smoke run)")
    parser.add_argument("--no-profile", action="store_true", help="leave out the profiles")
    args = parser.parse_args()
    repeats, rounds = (STATISTICS_CYCLE, 1) if args.quick else (args.repeats, args.rounds)
    machine = machine_info()
    x, y = one_batch()
    float_result, qat_result = step_figures(x, y, repeats, rounds)
    result = {"benchmark": "transformer", "model": {"name": "TinyGPT", **SIZES, "batch": BATCH},
              "optimizer": {"name": "AdamW", **OPTIMIZER}, "float": float_result, "qat": qat_result}
    if not args.no_profile:
        profiled_steps = 3 if args.quick else 10
        model = TinyGPT(**SIZES, rng=np.random.default_rng(0))
        result["float_step_profile"] = profile_by_file(qatcore_step(model, x, y), profiled_steps)
        config = QuantizationConfig.int8_dynamic_activation_int4_weight(group_size=GROUP_SIZE)
        qat = QATPreparer(statistics=StatisticsConfig(enabled=False)).prepare_for_qat(
            TinyGPT(**SIZES, rng=np.random.default_rng(0)), config)
        result["qat_step_profile"] = profile_by_file(qatcore_step(qat, x, y), profiled_steps)
    try:
        import torch

        machine["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    except ImportError:
        machine["torch"] = None
    machine["load_average_1min_at_end"] = os.getloadavg()[0]  # another job started during the run?
    result["machine"] = machine
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
