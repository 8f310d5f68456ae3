"""Post-training calibration (qatcore.quantization.qat.calibration): observers on, no
gradients, no training step, BatchNorm statistics untouched; afterwards the model converts
with exact parity, in graph and eager mode."""

import numpy as np
import pytest

from qatcore import nn
from qatcore.data import DataLoader, load_digits
from qatcore.errors import ConfigError
from qatcore.models import DigitsCNN
from qatcore.nn import functional as F
from qatcore.optim import SGD
from qatcore.quantization.qat import QATPreparer, calibrate, parity_report
from qatcore.training import evaluate_accuracy, train_one_epoch


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def trained_cnn(digits):
    x_train, y_train, _, _ = digits
    model = DigitsCNN()
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(0))
    for _ in range(3):
        train_one_epoch(model, loader, optimizer)
    return model


class Branchy(nn.Module):
    """Untraceable (branches on the data): eager mode."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, rng=rng)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10, rng=rng)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if float(y.data.mean()) > 1e9:
            y = y * 0.5
        return self.fc(y.reshape(y.shape[0], -1))


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_calibrated_model_converts_with_exact_parity_and_keeps_the_float_accuracy(trained_cnn, digits, mode):
    x_train, y_train, x_test, y_test = digits
    state = {key: np.array(value) for key, value in trained_cnn.state_dict().items()}
    preparer = QATPreparer(mode=mode)
    ptq_model = preparer.prepare_for_qat(trained_cnn)
    modes = [module.training for module in ptq_model.modules()]
    samples = preparer.calibrate(ptq_model, DataLoader(x_train, y_train, 64), num_batches=10)
    assert samples == 640
    controller = preparer.controller(ptq_model)
    assert controller.current_step == 0  # calibration batches are not training steps
    assert controller.statistics.quantizers == {}  # and record no training statistics
    for key, value in trained_cnn.state_dict().items():  # no weight trained, no BatchNorm statistic moved
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    assert [module.training for module in ptq_model.modules()] == modes  # each back in the mode it was in
    int8_model = preparer.convert_to_quantized(ptq_model)
    assert parity_report(ptq_model, int8_model, x_test).passes
    float_accuracy = evaluate_accuracy(trained_cnn, x_test, y_test)
    assert evaluate_accuracy(int8_model, x_test, y_test) > float_accuracy - 0.03


def test_an_untraceable_model_calibrates_in_eager_mode(digits):
    x_train, _, x_test, _ = digits
    preparer = QATPreparer()
    model = Branchy()
    ptq_model = preparer.prepare_for_qat(model)
    assert preparer.controller(ptq_model).preparation_mode == "eager"
    running_mean = model.bn.running_mean.data.copy()
    assert calibrate(ptq_model, x_train[:300]) == 300  # an array: batches of 256
    np.testing.assert_array_equal(model.bn.running_mean.data, running_mean)
    assert parity_report(ptq_model, preparer.convert_to_quantized(ptq_model), x_test).passes


def test_calibration_observes_the_float_values_and_leaves_fake_quant_on(trained_cnn, digits):
    x_train = digits[0]
    preparer = QATPreparer()
    ptq_model = preparer.prepare_for_qat(trained_cnn)
    calibrate(ptq_model, [(x_train[:64], None), (x_train[64:128], None)])
    quantizers = preparer.controller(ptq_model)._quantizers
    assert quantizers and all(bool(q.fake_quant_enabled.data) and not bool(q.observer_enabled.data)
                              for q in quantizers)
    # the model's input quantizer saw the raw images, [0, 1]: its range is theirs
    first = ptq_model.get_submodule("activation_fake_quant.x")
    assert float(first.observer.min_val.data[0]) == 0.0 and float(first.observer.max_val.data[0]) == 1.0
    # an output quantizer saw the float layer's values: without fake quantization on the way,
    # conv1's output range is the float model's conv1 + bn1 + relu1 range
    assert float(ptq_model.get_submodule("conv1.output_fake_quant").observer.max_val.data[0]) > 0


def test_training_after_calibration_goes_on_from_the_schedule(trained_cnn, digits):
    x_train, y_train = digits[0], digits[1]
    preparer = QATPreparer()
    qat_model = preparer.prepare_for_qat(trained_cnn)
    calibrate(qat_model, x_train[:128])
    optimizer = SGD(qat_model.parameters(), lr=0.01)
    train_one_epoch(qat_model, DataLoader(x_train[:128], y_train[:128], 64), optimizer)
    assert preparer.controller(qat_model).current_step == 2


def test_calibrate_refuses_what_it_cannot_use(digits):
    x_train = digits[0]
    with pytest.raises(ConfigError, match="not prepared"):
        calibrate(DigitsCNN(), x_train[:8])
    qat_model = QATPreparer().prepare_for_qat(DigitsCNN())
    with pytest.raises(ConfigError, match="num_batches must be a positive int"):
        calibrate(qat_model, x_train[:8], num_batches=0)
    with pytest.raises(ConfigError, match="batches must be an iterable"):
        calibrate(qat_model, 3)
    with pytest.raises(ConfigError, match="gave no batch"):
        calibrate(qat_model, [])


def test_calibration_after_a_sample_step_records_no_statistics(trained_cnn, digits):
    x_train, y_train = digits[0], digits[1]
    preparer = QATPreparer()
    qat_model = preparer.prepare_for_qat(trained_cnn)
    optimizer = SGD(qat_model.parameters(), lr=0.01)
    train_one_epoch(qat_model, DataLoader(x_train[:64], y_train[:64], 64), optimizer)  # step 0: a sample step
    statistics = preparer.controller(qat_model).statistics

    def lengths():
        return {(name, key): len(s) for name, q in statistics.quantizers.items() for key, s in q.series.items()}

    before = lengths()
    assert before and preparer.controller(qat_model).collector.sampling
    calibrate(qat_model, x_train[:128])
    assert lengths() == before
    assert preparer.controller(qat_model).collector.sampling  # the training step's setting comes back
