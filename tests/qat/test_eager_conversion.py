"""Eager-mode QAT models (a forward that branches on tensor values) convert to int8 models
whose output equals the QAT model's eval forward bit for bit, in both requantization modes."""

import numpy as np
import pytest

import qatcore
from qatcore import nn
from qatcore.autograd import no_grad
from qatcore.data import load_digits
from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.optim import SGD
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.int8_layers import Dequantize, Quantize
from qatcore.quantization.qat import (
    QATConv2d,
    QATLinear,
    QATPreparer,
    QATSchedule,
    learnable_quantizer_parameters,
    load_qat_checkpoint,
    parity_report,
    save_int8_model,
    save_qat_checkpoint,
)
from qatcore.quantization.qat.eager_conversion import Int8Island
from qatcore.quantization.qat.operators.weighted import Int8Conv2d, Int8Linear

THRESHOLD = 0.31  # near the median brightness of a digit (0.307)


class Branchy(nn.Module):
    """Bright batches go through a residual block, dark ones through another conv: the branch
    is a Python `if` on a tensor value, so the model cannot be traced."""

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, rng=rng)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, rng=rng)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, rng=rng)
        self.fc = nn.Linear(8 * 16, 10, rng=rng)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        if float(F.mean(x).data) > THRESHOLD:
            h = F.relu(h + self.conv2(h))
        else:
            h = F.relu(self.conv3(h))
        return self.fc(F.flatten(F.max_pool2d(h, 2), 1))


def _bright(x) -> bool:
    return float(x.mean()) > THRESHOLD


