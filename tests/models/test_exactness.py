"""The realistic networks convert exactly: the int8 model equals the QAT model's eval forward at
every layer, and in float32 requantization ONNX Runtime equals both. (benchmarks/bench_int8.py
--sections parity runs the full matrix: ResNet-20, ResNet-56 and MobileNetV2, at init and
after QAT steps, 8-bit and 4-bit weights, both arithmetics.)"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qatcore.data import load_digits
from qatcore.models import MobileNetV2, resnet20
from qatcore.nn import functional as F
from qatcore.optim import SGD
from qatcore.quantization.config import QuantizationConfig
from qatcore.quantization.qat import QATPreparer, parity_report

CONFIGS = {"8bit": QuantizationConfig(), "4w8a": QuantizationConfig.lsq_4bit_weights()}
BUILDERS = {"resnet20": lambda rng: resnet20(rng=rng),
            "mobilenetv2_half": lambda rng: MobileNetV2(width_mult=0.5, rng=rng)}


def trained(name: str, config: QuantizationConfig, steps: int = 2):
    x_train, y_train, x_test, _ = load_digits(image_size=32, channels=3)
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(BUILDERS[name](np.random.default_rng(0)), config)
    optimizer = SGD(qat.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps):
        rows = slice(32 * step, 32 * (step + 1))
        optimizer.zero_grad()
        F.cross_entropy(qat(x_train[rows]), y_train[rows]).backward()
        optimizer.step()
    qat.eval()
    return qat, preparer.convert_to_quantized(qat), x_test[:64]


@pytest.mark.parametrize("requantization", ["fixed_point", "float32"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_parity_is_exact_at_every_layer(name, config, requantization):
    qat, int8_model, x = trained(name, CONFIGS[config].replace(requantization=requantization))
    report = parity_report(qat, int8_model, x)
    assert len(report.layers) > 30
    assert report.passes, str(report)
    assert all(layer.max_lsb == 0 for layer in report.layers) and report.output.max_lsb == 0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_onnxruntime_equals_the_float32_int8_model_at_every_value(name):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    spec = importlib.util.spec_from_file_location(
        "agreement_tests", Path(__file__).parents[1] / "interop" / "test_onnxruntime_agreement.py")
    agreement_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agreement_tests)
    if not agreement_tests._exact_accumulation():
        pytest.skip("ONNX Runtime accumulates u8 x s8 exactly only with VNNI")
    from qatcore.interop.onnxruntime_agreement import onnxruntime_agreement

    _, int8_model, x = trained(name, QuantizationConfig(requantization="float32"))
    for form in ("qdq", "qoperator"):
        report = onnxruntime_agreement(int8_model, x, format=form)
        assert report.exact, f"{form}\n{report}"
