"""QAT preparation: graph mode, eager fallback, identity of parameters, disabled layers,
the lifecycle schedule, and the accuracy the acceptance lines ask for."""

import numpy as np
import pytest

import qatcore.nn.functional as F
from qatcore import nn
from qatcore.data import DataLoader, load_digits
from qatcore.errors import ConfigError, ObserverError
from qatcore.models import MLP, DigitsCNN, SmallResNet
from qatcore.optim import SGD, CosineAnnealingLR
from qatcore.pipeline import RunSettings, train_float
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.qat import (
    IQATPreparer,
    LayerwiseConfig,
    QATConv2d,
    QATConvBn2d,
    QATLinear,
    QATPreparer,
    QATSchedule,
)
from qatcore.quantization.qat.parity import parity_report
from qatcore.training import evaluate_accuracy, train_one_epoch


def batch(seed=0, n=8):
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def call_targets(qat_model):
    return [n.target for n in qat_model.graph.nodes if n.op == "call_module"]


def test_preparer_implements_the_interface():
    assert isinstance(QATPreparer(), IQATPreparer)
    with pytest.raises(TypeError):
        IQATPreparer()


def test_graph_mode_structure_for_digits_cnn():
    model = DigitsCNN()
    qat = QATPreparer().prepare_for_qat(model)
    assert call_targets(qat) == ["activation_fake_quant.x", "conv1", "pool1", "conv2", "pool2", "flatten", "fc"]
    assert isinstance(qat.get_submodule("conv1"), QATConvBn2d) and qat.get_submodule("conv1").relu
    assert isinstance(qat.get_submodule("fc"), QATLinear)
    # the float model is untouched and shares its parameters and BatchNorms
    assert isinstance(model.conv1, nn.Conv2d)
    assert qat.get_submodule("conv1").weight is model.conv1.weight
    assert qat.get_submodule("bn1") is model.bn1
    assert set(model.state_dict()) <= set(qat.state_dict())
    qat.lint()


def test_resnet_gets_quantizers_after_residual_adds():
    qat = QATPreparer().prepare_for_qat(SmallResNet())
    targets = call_targets(qat)
    assert "activation_fake_quant.layer1_relu2" in targets and "activation_fake_quant.layer2_relu2" in targets
    shortcut = qat.get_submodule("layer2.shortcut.0")
    assert isinstance(shortcut, QATConvBn2d) and not shortcut.relu
    qat.lint()


def test_optimizer_created_before_prepare_keeps_training():
    model = DigitsCNN()
    optimizer = SGD(model.parameters(), lr=0.1)
    qat = QATPreparer().prepare_for_qat(model)
    before = model.conv1.weight.data.copy()
    F.cross_entropy(qat(batch()), np.arange(8) % 10).backward()
    optimizer.step()
    assert not np.array_equal(model.conv1.weight.data, before)


def test_disabled_layer_is_bit_identical_to_float():
    disabled = LayerwiseConfig(overrides={"layers.5": False})
    reference = MLP()
    qat = QATPreparer().prepare_for_qat(MLP(), disabled)
    layer = qat.get_submodule("layers.5")
    assert type(layer) is nn.Linear
    qat(batch())
    x = np.random.default_rng(1).random((4, 64), dtype=np.float32)
    np.testing.assert_array_equal(layer(x).numpy(), reference.layers[5](x).numpy())
    assert "disabled" in QATPreparer().describe(qat)


def test_override_matching_no_layer_lists_closest_names():
    with pytest.raises(ConfigError, match=r"name 'fc' matches no layer \(closest: \['layers.1'"):
        QATPreparer().prepare_for_qat(MLP(), LayerwiseConfig(overrides={"fc": False}))


def test_runtime_disable_computes_float_layer():
    model = DigitsCNN()
    qat = QATPreparer().prepare_for_qat(model)
    qat(batch())
    fc = qat.get_submodule("fc")
    x = np.random.default_rng(2).random((4, 128), dtype=np.float32)
    preparer = QATPreparer()
    preparer.disable(qat, "fc")
    np.testing.assert_array_equal(fc(x).numpy(), model.fc(x).numpy())
    preparer.enable(qat, "fc")
    assert not np.array_equal(fc(x).numpy(), model.fc(x).numpy())
    with pytest.raises(ConfigError, match="not a quantized layer"):
        preparer.disable(qat, "pool1")