def _digits():
    """Training batches alternating bright and dark, and one test batch of each."""
    x_train, y_train, x_test, _ = load_digits()
    brightness = x_train.reshape(len(x_train), -1).mean(axis=1)
    order = np.argsort(brightness)
    rng = np.random.default_rng(0)
    dark, bright = rng.permutation(order[: len(order) // 3]), rng.permutation(order[-len(order) // 3:])
    batches = []
    for i in range(12):
        for half in (bright, dark):
            rows = half[i * 32:(i + 1) * 32]
            batches.append((x_train[rows], y_train[rows]))
    test_brightness = x_test.reshape(len(x_test), -1).mean(axis=1)
    test_order = np.argsort(test_brightness)
    bright_test, dark_test = x_test[test_order[-64:]], x_test[test_order[:64]]
    assert all(_bright(x) for x, _ in batches[::2]) and not any(_bright(x) for x, _ in batches[1::2])
    assert _bright(bright_test) and not _bright(dark_test)
    return batches, bright_test, dark_test


BATCHES, BRIGHT, DARK = _digits()


def _train(qat, optimizer, batches):
    qat.train()
    for x, y in batches:
        loss = F.cross_entropy(qat(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _prepared(config=None, seed=0):
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(Branchy(seed), config)
    return preparer, qat


def _eval(model, x) -> np.ndarray:
    model.eval()
    with no_grad():
        return model(x).numpy()


@pytest.fixture(scope="module", params=["fixed_point", "float32"])
def trained(request):
    preparer, qat = _prepared(QuantizationConfig(requantization=request.param))
    optimizer = SGD(qat.parameters(), lr=0.05, momentum=0.9)
    _train(qat, optimizer, BATCHES)
    return preparer, qat, preparer.convert_to_quantized(qat), request.param


def test_auto_mode_falls_back_to_eager_and_each_layer_quantizes_its_input():
    preparer, qat = _prepared()
    controller = preparer.controller(qat)
    assert controller.preparation_mode == "eager" and "tracing failed" in preparer.describe(qat)
    for name in ("conv1", "conv2", "conv3", "fc"):
        layer = qat.get_submodule(name)
        assert isinstance(layer, (QATConv2d, QATLinear))
        assert isinstance(layer.input_fake_quant, FakeQuantize) and layer.input_fake_quant.name == f"{name}.input"
        assert layer.input_quantizer is layer.input_fake_quant  # the eval bias reads s_x from it
        assert layer.input_fake_quant in layer.quantizers()
        assert f"{name}.input_fake_quant.scale" in qat.state_dict()
    # graph mode is unchanged: the graph's own quantizer feeds each layer
    graph_qat = QATPreparer().prepare_for_qat(qatcore.models.DigitsCNN())
    assert all(layer.input_fake_quant is None for layer in graph_qat.modules() if isinstance(layer, QATConv2d))
    assert not any("input_fake_quant" in key for key in graph_qat.state_dict())


def test_the_schedule_and_the_statistics_drive_the_input_quantizer():
    preparer = QATPreparer(schedule=QATSchedule(start_observers_at=1, start_fake_quant_at=2, freeze_observers_at=3))
    qat = preparer.prepare_for_qat(Branchy())
    quantizer = qat.conv2.input_fake_quant
    states = []
    for x, _ in BATCHES[:4]:
        qat(x)
        states.append((bool(quantizer.observer_enabled.data), bool(quantizer.fake_quant_enabled.data)))
    assert states == [(False, False), (True, False), (True, True), (False, True)]
    assert quantizer.observer.has_observed
    statistics = preparer.get_qat_statistics(qat).quantizers
    assert statistics["conv1.input"].kind == "activation" and statistics["conv1.weight"].kind == "weight"


def test_the_int8_model_is_the_users_class_with_int8_islands(trained):
    _, qat, int8_model, requantization = trained
    assert type(int8_model) is Branchy and not int8_model.training
    assert not any(isinstance(m, FakeQuantize) for m in int8_model.modules())
    assert "qat_controller" not in dict(int8_model.named_children())
    for name, kind in (("conv1", Int8Conv2d), ("conv2", Int8Conv2d), ("conv3", Int8Conv2d), ("fc", Int8Linear)):
        island = int8_model.get_submodule(name)
        assert isinstance(island, Int8Island) and island.name == name
        assert isinstance(island.quantize, Quantize) and isinstance(island.layer, kind)
        assert isinstance(island.dequantize, Dequantize)
        assert island.quantize.requantization.value == requantization == island.layer.requantization.value
        assert island.layer.weight_q.data.dtype == np.int8


@pytest.mark.parametrize("batch", ["bright", "dark"])
def test_the_int8_model_equals_the_qat_eval_forward_bit_for_bit(trained, batch):
    _, qat, int8_model, _ = trained
    x = BRIGHT if batch == "bright" else DARK
    expected = _eval(qat, x)
    assert np.array_equal(int8_model(x).numpy(), expected)
    ran = ("conv1", "conv2" if batch == "bright" else "conv3", "fc")
    assert all(qat.get_submodule(name).interpreter.fallback_reason is None for name in ran)
    # and the integer eval is what it claims: within one output step of the float simulation
    qat.eval()
    simulated = qat(x).numpy()  # gradients on: the differentiable simulation
    assert "gradients" in qat.fc.interpreter.fallback_reason
    step = float(qat.fc.output_fake_quant.calculate_qparams().scale[0])
    assert np.max(np.abs(simulated - expected)) <= 1.0001 * step


def test_parity_passes_at_every_layer_on_both_branches(trained):
    _, qat, int8_model, _ = trained
    bright, dark = parity_report(qat, int8_model, BRIGHT), parity_report(qat, int8_model, DARK)
    for report, branch_layer, other in ((bright, "conv2", "conv3"), (dark, "conv3", "conv2")):
        names = [layer.name for layer in report.layers]
        assert names == ["conv1.output", f"{branch_layer}.output", "fc.output"], str(report)
        assert other not in str(report)
        assert report.passes, str(report)
        assert all(layer.exact == 1.0 and layer.max_lsb == 0 for layer in report.layers)
        assert report.output.exact == 1.0 and report.output.max_lsb == 0 and report.top1_agreement == 1.0
        assert report.layers[-1].elements == 64 * 10


def test_parity_at_random_init_after_one_observed_batch():
    preparer, qat = _prepared(seed=3)
    with no_grad():
        qat(BATCHES[0][0])  # training mode: observe
        qat(BATCHES[1][0])
    int8_model = preparer.convert_to_quantized(qat)
    for x in (BRIGHT, DARK):
        report = parity_report(qat, int8_model, x)
        assert report.passes and len(report.layers) == 3, str(report)


def test_parity_reports_a_layer_the_int8_model_ran_differently():
    preparer, qat = _prepared()
    _train(qat, SGD(qat.parameters(), lr=0.05), BATCHES[:4])
    int8_model = preparer.convert_to_quantized(qat)
    # a stale island: conv2 of another model; the report must see the difference, not pass
    other_preparer, other = _prepared(seed=5)
    _train(other, SGD(other.parameters(), lr=0.05), BATCHES[:4])
    int8_model.add_module("conv2", other_preparer.convert_to_quantized(other).conv2)
    report = parity_report(qat, int8_model, BRIGHT)
    assert not report.passes
    assert next(layer for layer in report.layers if layer.name == "conv2.output").exact < 1.0


def test_training_after_conversion_leaves_the_int8_model_alone():
    preparer, qat = _prepared()
    optimizer = SGD(qat.parameters(), lr=0.05, momentum=0.9)
    _train(qat, optimizer, BATCHES[:6])
    int8_model = preparer.convert_to_quantized(qat)
    qat_state = {id(t) for t in (*qat.parameters(), *qat.buffers())}
    assert not qat_state & {id(t) for t in (*int8_model.parameters(), *int8_model.buffers())}
    before = int8_model(BRIGHT).numpy(), int8_model(DARK).numpy()
    qat_before = _eval(qat, BRIGHT)
    _train(qat, optimizer, BATCHES[6:12])
    assert not np.array_equal(_eval(qat, BRIGHT), qat_before)  # the QAT model did move
    assert np.array_equal(int8_model(BRIGHT).numpy(), before[0])
    assert np.array_equal(int8_model(DARK).numpy(), before[1])
    assert np.array_equal(preparer.convert_to_quantized(qat)(BRIGHT).numpy(), _eval(qat, BRIGHT))


def test_a_qat_checkpoint_round_trip_restores_the_input_quantizers(tmp_path):
    preparer, qat = _prepared()
    optimizer = SGD(qat.parameters(), lr=0.05, momentum=0.9)
    _train(qat, optimizer, BATCHES[:6])
    path = tmp_path / "eager.ckpt"
    save_qat_checkpoint(path, qat, optimizer, preparer)
    saved_scale = qat.conv2.input_fake_quant.scale.data.copy()
    restored, info = QATPreparer.from_checkpoint(path, Branchy(seed=9),
                                                 make_optimizer=lambda p: SGD(p, lr=0.05, momentum=0.9))
    assert restored.conv2.input_fake_quant is not qat.conv2.input_fake_quant
    np.testing.assert_array_equal(restored.conv2.input_fake_quant.scale.data, saved_scale)
    assert bool(restored.conv2.input_fake_quant.qparams_ready.data)
    for x in (BRIGHT, DARK):
        assert np.array_equal(_eval(restored, x), _eval(qat, x))
    assert np.array_equal(QATPreparer().convert_to_quantized(restored)(DARK).numpy(), _eval(qat, DARK))
    # resuming trains on exactly as the original does
    _train(qat, optimizer, BATCHES[6:8])
    _train(restored, info.optimizer, BATCHES[6:8])
    assert np.array_equal(_eval(restored, BRIGHT), _eval(qat, BRIGHT))
    # and load_qat_checkpoint into a freshly prepared model restores it as well
    _, fresh = _prepared(seed=11)
    load_qat_checkpoint(path, fresh)
    np.testing.assert_array_equal(fresh.conv2.input_fake_quant.scale.data, saved_scale)


def test_lsq_with_an_optimizer_built_before_preparation_trains_and_converts():
    model = Branchy()
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9)  # before preparation
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model, QuantizationConfig.lsq_4bit_weights())
    learned = dict(learnable_quantizer_parameters(qat))
    assert sorted(learned) == [f"{name}.weight_fake_quant.scale" for name in ("conv1", "conv2", "conv3", "fc")]
    assert all(optimizer.holds(param) for param in learned.values())
    _train(qat, optimizer, BATCHES[:2])  # the first batch initialises the scales
    start = {name: param.data.copy() for name, param in learned.items()}
    _train(qat, optimizer, BATCHES[2:10])
    assert all(not np.array_equal(learned[name].data, start[name]) for name in learned)
    int8_model = preparer.convert_to_quantized(qat)
    for x in (BRIGHT, DARK):
        assert parity_report(qat, int8_model, x).passes
        assert np.array_equal(int8_model(x).numpy(), _eval(qat, x))


def test_a_disabled_layer_converts_to_a_float_copy():
    preparer, qat = _prepared()
    _train(qat, SGD(qat.parameters(), lr=0.05), BATCHES[:4])
    preparer.disable(qat, "fc")
    int8_model = preparer.convert_to_quantized(qat)
    assert type(int8_model.fc) is nn.Linear and int8_model.fc.weight is not qat.fc.weight
    expected = _eval(qat, DARK)
    assert "quantization is disabled" in qat.fc.interpreter.fallback_reason
    assert np.array_equal(int8_model(DARK).numpy(), expected)
    report = parity_report(qat, int8_model, DARK)
    assert report.passes and [layer.name for layer in report.layers] == ["conv1.output", "conv3.output"]


def test_weights_only_models_evaluate_in_float_and_refuse_conversion():
    preparer, qat = _prepared(QuantizationConfig.weights_only())
    _train(qat, SGD(qat.parameters(), lr=0.05), BATCHES[:2])
    assert qat.conv1.input_fake_quant is None
    _eval(qat, DARK)
    assert "does not quantize its input and output" in qat.conv1.interpreter.fallback_reason
    with pytest.raises(ConfigError, match="eager-mode layer 'conv1' does not quantize its input and output"):
        preparer.convert_to_quantized(qat)


def test_save_int8_model_refuses_and_the_state_dict_route_works(trained, tmp_path):
    preparer, qat, int8_model, requantization = trained
    with pytest.raises(ConfigError, match="converted from an eager-mode QAT model") as error:
        save_int8_model(tmp_path / "model.int8", int8_model)
    assert "qatcore.save(int8_model.state_dict(), path)" in str(error.value)
    assert not (tmp_path / "model.int8").exists()
    # what the message says to do: save the state, rebuild the structure, load it
    qatcore.save(int8_model.state_dict(), tmp_path / "int8_state")
    _, fresh = _prepared(QuantizationConfig(requantization=requantization), seed=4)
    with no_grad():
        fresh(BRIGHT)  # one training-mode batch: every quantizer has a grid
        fresh(DARK)
    rebuilt = QATPreparer().convert_to_quantized(fresh)
    rebuilt.load_state_dict(qatcore.load(tmp_path / "int8_state"))
    for x in (BRIGHT, DARK):
        assert np.array_equal(rebuilt(x).numpy(), int8_model(x).numpy())
