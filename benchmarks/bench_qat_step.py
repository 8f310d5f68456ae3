"""QAT training-step time of the DigitsCNN next to its float step, in the same run.

Prints one JSON object:

- ``float_step_ms``: our float training step (forward, cross-entropy, backward, SGD);
- ``qat_step_ms``: the same step on the QAT model (default 8-bit config, graph mode,
  conv-bn-relu folded, fake quantization and observers on);
- ``qat_over_float``: their ratio;
- ``qat_step_no_statistics_ms``: the QAT step with statistics collection off, and
  ``statistics_overhead``: how much collection adds (default: a sample every 10 steps);
- PyTorch eager QAT's step and ratio (``torch.ao.quantization.prepare_qat`` on the
  fused equivalent model, fbgemm qconfig) when torch is installed.

Usage: ``python benchmarks/bench_qat_step.py [--repeats N] [--quick]``
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
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.qat import QATPreparer, StatisticsConfig

BATCH = 64


def median_ms(fn, repeats: int, warmup: int = 5) -> float:
    return 1e3 * median_time_s(fn, repeats, warmup)


def _mean_of_cycles(step, repeats: int, cycle: int = 10) -> float:
    """Median over cycles of ``cycle`` steps, per step (includes the sampled steps)."""
    def run_cycle():
        for _ in range(cycle):
            step()

    return median_ms(run_cycle, max(3, repeats // cycle), warmup=1) / cycle


def step_fn(model, x, y):
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs = Tensor._from_array(x, False)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), y).backward()
        optimizer.step()

    return step


def torch_figures(x: np.ndarray, y: np.ndarray, repeats: int) -> dict | None:
    try:
        import torch
        import torch.ao.quantization as tq
    except ImportError:
        return None

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1, bias=False)
            self.bn1, self.relu1 = torch.nn.BatchNorm2d(16), torch.nn.ReLU()
            self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False)
            self.bn2, self.relu2 = torch.nn.BatchNorm2d(32), torch.nn.ReLU()
            self.pool = torch.nn.MaxPool2d(2)
            self.fc = torch.nn.Linear(128, 10)

        def forward(self, t):
            t = self.pool(self.relu1(self.bn1(self.conv1(self.quant(t)))))
            t = self.pool(self.relu2(self.bn2(self.conv2(t))))
            return self.dequant(self.fc(torch.flatten(t, 1)))

    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def make_step(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt), yt).backward()
            optimizer.step()

        return step

    float_model = Net().train()
    float_ms = median_ms(make_step(float_model), repeats)
    qat_model = Net().train()
    qat_model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    fused = tq.fuse_modules_qat(qat_model, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"]])
    prepared = tq.prepare_qat(fused)
    qat_ms = median_ms(make_step(prepared), repeats)
    return {"version": torch.__version__, "threads": torch.get_num_threads(), "float_step_ms": float_ms,
            "qat_step_ms": qat_ms, "qat_over_float": qat_ms / float_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a few repetitions (smoke run)")
    args = parser.parse_args()
    repeats = 5 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, size=BATCH)
    float_ms = median_ms(step_fn(DigitsCNN(), x, y), repeats)
    qat_model = QATPreparer().prepare_for_qat(DigitsCNN(), QuantizationConfig())
    quiet = QATPreparer(statistics=StatisticsConfig(enabled=False)).prepare_for_qat(DigitsCNN(), QuantizationConfig())
    # statistics sample every 10th step: time whole cycles of 10 steps so the median sees them
    qat_ms = _mean_of_cycles(step_fn(qat_model, x, y), repeats)
    quiet_ms = _mean_of_cycles(step_fn(quiet, x, y), repeats)
    result = {
        "benchmark": "qat_step",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "numpy": np.__version__, "python": platform.python_version()},
        "model": "DigitsCNN", "batch": BATCH,
        "qatcore": {"float_step_ms": float_ms, "qat_step_ms": qat_ms, "qat_over_float": qat_ms / float_ms,
                    "qat_step_no_statistics_ms": quiet_ms, "statistics_overhead": qat_ms / quiet_ms - 1},
    }
    torch_result = torch_figures(x, y, repeats)
    if torch_result is not None:
        result["torch"] = torch_result
        result["qatcore"]["qat_step_vs_torch_qat"] = qat_ms / torch_result["qat_step_ms"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