def test_weights_only_mode_inserts_no_activation_quantizers():
    qat = QATPreparer().prepare_for_qat(DigitsCNN(), QuantizationConfig.weights_only())
    assert not any(t.startswith("activation_fake_quant") for t in call_targets(qat))
    assert qat.get_submodule("conv1").output_fake_quant is None
    assert isinstance(qat.get_submodule("conv1").weight_fake_quant, FakeQuantize)


class Dynamic(nn.Module):
    """Control flow on a tensor value: untraceable, so eager mode."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, rng=rng)
        self.fc = nn.Linear(4 * 64, 10, rng=rng)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if y.mean().item() > 100.0:
            y = y * 0.5
        return self.fc(F.flatten(y, 1))


def test_dynamic_model_falls_back_to_eager_and_trains():
    model = Dynamic()
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model)
    assert isinstance(qat.conv, QATConv2d) and isinstance(model.conv, nn.Conv2d)
    assert "eager mode" in preparer.describe(qat) and "tracing failed" in preparer.describe(qat)
    x_train, y_train, x_test, y_test = load_digits()
    optimizer = SGD(qat.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(0))
    for _ in range(2):
        train_one_epoch(qat, loader, optimizer)
    assert evaluate_accuracy(qat, x_test, y_test) > 0.85
    with pytest.raises(Exception, match="TraceError|value"):
        QATPreparer(mode="graph").prepare_for_qat(model)


def test_eager_inplace_swaps_the_model_itself():
    model = MLP()
    qat = QATPreparer(mode="eager", inplace=True).prepare_for_qat(model)
    assert qat is model and isinstance(model.layers[1], QATLinear)
    with pytest.raises(ConfigError, match="inplace"):
        QATPreparer(mode="graph", inplace=True)


def test_schedule_drives_observers_fake_quant_and_bn():
    schedule = QATSchedule(start_observers_at=1, start_fake_quant_at=2, freeze_observers_at=3, freeze_bn_at=3)
    model = DigitsCNN()
    qat = QATPreparer(schedule=schedule).prepare_for_qat(model)
    x = batch()
    conv1 = qat.get_submodule("conv1")
    quantizer = conv1.weight_fake_quant
    qat(x)  # step 0: float
    assert not bool(quantizer.observer_enabled.data) and not bool(quantizer.fake_quant_enabled.data)
    assert not quantizer.observer.has_observed
    qat(x)  # step 1: observing
    assert quantizer.observer.has_observed and not bool(quantizer.fake_quant_enabled.data)
    qat(x)  # step 2: fake quant on
    assert bool(quantizer.fake_quant_enabled.data)
    qat(x)  # step 3: frozen
    assert not bool(quantizer.observer_enabled.data) and bool(conv1.bn_frozen.data)
    running = model.bn1.running_mean.data.copy()
    qat(x)
    np.testing.assert_array_equal(model.bn1.running_mean.data, running)  # frozen BN does not move
    assert qat.qat_controller.current_step == 5
    qat.eval()
    qat(x)
    assert qat.qat_controller.current_step == 5  # eval passes are not steps


def test_explicit_stepping():
    qat = QATPreparer(schedule=QATSchedule(start_fake_quant_at=2), auto_step=False).prepare_for_qat(MLP())
    qat(batch())
    assert qat.qat_controller.current_step == 0
    QATPreparer().step(qat, 2)
    assert qat.qat_controller.current_step == 2
    assert all(bool(q.fake_quant_enabled.data) for q in qat.modules() if isinstance(q, FakeQuantize))


def test_eval_before_any_observation_is_an_error():
    qat = QATPreparer().prepare_for_qat(MLP()).eval()
    with pytest.raises(ObserverError, match="nothing was observed"):
        qat(batch())


def test_zero_gamma_does_not_divide_by_zero():
    model = DigitsCNN()
    model.bn1.weight.data[:4] = 0.0
    qat = QATPreparer().prepare_for_qat(model)
    out = qat(batch())
    out.sum().backward()
    assert np.all(np.isfinite(out.numpy())) and np.all(np.isfinite(model.conv1.weight.grad))


@pytest.mark.parametrize("gamma", [0.0, 1e-45])
def test_dead_channels_agree_between_training_eval_and_int8(gamma):
    """gamma == 0, or a subnormal gamma whose float32 product with 1 / sqrt(var + eps)
    underflows: training, eval and the int8 model treat the channel alike (it outputs beta)."""
    model = DigitsCNN()
    model.bn1.weight.data[0] = gamma
    model.bn1.running_var.data[0] = 9.0
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model)
    qat(batch())
    layer = qat.get_submodule("conv1")
    _, _, dead = layer.folded_parameters()
    assert dead[0] and not dead[1:].any()
    qat.eval()
    channel = layer(batch(2)).numpy()[:, 0]
    assert np.all(channel == channel.flat[0])  # beta (through the ReLU and the output grid) everywhere
    report = parity_report(qat, preparer.convert_to_quantized(qat), batch(1))
    assert report.output.exact >= 0.999 and report.output.max_lsb <= 1, str(report)


def test_frozen_layer_is_quantized_with_static_weight_qparams():
    model = DigitsCNN()
    model.fc.requires_grad_(False)
    qat = QATPreparer().prepare_for_qat(model)
    optimizer = SGD(qat.parameters(), lr=0.1)
    qat(batch())
    scale = qat.get_submodule("fc").weight_fake_quant.scale.data.copy()
    for seed in range(3):
        optimizer.zero_grad()
        F.cross_entropy(qat(batch(seed)), np.arange(8) % 10).backward()
        optimizer.step()
    np.testing.assert_array_equal(qat.get_submodule("fc").weight_fake_quant.scale.data, scale)
    assert model.fc.weight.grad is None


def test_prepare_twice_is_refused():
    qat = QATPreparer().prepare_for_qat(MLP())
    with pytest.raises(ConfigError, match="already prepared"):
        QATPreparer().prepare_for_qat(qat)


def _fine_tune(model, config, epochs=3):
    x_train, y_train, x_test, y_test = load_digits()
    qat = QATPreparer().prepare_for_qat(model, config)
    optimizer = SGD(qat.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    schedule = CosineAnnealingLR(optimizer, T_max=epochs)
    loader = DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(1))
    for _ in range(epochs):
        train_one_epoch(qat, loader, optimizer)  # the very loop that trained the float model
        schedule.step()
    return evaluate_accuracy(qat, x_test, y_test)


@pytest.fixture(scope="module")
def trained_cnn():
    result = train_float(RunSettings(model="cnn", epochs=12, lr=0.05, batch_size=64, seed=0))
    return result.accuracy, result.model.state_dict()


def test_qat_8bit_within_half_a_point_of_float(trained_cnn):
    float_accuracy, state = trained_cnn
    assert float_accuracy >= 0.97
    model = DigitsCNN()
    model.load_state_dict(state)
    assert _fine_tune(model, QuantizationConfig()) >= float_accuracy - 0.005


def test_qat_lsq_4bit_within_two_points_of_float(trained_cnn):
    float_accuracy, state = trained_cnn
    model = DigitsCNN()
    model.load_state_dict(state)
    assert _fine_tune(model, QuantizationConfig.lsq_4bit_weights()) >= float_accuracy - 0.02


def test_resnet_prepares_and_trains():
    x_train, y_train, x_test, y_test = load_digits()
    qat = QATPreparer().prepare_for_qat(SmallResNet())
    optimizer = SGD(qat.parameters(), lr=0.05, momentum=0.9)
    schedule = CosineAnnealingLR(optimizer, T_max=3)
    loader = DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(0))
    for _ in range(3):
        train_one_epoch(qat, loader, optimizer)
        schedule.step()
    assert evaluate_accuracy(qat, x_test, y_test) > 0.9


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="lazy"), "QATPreparer.mode must be one of"),
    (dict(inplace="no"), "QATPreparer.inplace must be True or False, got 'no'"),
    (dict(auto_step=1), "QATPreparer.auto_step must be True or False, got 1"),
    (dict(schedule={"freeze_bn_at": 3}), "QATPreparer.schedule must be a QATSchedule"),
    (dict(statistics=10), "QATPreparer.statistics must be a StatisticsConfig"),
    (dict(mode="graph", inplace=True), "inplace=True needs mode 'eager' or 'auto'"),
])
def test_preparer_arguments_are_checked_when_given(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QATPreparer(**kwargs)
