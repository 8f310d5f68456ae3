"""QAT preparation and fine-tuning, the second stage of a run.

The trained float model is prepared with ``QATPreparer().prepare_for_qat`` and the
run's layer-wise config, then fine-tuned for ``settings.qat_epochs`` epochs with a new
SGD optimizer (the QAT model may have new Parameters, such as learned scales) at
``settings.qat_lr``, a fifth of the float rate, under its own cosine schedule. The
data loader and its generator are the float stage's, continued.

>>> from qatcore.pipeline import RunSettings, load_layerwise_config, train_float
>>> settings = RunSettings(model="mlp", epochs=2, qat_epochs=1)
>>> result = fine_tune_qat(train_float(settings), load_layerwise_config(settings))
>>> round(result.accuracy, 4), type(result.model.get_submodule("layers.1")).__name__
(0.7939, 'QATLinear')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qatcore.autograd import no_grad
from qatcore.errors import ConfigError
from qatcore.nn import Module
from qatcore.optim import SGD, CosineAnnealingLR
from qatcore.pipeline.float_training import FloatResult, FloatTraining
from qatcore.pipeline.settings import RunSettings, make_model
from qatcore.pipeline.training_loop import train_epochs
from qatcore.quantization.qat import LayerwiseConfig, QATPreparer
from qatcore.training import evaluate_accuracy

__all__ = ["QATTraining", "QATResult", "fine_tune_qat", "make_qat_optimizer", "check_config_converts"]


def check_config_converts(settings: RunSettings, layerwise: LayerwiseConfig, dataset) -> None:
    """Refuse, before any training, a config whose QAT model could not become an integer model:
    a fresh model of the run is prepared with ``layerwise``, observes one training batch and
    is converted (a fraction of a second on the digits). Raises the conversion's ConfigError,
    which names the layer and the field to change, saying that nothing was trained."""
    rng = np.random.default_rng(settings.seed)
    model = make_model(settings.model, rng, dataset.image_size, dataset.channels)
    preparer = QATPreparer(check_optimizers=False)
    qat_model = preparer.prepare_for_qat(model, layerwise)
    with no_grad():
        qat_model.train()
        qat_model(dataset.x_train[:settings.batch_size])
    try:
        preparer.convert_to_quantized(qat_model.eval())
    except ConfigError as e:
        raise ConfigError(f"{e} (checked before training: nothing was trained)") from None


def make_qat_optimizer(parameters, settings: RunSettings) -> SGD:
    """The fine-tuning optimizer: SGD at ``settings.qat_lr``, momentum 0.9, weight decay 1e-4."""
    return SGD(parameters, lr=settings.qat_lr, momentum=0.9, weight_decay=1e-4)


@dataclass(frozen=True, eq=False)
class QATTraining:
    """Everything fine-tuning changes as it runs: the QAT ``model``, its optimizer and
    schedule, and (in ``float_training``) the loader and generator it draws batches with."""

    float_training: FloatTraining = field(repr=False)
    model: Module = field(repr=False)
    optimizer: SGD = field(repr=False)
    schedule: CosineAnnealingLR = field(repr=False)

    @classmethod
    def start(cls, float_training: FloatTraining, layerwise: LayerwiseConfig) -> QATTraining:
        """Prepare the trained float model for QAT with ``layerwise``; a fresh optimizer and schedule."""
        qat_model = QATPreparer().prepare_for_qat(float_training.model, layerwise)
        optimizer = make_qat_optimizer(qat_model.parameters(), float_training.settings)
        return cls(float_training, qat_model, optimizer,
                   CosineAnnealingLR(optimizer, T_max=float_training.settings.qat_epochs))

    def train(self, first_epoch: int = 0, *, on_progress: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None,
              on_epoch: Callable[[str], None] | None = None,
              after_epoch: Callable[[int], None] | None = None) -> int | None:
        """Fine-tune from ``first_epoch`` to ``settings.qat_epochs``; None when done, else the
        epoch in which ``should_stop()`` stopped it (see ``train_epochs``)."""
        return train_epochs(self.model, self.float_training.loader, self.optimizer, self.schedule,
                            range(first_epoch, self.float_training.settings.qat_epochs), label="QAT",
                            on_progress=on_progress, should_stop=should_stop, on_epoch=on_epoch,
                            after_epoch=after_epoch)

    def accuracy(self) -> float:
        """The QAT model's accuracy on the test split."""
        dataset = self.float_training.dataset
        return evaluate_accuracy(self.model, dataset.x_test, dataset.y_test)


@dataclass(frozen=True, eq=False)
class QATResult:
    """A finished fine-tuning: the QAT model's test ``accuracy`` and the training objects."""

    accuracy: float
    training: QATTraining = field(repr=False)

    @property
    def model(self) -> Module:
        return self.training.model


def fine_tune_qat(float_result: FloatResult, layerwise: LayerwiseConfig, *,
                  on_progress: Callable[[str], None] | None = None,
                  on_epoch: Callable[[str], None] | None = None) -> QATResult:
    """Prepare ``float_result``'s model for QAT with ``layerwise`` and fine-tune it for
    ``settings.qat_epochs`` epochs; writes no files. ``on_progress`` gets a line per step, ``on_epoch`` one per epoch
    (loss, training accuracy, time)."""
    training = QATTraining.start(float_result.training, layerwise)
    training.train(on_progress=on_progress, on_epoch=on_epoch)
    return QATResult(training.accuracy(), training)
