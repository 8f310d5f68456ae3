"""The QAT model's eval forward (no gradients) is its int8 model's arithmetic."""

import numpy as np
import pytest

from qatcore.autograd import no_grad
from qatcore.errors import ObserverError
from qatcore.models import DigitsCNN, SmallResNet
from qatcore.nn import functional as F
from qatcore.optim import SGD
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.qat import QATPreparer, parity_report
from qatcore.tensor import Tensor


def _trained(model, config=None, steps=20):
    rng = np.random.default_rng(0)
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model, config)
    optimizer = SGD(qat.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = rng.random((32, 1, 8, 8), dtype=np.float32)
        loss = F.cross_entropy(qat(x), rng.integers(0, 10, 32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return preparer, qat.eval()


@pytest.mark.parametrize("make, config", [(SmallResNet, None), (DigitsCNN, QuantizationConfig.lsq_4bit_weights())])
def test_eval_without_gradients_equals_the_int8_model_at_every_layer(make, config):
    preparer, qat = _trained(make(), config)
    int8_model = preparer.convert_to_quantized(qat)
    x = np.random.default_rng(5).random((128, 1, 8, 8), dtype=np.float32)
    report = parity_report(qat, int8_model, x)
    assert report.passes and report.output.exact == 1.0 and report.output.max_lsb == 0, str(report)
    assert len(report.layers) >= 5 and all(layer.exact == 1.0 for layer in report.layers)
    with no_grad():
        np.testing.assert_array_equal(qat(x).numpy(), int8_model(x).numpy())
    assert qat.interpreter.fallback_reason is None


def test_eval_with_gradients_is_the_differentiable_float_simulation():
    _, qat = _trained(DigitsCNN(), steps=3)
    x = Tensor(np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32))
    out = qat(x)
    F.mean(F.mul(out, out)).backward()
    assert qat.get_submodule("fc").weight.grad is not None
    assert "gradients" in qat.interpreter.fallback_reason
    with no_grad():
        integer = qat(x).numpy()
    assert qat.interpreter.fallback_reason is None
    # the two forwards differ at most by one output step where they differ at all
    step = float(qat.get_submodule("fc").output_fake_quant.calculate_qparams().scale[0])
    assert np.max(np.abs(integer - out.numpy())) <= step * 1.0001


def test_a_model_the_int8_runtime_cannot_hold_evaluates_in_float_and_says_why():
    twelve_bit = QuantizationConfig().activation.replace(bits=12)
    _, qat = _trained(DigitsCNN(), QuantizationConfig(activation=twelve_bit), steps=2)
    with no_grad():
        out = qat(np.zeros((2, 1, 8, 8), np.float32))
    assert out.shape == (2, 10)
    assert "activations of at most 8 bits (set activation.bits to 8)" in qat.interpreter.fallback_reason


def test_a_switched_off_quantizer_passes_its_value_in_eval_and_in_the_int8_model():
    preparer, qat = _trained(DigitsCNN(), steps=3)
    quantizer = qat.get_submodule("conv2").output_fake_quant
    quantizer.disable_fake_quant()
    x = np.random.default_rng(2).random((16, 1, 8, 8), dtype=np.float32)
    with no_grad():
        ours = qat(x).numpy()
        # conv2 is an island of its simulation (its float output reaches fc, which is one too)
        np.testing.assert_array_equal(ours, preparer.convert_to_quantized(qat)(x).numpy())
    assert qat.interpreter.fallback_reason is None
    quantizer.enable_fake_quant()
    with no_grad():
        again = qat(x).numpy()
        np.testing.assert_array_equal(again, preparer.convert_to_quantized(qat)(x).numpy())
    assert ours.shape == again.shape == (16, 10) and not np.array_equal(ours, again)


def test_eval_before_any_observation_is_still_an_error():
    qat = QATPreparer().prepare_for_qat(DigitsCNN()).eval()
    with no_grad(), pytest.raises(ObserverError, match="nothing was observed"):
        qat(np.zeros((1, 1, 8, 8), np.float32))


@pytest.mark.parametrize("name", ["conv2", "fc", "conv1"])
def test_a_layer_disabled_at_run_time_is_a_float_island_that_converts_saves_and_matches(name, tmp_path):
    from qatcore.quantization.qat import load_int8_model, save_int8_model

    preparer, qat = _trained(DigitsCNN(), steps=5)
    preparer.disable(qat, name)
    int8_model = preparer.convert_to_quantized(qat)
    kinds = [type(m).__name__ for m in int8_model.modules()]
    assert ("Linear" if name == "fc" else "Conv2d") in kinds and not any(k.startswith("QAT") for k in kinds)
    path = tmp_path / "island.int8"
    save_int8_model(path, int8_model)
    loaded = load_int8_model(path)
    x = np.random.default_rng(3).random((64, 1, 8, 8), dtype=np.float32)
    for candidate in (int8_model, loaded):
        report = parity_report(qat, candidate, x)
        assert report.passes, str(report)
    assert qat.interpreter.fallback_reason is None
    with no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), int8_model(x).numpy())


@pytest.mark.parametrize("quantizer", ["activation_fake_quant.x", "conv1.weight_fake_quant",
                                       "conv1.output_fake_quant", "conv2.output_fake_quant", "fc.output_fake_quant"])
def test_a_quantizer_switched_off_by_hand_still_converts_saves_and_matches(quantizer, tmp_path):
    """The layer it belongs to (or, for an input quantizer, the layer it feeds) becomes a float
    island of its simulation: its weight on the grid, its output quantized again where its
    output quantizer is on."""
    from qatcore.quantization.qat import load_int8_model, save_int8_model

    preparer, qat = _trained(DigitsCNN(), steps=3)
    qat.get_submodule(quantizer).fake_quant_enabled.data.fill(0)
    int8_model = preparer.convert_to_quantized(qat)
    kinds = [type(m).__name__ for m in int8_model.modules()]
    assert not any(k.startswith("QAT") or k == "FakeQuantize" for k in kinds)
    assert "Conv2d" in kinds or "Linear" in kinds  # the island's float layer
    path = tmp_path / "switched_off.int8"
    save_int8_model(path, int8_model)
    x = np.random.default_rng(4).random((64, 1, 8, 8), dtype=np.float32)
    report = parity_report(qat, load_int8_model(path), x)
    assert report.passes, str(report)
    assert qat.interpreter.fallback_reason is None
