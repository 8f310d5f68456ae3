"""qatcore.training: train_one_epoch's on_epoch callback reports loss, training accuracy and time."""

import numpy as np

from qatcore.data import DataLoader, load_digits
from qatcore.models import MLP
from qatcore.nn import functional as F
from qatcore.optim import SGD
from qatcore.training import EpochResult, train_one_epoch


def test_on_epoch_reports_the_epoch_once_with_its_accuracy():
    x, y, _, _ = load_digits()
    model = MLP()
    epochs = []
    steps = []
    loss = train_one_epoch(model, DataLoader(x[:200], y[:200], 64), SGD(model.parameters(), lr=0.1),
                           on_step=lambda step, value: steps.append(value), on_epoch=epochs.append)
    (result,) = epochs
    assert isinstance(result, EpochResult) and result.loss == loss
    assert result.samples == 200 and result.steps == 4 == len(steps) and result.time_s > 0
    assert 0.0 <= result.accuracy <= 1.0
    # the accuracy is that of the outputs the model trained on, batch by batch
    assert abs(result.loss - np.average(steps, weights=[64, 64, 64, 8])) < 1e-6
    assert str(result).startswith(f"loss {loss:.4f}  train accuracy {100 * result.accuracy:.2f}%  ")


def test_on_epoch_accuracy_is_none_for_a_regression_loss():
    x = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
    target = np.zeros((32, 10), np.float32)
    model = MLP()
    epochs = []
    train_one_epoch(model, DataLoader(x, target, 16), SGD(model.parameters(), lr=0.01), loss_fn=F.mse_loss,
                    on_epoch=epochs.append)
    assert epochs[0].accuracy is None and "accuracy" not in str(epochs[0])
