"""qatcore at realistic scale (issue 17): CIFAR-size networks next to PyTorch eager and ONNX Runtime.

Prints one JSON object. For each network of ``--models`` (``resnet20``: ``qatcore.models.resnet20``,
``resnet56``: ``cifar_resnet(56)``, ``mobilenetv2``: ``MobileNetV2()``, all from
``np.random.default_rng(0)``) on the 32x32x3 digits (``load_digits(image_size=32, channels=3)``),
default 8-bit config, an entry with:

- ``qatcore``: ``float_step_ms`` (train mode: forward, ``cross_entropy``, backward, SGD with lr 0.01
  and momentum 0.9, batch 64); ``qat_step_ms`` (the same step on
  ``QATPreparer().prepare_for_qat(model)``, observed on 3 batches first); ``float_inference_b64_ms``
  (eval, under ``qatcore.no_grad()``); ``int8_inference_b64_ms`` and ``int8_inference_b1_ms``
  (``convert_to_quantized`` of that QAT model after its timed steps, under ``no_grad``);
- ``torch``: the SAME architecture written in torch in this file (``TorchCifarResNet`` with
  option-B 1x1 conv+BN shortcuts, ``TorchMobileNetV2`` with qatcore's stage table; the parameter
  counts of both frameworks are in ``parameters`` and must be equal), eager, with
  ``torch.set_num_threads(2)``: ``float_step_ms``, ``float_inference_b64_ms`` (eval, no_grad);
  ``qat_step_ms``: eager QAT with ``get_default_qat_qconfig("x86")`` after ``fuse_modules_qat``
  (Conv-BN-ReLU and Conv-BN; MobileNetV2's ReLU6 has no fuser in torch, so there Conv-BN is fused
  and ReLU6 stays a module), ``prepare_qat``, QuantStub/DeQuantStub around the network and a
  ``FloatFunctional`` for each residual add (``add_relu`` in the ResNets); ``int8_inference_b64_ms``
  and ``int8_inference_b1_ms`` of ``torch.ao.quantization.convert`` of it (x86 engine), or
  ``convert_error`` when it does not convert;
- ``onnxruntime``: ``int8_inference_b64_ms`` and ``int8_inference_b1_ms``, ONNX Runtime
  (CPUExecutionProvider, default session options) on qatcore's int8 model exported with
  ``qatcore.interop.onnx.export_onnx(int8_model, path, x[:1])`` (QDQ form);
- ``peak_memory_mb``: the peak memory of a training step at batch 64, float and QAT, in both
  frameworks, measured the same way for both: a fresh subprocess per figure
  (``--memory-child``) builds the model (prepared and not observed, for QAT), loads the data, runs one training
  step at batch 2 (numba's kernels load from their cache or compile, torch initialises its
  allocator) and reads its peak resident set as the baseline; then it runs 3 training steps at
  batch 64 and reports the peak resident set minus that baseline. The peak is ``VmHWM`` of
  /proc/self/status, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over fork and exec, so a
  child's starts at the size of the benchmark process (``ru_maxrss`` only off Linux).
  tracemalloc is not used: torch's CPU allocations do not reach it. The figure is the extra
  resident memory of a training step, model weights and data excluded;
- ``ratios``: qatcore over torch (float step, QAT step, memory), our QAT step over our float step,
  our float inference over our int8 inference, our int8 over ONNX Runtime's (the issue's targets).

Each time is the median of ``--repeats`` runs after 2 warm-up runs (``timing.median_time_s``),
with ``timing.settle()`` between frameworks so that BLAS and numba threads spinning from one
measurement do not slow the next. ``machine``: CPU, cores, versions, numba / torch / ONNX Runtime
threads and the BLAS environment variables (``OPENBLAS_CORETYPE``, ``OPENBLAS_L2_SIZE``; issue 17
asks for the benchmark both with them as set and with both unset inside the command).

Usage: ``python benchmarks/bench_scale.py [--quick] [--models resnet20 resnet56 mobilenetv2] [--repeats N]``
(``--quick``: ResNet-20 only, 3 repeats)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from reference_models import CIFAR_MODELS as MODELS
from reference_models import build_cifar
from timing import machine_info as shared_machine_info
from timing import median_time_s, settle

BATCH = 64
LR, MOMENTUM = 0.01, 0.9
TORCH_THREADS = 2
MEMORY_STEPS = 3


# --------------------------------------------------------------------------- data and qatcore models

def load_batches():
    """(x, y): the first 4 * 64 training images of the 32x32x3 digits and their labels."""
    from qatcore.data import load_digits

    x_train, y_train, _, _ = load_digits(image_size=32, channels=3)
    return np.ascontiguousarray(x_train[:4 * BATCH]), np.ascontiguousarray(y_train[:4 * BATCH])


def build_qatcore(name: str):
    """The qatcore network ``name`` with seed-0 weights (reference_models builds it)."""
    return build_cifar(name)


def qatcore_step(model, x, y):
    import qatcore.nn.functional as F
    from qatcore.optim import SGD

    optimizer = SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def prepare_qatcore_qat(name: str, x, observed_batches: int = 3):
    """(preparer, QAT model in train mode) observed on ``observed_batches`` batches of ``x``."""
    from qatcore import no_grad
    from qatcore.quantization.qat import QATPreparer

    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(build_qatcore(name))
    qat.train()
    with no_grad():
        for start in range(0, observed_batches * BATCH, BATCH):
            qat(x[start:start + BATCH])
    return preparer, qat


# --------------------------------------------------------------------------- the same networks in torch

def torch_modules():
    """The torch classes, defined on first use so that the script imports without torch."""
    import torch
    from torch import nn
    from torch.ao.nn.quantized import FloatFunctional
    from torch.ao.quantization import DeQuantStub, QuantStub

    class TorchBasicBlock(nn.Module):
        """qatcore.models.resnet.BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

        def __init__(self, in_channels, out_channels, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(out_channels)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_channels)
            if stride != 1 or in_channels != out_channels:
                self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(out_channels))
            else:
                self.shortcut = None
            self.add = FloatFunctional()

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
            identity = x if self.shortcut is None else self.shortcut(x)
            return self.add.add_relu(out, identity)

        def fuse(self):
            torch.ao.quantization.fuse_modules_qat(self, [["conv1", "bn1", "relu1"], ["conv2", "bn2"]], inplace=True)
            if self.shortcut is not None:
                torch.ao.quantization.fuse_modules_qat(self.shortcut, [["0", "1"]], inplace=True)

    class TorchCifarResNet(nn.Module):
        """qatcore.models.cifar_resnets.CifarResNet: stem 16, stages 16/32/64 of n blocks."""

        def __init__(self, blocks_per_stage, num_classes=10, in_channels=3):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu = nn.ReLU()
            width, stages = 16, []
            for index, stage_width in enumerate((16, 32, 64)):
                blocks = []
                for block in range(blocks_per_stage):
                    blocks.append(TorchBasicBlock(width, stage_width, stride=(1 if index == 0 else 2) if block == 0
                                                  else 1))
                    width = stage_width
                stages.append(nn.Sequential(*blocks))
            self.layer1, self.layer2, self.layer3 = stages
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(self.quant(x))))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))

        def fuse(self):
            torch.ao.quantization.fuse_modules_qat(self, [["conv1", "bn1", "relu"]], inplace=True)
            for module in self.modules():
                if isinstance(module, TorchBasicBlock):
                    module.fuse()

    class TorchInvertedResidual(nn.Module):
        """qatcore.models.mobilenet_v2.InvertedResidual: expand (left out at t=1), depthwise, project."""

        def __init__(self, in_channels, out_channels, stride, expansion):
            super().__init__()
            hidden = in_channels * expansion
            self.use_residual = stride == 1 and in_channels == out_channels
            self.expand = None if expansion == 1 else nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
            self.depthwise = nn.Sequential(
                nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU6())
            self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
            self.add = FloatFunctional()

        def forward(self, x):
            out = x if self.expand is None else self.expand(x)
            out = self.project(self.depthwise(out))
            return self.add.add(x, out) if self.use_residual else out

    class TorchMobileNetV2(nn.Module):
        """qatcore.models.mobilenet_v2.MobileNetV2 at width_mult 1 (its stage table, stem 32, head 1280)."""

        def __init__(self, num_classes=10, in_channels=3):
            from qatcore.models.mobilenet_v2 import MOBILENET_V2_CIFAR_STAGES

            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            channels = 32
            self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(channels), nn.ReLU6())
            blocks = []
            for expansion, out_channels, num_blocks, first_stride in MOBILENET_V2_CIFAR_STAGES:
                for index in range(num_blocks):
                    blocks.append(TorchInvertedResidual(channels, out_channels, first_stride if index == 0 else 1,
                                                        expansion))
                    channels = out_channels
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Sequential(nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(1280, num_classes)

        def forward(self, x):
            x = self.head(self.blocks(self.stem(self.quant(x))))
            return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))

        def fuse(self):
            # torch has no Conv-BN-ReLU6 fuser: Conv-BN fused, ReLU6 left as a module
            for module in list(self.modules()):  # fusing adds modules (each a Sequential of Conv and BN)
                if type(module) is nn.Sequential and len(module) >= 2 and type(module[0]) is nn.Conv2d \
                        and type(module[1]) is nn.BatchNorm2d:
                    torch.ao.quantization.fuse_modules_qat(module, [["0", "1"]], inplace=True)

    return TorchCifarResNet, TorchMobileNetV2


