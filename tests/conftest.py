"""Shared test settings: hypothesis without deadlines (the first call of a numba
kernel compiles it), a moderate number of examples so the suite stays fast, and
derandomized: every run tries the same examples, so CI cannot turn red on a new
random one (explore with a randomized profile locally:
``pytest --hypothesis-profile explore``).

Tests that compare against PyTorch carry ``@pytest.mark.torch``. Without PyTorch
they skip, saying why; ``pytest -m torch --require-torch`` runs only them and
fails any that does not run (a skip, or a module skipped while collecting),
which is how CI proves that none of them was skipped."""

import importlib.util

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

TORCH_MISSING = ("PyTorch is not installed; it is the optional reference these tests compare against "
                 "(pip install torch==2.13.0, then pytest -m torch --require-torch)")


def pytest_addoption(parser):
    parser.addoption("--require-torch", action="store_true",
                     help="fail, instead of skipping, every test marked torch that does not run")


def pytest_runtest_setup(item):
    if (item.get_closest_marker("torch") is not None and not item.config.getoption("--require-torch")
            and importlib.util.find_spec("torch") is None):
        pytest.skip(TORCH_MISSING)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and item.config.getoption("--require-torch")
            and item.get_closest_marker("torch")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"--require-torch: this PyTorch reference test was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # a module skipped while collecting (say, without the onnx extra) would hide its torch tests
    outcome = yield
    report = outcome.get_result()
    if report.skipped and collector.config.getoption("--require-torch"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"--require-torch: {collector.nodeid} was skipped while collecting, so its "
                           f"PyTorch reference tests could not run: {reason}")

settings.register_profile(
    "qatcore", deadline=None, max_examples=25, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("qatcore")


def _fine_tune(model, config=None, epochs=2, seed=1, optimizer_built="after"):
    """QAT fine-tuning on the digits: (preparer, qat_model) after ``epochs`` of SGD, with the
    optimizer built "after" preparation (from the QAT model's parameters) or "before" it (from
    the float model's; preparation adds the learned quantization parameters to it)."""
    from qatcore.data import DataLoader, load_digits
    from qatcore.optim import SGD, CosineAnnealingLR
    from qatcore.quantization.qat import QATPreparer
    from qatcore.training import train_one_epoch

    assert optimizer_built in ("before", "after"), optimizer_built
    x_train, y_train, _, _ = load_digits()
    preparer = QATPreparer()
    if optimizer_built == "before":
        optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    qat = preparer.prepare_for_qat(model, config)
    if optimizer_built == "after":
        optimizer = SGD(qat.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    schedule = CosineAnnealingLR(optimizer, T_max=epochs)
    loader = DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(seed))
    for _ in range(epochs):
        train_one_epoch(qat, loader, optimizer)
        schedule.step()
    return preparer, qat


@pytest.fixture(scope="session")
def fine_tune():
    """``fine_tune(model, config=None, epochs=2, seed=1, optimizer_built="after") -> (preparer, qat_model)``
    on the digits."""
    return _fine_tune


@pytest.fixture(scope="session")
def digits_qat():
    """(float accuracy, preparer, QAT model, int8 model) of the reference DigitsCNN run: 12 float
    epochs, 3 QAT epochs. Shared by the conversion and export tests; treat it as read-only."""
    from qatcore.pipeline import RunSettings, train_float

    result = train_float(RunSettings(model="cnn", epochs=12, lr=0.05, batch_size=64, seed=0))
    preparer, qat = _fine_tune(result.model, epochs=3)
    return result.accuracy, preparer, qat, preparer.convert_to_quantized(qat)
