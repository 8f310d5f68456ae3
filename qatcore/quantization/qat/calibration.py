"""Post-training quantization (PTQ): calibrate a prepared model, then convert it.

PTQ is QAT without the training: the float model is prepared as for QAT, its
observers watch a few batches of representative data, and the ranges they saw fix
every scale and zero point; ``convert_to_quantized`` then gives the int8 model. It
is the baseline every QAT result is compared with (what did training add?).

:func:`calibrate` runs ``batches`` through a model from ``prepare_for_qat``:

- without gradients, so nothing is trained and no optimizer is needed;
- with every quantizer observing and fake quantization off (``QATController.calibration``),
  so the observers see the float model's own values, layer after layer;
- with every other module in eval mode: BatchNorm normalizes with (and keeps) its
  running statistics, folded into the weights as conversion folds them; Dropout
  passes values through;
- without counting training steps: the QAT schedule and the statistics are untouched.

Afterwards every quantizer has its observer off and fake quantization on, so the
model's eval forward is the PTQ model's arithmetic and ``convert_to_quantized`` gives
its int8 model with exact parity; each module is back in the mode it was in. The
observers keep what they saw: calibrating again adds to it, and QAT training can go
on from the calibrated ranges (observers: by the schedule, at the current step).

A learned (LSQ) scale is initialized from the first batch it sees
(s = 2 mean|x| / sqrt(qmax)), as training would start it.

>>> import numpy as np
>>> from qatcore.data import DataLoader, load_digits
>>> from qatcore.models import DigitsCNN
>>> from qatcore.quantization.qat import QATPreparer, parity_report
>>> from qatcore.training import evaluate_accuracy
>>> x_train, y_train, x_test, y_test = load_digits()
>>> preparer = QATPreparer()
>>> ptq_model = preparer.prepare_for_qat(DigitsCNN())
>>> calibrate(ptq_model, DataLoader(x_train, y_train, 64), num_batches=8)
512
>>> int8_model = preparer.convert_to_quantized(ptq_model)
>>> parity_report(ptq_model, int8_model, x_test).passes
True
"""

from __future__ import annotations

import itertools
import numbers

import numpy as np

from qatcore.autograd import no_grad
from qatcore.errors import ConfigError
from qatcore.nn.module import Module
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.qat.qat_layers import QATLayer
from qatcore.quantization.qat.training_integration import controller_of
from qatcore.tensor import Tensor

__all__ = ["calibrate"]

ARRAY_BATCH_SIZE = 256  # the batch size when calibrate is given one array of inputs


def calibrate(qat_model: Module, batches, num_batches: int | None = None) -> int:
    """Calibrate ``qat_model`` (from ``prepare_for_qat``) on ``batches`` (module docstring).

    Args:
        qat_model: a model prepared by ``QATPreparer.prepare_for_qat``.
        batches: an iterable of batches (a ``DataLoader``, a list, a generator), each an
            input array or Tensor, or a tuple whose first element is the input (labels
            are ignored); or a single numpy array of inputs (N, ...), taken in batches of
            256.
        num_batches: use only the first ``num_batches`` batches; None: all of them.

    Returns:
        The number of samples the model was calibrated on.

    Raises:
        ConfigError: the model was not prepared, ``num_batches`` is not a positive int,
            or ``batches`` gave no batch.
    """
    controller = controller_of(qat_model)
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral)
                                    or num_batches < 1):
        raise ConfigError(f"calibrate: num_batches must be a positive int or None, got {num_batches!r}")
    if isinstance(batches, (np.ndarray, Tensor)):
        array = batches
        batches = (array[start:start + ARRAY_BATCH_SIZE] for start in range(0, len(array), ARRAY_BATCH_SIZE))
    try:
        chosen = iter(batches) if num_batches is None else itertools.islice(batches, int(num_batches))
    except TypeError:
        raise ConfigError(f"calibrate: batches must be an iterable of input batches or an array, "
                          f"got {type(batches).__name__}") from None
    modes = {module: module.training for module in qat_model.modules()}
    samples = 0
    try:
        _calibration_modes(qat_model)
        with controller.calibration(), no_grad():
            for batch in chosen:
                x = batch[0] if isinstance(batch, tuple) else batch
                qat_model(x if isinstance(x, Tensor) else np.asarray(x))
                samples += len(x)
    finally:
        for module, training in modes.items():
            module.training = training
    if samples == 0:
        raise ConfigError("calibrate: batches gave no batch; calibration needs representative inputs")
    return samples


def _calibration_modes(qat_model: Module) -> None:
    """Everything in eval mode but the quantizers, the QAT layers (whose training-mode forward
    runs them; a folded BatchNorm still uses its running statistics, as its BatchNorm is in
    eval) and the model itself (in eval, a graph-mode model computes in int8 arithmetic,
    which needs the scales calibration is about to find)."""
    qat_model.eval()
    for module in qat_model.modules():
        if isinstance(module, (QATLayer, FakeQuantize)):
            module.train()
    qat_model.training = True
