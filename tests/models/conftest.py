"""Shared by the model tests: one QAT round trip of a 32x32x3 model on two images."""

from dataclasses import dataclass

import numpy as np
import pytest


@dataclass
class QATRoundTrip:
    preparer: object
    qat_model: object
    int8_model: object
    inputs: np.ndarray
    losses: list[float]
    weights_before: dict[str, np.ndarray]


def _qat_round_trip(model, steps: int = 1) -> QATRoundTrip:
    """Prepare ``model`` for QAT, take ``steps`` SGD steps on two 32x32x3 digits and convert it."""
    from qatcore.data import load_digits
    from qatcore.nn import functional as F
    from qatcore.optim import SGD
    from qatcore.quantization.qat import QATPreparer

    x_train, y_train, _, _ = load_digits(image_size=32, channels=3)
    x, y = x_train[:2], y_train[:2]
    preparer = QATPreparer()
    qat_model = preparer.prepare_for_qat(model)
    weights_before = {name: p.data.copy() for name, p in qat_model.named_parameters()}
    optimizer = SGD(qat_model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(qat_model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.data))
    int8_model = preparer.convert_to_quantized(qat_model)
    return QATRoundTrip(preparer, qat_model, int8_model, x, losses, weights_before)


@pytest.fixture(scope="session")
def qat_round_trip():
    """``qat_round_trip(model, steps=1) -> QATRoundTrip``: prepare, train on two images, convert."""
    return _qat_round_trip
