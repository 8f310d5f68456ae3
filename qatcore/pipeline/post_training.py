"""Post-training quantization of the trained float model, the baseline a run's QAT is
compared with.

Every run computes it, right after float training and before any fine-tuning: the
float model (a fresh copy, from its saved state) is prepared with the run's layer-wise
config, exactly as QAT prepares it, calibrated (``calibrate``) on at most
``CALIBRATION_SAMPLES`` training images spread evenly over the training split, in
order (no draw from the run's generator, so the QAT stage that follows is the same
with or without it), and converted. The int8 model's test accuracy and its parity
with the calibrated model are the PTQ row of the run's summary; with
``--qat-epochs 0`` the PTQ int8 model is the run's model.

It costs one forward pass over the calibration images, a conversion and two
evaluations of the test set, small next to an epoch of training, and it answers the
first question about a QAT result: what did fine-tuning add over calibration alone?

>>> from qatcore.pipeline import RunSettings, load_dataset, load_layerwise_config, train_float
>>> settings = RunSettings(model="mlp", epochs=2)
>>> float_result = train_float(settings)
>>> ptq = post_training_quantize(float_result.model, float_result.training.dataset,
...                              load_layerwise_config(settings), settings.batch_size)
>>> ptq.calibration_samples, ptq.parity.passes, ptq.accuracy > 0.6
(1438, True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qatcore.data import DataLoader
from qatcore.nn import Module
from qatcore.pipeline.settings import Dataset
from qatcore.quantization.qat import LayerwiseConfig, ParityReport, QATPreparer, calibrate, parity_report
from qatcore.training import evaluate_accuracy

__all__ = ["CALIBRATION_SAMPLES", "PTQResult", "calibration_indices", "post_training_quantize"]

CALIBRATION_SAMPLES = 2048


@dataclass(frozen=True, eq=False)
class PTQResult:
    """A post-training quantization: the int8 model's test ``accuracy``, its ``parity`` with
    the calibrated ``model`` (a prepared QAT model, not trained), the ``int8_model`` and the
    number of ``calibration_samples``."""

    accuracy: float
    parity: ParityReport = field(repr=False)
    model: Module = field(repr=False)
    int8_model: Module = field(repr=False)
    calibration_samples: int


def calibration_indices(num_train: int, limit: int = CALIBRATION_SAMPLES) -> np.ndarray:
    """At most ``limit`` indices of the training split, evenly spread (all of them when it is
    no larger), in increasing order.

    >>> calibration_indices(5).tolist(), calibration_indices(10, limit=4).tolist()
    ([0, 1, 2, 3, 4], [0, 3, 6, 9])
    """
    if num_train <= limit:
        return np.arange(num_train)
    return np.unique(np.round(np.linspace(0, num_train - 1, limit)).astype(np.int64))


def post_training_quantize(float_model: Module, dataset: Dataset, layerwise: LayerwiseConfig,
                           batch_size: int) -> PTQResult:
    """Prepare ``float_model`` with ``layerwise``, calibrate it on the training images of
    ``calibration_indices`` in batches of ``batch_size``, convert it and evaluate it on the
    test split. The float model's weights and statistics are not changed (the prepared
    model shares its Parameters; calibration trains nothing and updates no BatchNorm)."""
    preparer = QATPreparer()
    model = preparer.prepare_for_qat(float_model, layerwise)
    indices = calibration_indices(len(dataset.x_train))
    samples = calibrate(model, DataLoader(dataset.x_train[indices], dataset.y_train[indices], batch_size))
    int8_model = preparer.convert_to_quantized(model)
    accuracy = evaluate_accuracy(int8_model, dataset.x_test, dataset.y_test)
    return PTQResult(accuracy, parity_report(model, int8_model, dataset.x_test), model, int8_model, samples)