def build_torch(name: str):
    import torch

    resnet, mobilenet = torch_modules()
    torch.manual_seed(0)
    if name == "resnet20":
        return resnet(3)
    if name == "resnet56":
        return resnet(9)
    if name == "mobilenetv2":
        return mobilenet()
    raise ValueError(f"unknown model {name!r}; one of {MODELS}")


def prepare_torch_qat(name: str):
    import torch.ao.quantization as tq

    model = build_torch(name).train()
    model.fuse()
    model.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(model)


def torch_step(model, x, y):
    import torch

    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        optimizer.step()

    return step


# --------------------------------------------------------------------------- peak memory (subprocess)

def peak_rss_kb() -> int:
    """This process's peak resident set in KiB: ``VmHWM`` of /proc/self/status, which a fresh
    process starts afresh; ``ru_maxrss`` (the fallback off Linux) keeps the parent's peak
    across fork and exec, so in a child it starts at the benchmark process's size."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(name: str, framework: str, mode: str) -> dict:
    """Run in a fresh process: growth of the peak resident set over 3 training steps at batch 64
    (module docstring)."""
    x, y = load_batches()
    if framework == "torch":
        import torch

        torch.set_num_threads(TORCH_THREADS)
        model = prepare_torch_qat(name) if mode == "qat" else build_torch(name).train()
        make_step = torch_step
    else:
        # not observed before the baseline (nor is torch's): a batch-64 forward would raise it
        model = prepare_qatcore_qat(name, x, observed_batches=0)[1] if mode == "qat" else build_qatcore(name).train()
        make_step = qatcore_step
    make_step(model, x[:2], y[:2])()  # kernels compiled or loaded, allocator initialised
    baseline = peak_rss_kb()
    step = make_step(model, x[:BATCH], y[:BATCH])
    for _ in range(MEMORY_STEPS):
        step()
    peak = peak_rss_kb()
    return {"baseline_mb": baseline / 1024, "peak_mb": peak / 1024, "training_step_mb": (peak - baseline) / 1024}


def peak_memory(name: str, with_torch: bool) -> dict:
    result = {}
    for framework in ("qatcore", "torch") if with_torch else ("qatcore",):
        for mode in ("float", "qat"):
            settle()
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", name, framework, mode],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                result[f"{framework}_{mode}_error"] = done.stderr.strip().splitlines()[-1:]
                continue
            figures = json.loads(done.stdout)
            result[f"{framework}_{mode}_step_mb"] = figures["training_step_mb"]
            result[f"{framework}_{mode}_baseline_mb"] = figures["baseline_mb"]
    return result


# --------------------------------------------------------------------------- timing

def qatcore_figures(name: str, x, y, repeats: int):
    """(figures, int8 model)."""
    from qatcore import no_grad

    ms = {}
    model = build_qatcore(name).train()
    settle()
    ms["float_step_ms"] = 1e3 * median_time_s(qatcore_step(model, x[:BATCH], y[:BATCH]), repeats)
    model.eval()
    with no_grad():
        settle()
        ms["float_inference_b64_ms"] = 1e3 * median_time_s(lambda: model(x[:BATCH]), repeats)
    preparer, qat = prepare_qatcore_qat(name, x)
    settle()
    ms["qat_step_ms"] = 1e3 * median_time_s(qatcore_step(qat, x[:BATCH], y[:BATCH]), repeats)
    int8_model = preparer.convert_to_quantized(qat.eval())
    with no_grad():
        settle()
        ms["int8_inference_b64_ms"] = 1e3 * median_time_s(lambda: int8_model(x[:BATCH]), repeats)
        ms["int8_inference_b1_ms"] = 1e3 * median_time_s(lambda: int8_model(x[:1]), 5 * repeats)
    ms["parameters"] = int(sum(p.data.size for p in model.parameters()))
    return ms, int8_model


def torch_figures(name: str, x, y, repeats: int) -> dict | None:
    try:
        import torch
        import torch.ao.quantization as tq
    except ImportError:
        return None
    torch.set_num_threads(TORCH_THREADS)
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    ms = {}
    model = build_torch(name).train()
    ms["parameters"] = int(sum(p.numel() for p in model.parameters()))
    settle()
    ms["float_step_ms"] = 1e3 * median_time_s(torch_step(model, x[:BATCH], y[:BATCH]), repeats)
    model.eval()
    xt = torch.from_numpy(x[:BATCH])
    with torch.no_grad():
        ms["float_inference_b64_ms"] = 1e3 * median_time_s(lambda: model(xt), repeats)
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation warnings
        warnings.simplefilter("ignore")
        qat = prepare_torch_qat(name)
        with torch.no_grad():
            for start in range(0, 3 * BATCH, BATCH):
                qat(torch.from_numpy(x[start:start + BATCH]))
        settle()
        ms["qat_step_ms"] = 1e3 * median_time_s(torch_step(qat, x[:BATCH], y[:BATCH]), repeats)
        try:
            int8_model = tq.convert(qat.eval())
            x1 = torch.from_numpy(x[:1])
            with torch.no_grad():
                int8_model(xt)
                ms["int8_inference_b64_ms"] = 1e3 * median_time_s(lambda: int8_model(xt), repeats)
                ms["int8_inference_b1_ms"] = 1e3 * median_time_s(lambda: int8_model(x1), 5 * repeats)
        except Exception as error:  # noqa: BLE001 - a model torch cannot convert is a figure, not a failure
            ms["convert_error"] = f"{type(error).__name__}: {error}"
    return ms


def onnxruntime_figures(int8_model, x, repeats: int) -> dict | None:
    try:
        import onnxruntime

        from qatcore.interop.onnx import export_onnx
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        export_onnx(int8_model, path, x[:1])
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed64, feed1 = {name: x[:BATCH]}, {name: x[:1]}
    settle()
    return {"int8_inference_b64_ms": 1e3 * median_time_s(lambda: session.run(None, feed64), repeats),
            "int8_inference_b1_ms": 1e3 * median_time_s(lambda: session.run(None, feed1), 5 * repeats),
            "intra_op_threads": session.get_session_options().intra_op_num_threads}


def ratio(a, b):
    return None if a is None or not b else a / b


def model_entry(name: str, x, y, repeats: int) -> dict:
    ours, int8_model = qatcore_figures(name, x, y, repeats)
    entry = {"parameters": {"qatcore": ours.pop("parameters")}, "qatcore": ours}
    theirs = torch_figures(name, x, y, repeats)
    if theirs is not None:
        entry["parameters"]["torch"] = theirs.pop("parameters")
        entry["parameters"]["equal"] = entry["parameters"]["qatcore"] == entry["parameters"]["torch"]
        entry["torch"] = theirs
    ort = onnxruntime_figures(int8_model, x, repeats)
    if ort is not None:
        entry["onnxruntime"] = ort
    entry["peak_memory_mb"] = memory = peak_memory(name, theirs is not None)
    theirs, ort = theirs or {}, ort or {}
    entry["ratios"] = {
        "float_step_vs_torch": ratio(ours["float_step_ms"], theirs.get("float_step_ms")),
        "qat_step_vs_torch_qat": ratio(ours["qat_step_ms"], theirs.get("qat_step_ms")),
        "qat_step_vs_own_float_step": ratio(ours["qat_step_ms"], ours["float_step_ms"]),
        "int8_speedup_over_own_float_b64": ratio(ours["float_inference_b64_ms"], ours["int8_inference_b64_ms"]),
        "int8_b64_vs_onnxruntime": ratio(ours["int8_inference_b64_ms"], ort.get("int8_inference_b64_ms")),
        "int8_b1_vs_onnxruntime": ratio(ours["int8_inference_b1_ms"], ort.get("int8_inference_b1_ms")),
        "float_step_memory_vs_torch": ratio(memory.get("qatcore_float_step_mb"), memory.get("torch_float_step_mb")),
        "qat_step_memory_vs_torch": ratio(memory.get("qatcore_qat_step_mb"), memory.get("torch_qat_step_mb")),
    }
    return entry


def machine_info() -> dict:
    """timing.machine_info() and the versions and threads of the two reference frameworks."""
    info = shared_machine_info()
    try:
        import torch

        info["torch"], info["torch_threads"] = torch.__version__, TORCH_THREADS
        info["torch_quantized_engine"] = torch.backends.quantized.engine
    except ImportError:
        info["torch"] = None
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, 3 repeats")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="the networks to run")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions of each figure (batch 1: 5x)")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "FRAMEWORK", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    if args.quick:
        args.models, args.repeats = ["resnet20"], 3
    x, y = load_batches()
    result = {"benchmark": "scale", "batch": BATCH, "input": "32x32x3 digits", "repeats": args.repeats,
              "machine": machine_info(), "models": {}}
    for name in args.models:
        result["models"][name] = model_entry(name, x, y, args.repeats)
    result["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
