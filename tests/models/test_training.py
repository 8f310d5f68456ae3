"""End-to-end: the reference models learn the digits."""

import numpy as np

from qatcore.cli import run_float
from qatcore.data import DataLoader, load_digits
from qatcore.models import SmallResNet
from qatcore.optim import SGD
from qatcore.training import evaluate_accuracy, train_one_epoch


def test_digits_cnn_reaches_97_percent():
    result = run_float("cnn", epochs=12, lr=0.05, batch_size=64, seed=0)
    assert result["float_accuracy"] >= 0.97, result


def test_small_resnet_learns():
    x_train, y_train, x_test, y_test = load_digits()
    model = SmallResNet()
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(0))
    for _ in range(3):
        train_one_epoch(model, loader, optimizer)
    assert evaluate_accuracy(model, x_test, y_test) > 0.9
