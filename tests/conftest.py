"""Shared test settings: hypothesis without deadlines (the first call of a numba
kernel compiles it), a moderate number of examples so the suite stays fast, and
derandomized: every run tries the same examples, so CI cannot turn red on a new
random one (explore with a randomized profile locally:
``pytest --hypothesis-profile explore``)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "qatcore", deadline=None, max_examples=25, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("qatcore")


def _fine_tune(model, config=None, epochs=2, seed=1):
    """QAT fine-tuning on the digits: (preparer, qat_model) after ``epochs`` of SGD."""
    from qatcore.data import DataLoader, load_digits
    from qatcore.optim import SGD, CosineAnnealingLR
    from qatcore.quantization.qat import QATPreparer
    from qatcore.training import train_one_epoch

    x_train, y_train, _, _ = load_digits()
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model, config)
    optimizer = SGD(qat.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    schedule = CosineAnnealingLR(optimizer, T_max=epochs)
    loader = DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(seed))
    for _ in range(epochs):
        train_one_epoch(qat, loader, optimizer)
        schedule.step()
    return preparer, qat


@pytest.fixture(scope="session")
def fine_tune():
    """``fine_tune(model, config=None, epochs=2, seed=1) -> (preparer, qat_model)`` on the digits."""
    return _fine_tune


@pytest.fixture(scope="session")
def digits_qat():
    """(float accuracy, preparer, QAT model, int8 model) of the reference DigitsCNN run: 12 float
    epochs, 3 QAT epochs. Shared by the conversion and export tests; treat it as read-only."""
    from qatcore.cli import run_float

    result = run_float("cnn", epochs=12, lr=0.05, batch_size=64, seed=0, return_model=True)
    preparer, qat = _fine_tune(result["trained_model"], epochs=3)
    return result["float_accuracy"], preparer, qat, preparer.convert_to_quantized(qat)
