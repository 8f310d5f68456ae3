"""Float training, the first stage of a run.

The reference model is trained with SGD (momentum 0.9, weight decay 1e-4) under a
cosine learning-rate schedule over ``settings.epochs``, on mini-batches that a
shuffling ``DataLoader`` draws from the run's one generator,
``np.random.default_rng(settings.seed)``, which also drew the model's weights. QAT
fine-tuning goes on with the same loader and generator, so a whole run is fixed by
its settings.

>>> result = train_float(RunSettings(model="mlp", epochs=2))
>>> round(result.accuracy, 4), type(result.model).__name__
(0.6964, 'MLP')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qatcore.data import DataLoader
from qatcore.nn import Module
from qatcore.optim import SGD, CosineAnnealingLR
from qatcore.pipeline.settings import Dataset, RunSettings, load_dataset, make_model
from qatcore.pipeline.training_loop import train_epochs
from qatcore.training import evaluate_accuracy

__all__ = ["FloatTraining", "FloatResult", "train_float"]


@dataclass(frozen=True, eq=False)
class FloatTraining:
    """Everything float training changes as it runs (and a resumed run restores)."""

    settings: RunSettings
    dataset: Dataset
    rng: np.random.Generator = field(repr=False)
    model: Module = field(repr=False)
    loader: DataLoader = field(repr=False)
    optimizer: SGD = field(repr=False)
    schedule: CosineAnnealingLR = field(repr=False)

    @classmethod
    def start(cls, settings: RunSettings, dataset: Dataset) -> FloatTraining:
        """A fresh model, loader, optimizer and schedule, from the generator seeded with
        ``settings.seed``."""
        rng = np.random.default_rng(settings.seed)
        model = make_model(settings.model, rng, dataset.image_size, dataset.channels)
        loader = DataLoader(dataset.x_train, dataset.y_train, settings.batch_size, shuffle=True, rng=rng)
        optimizer = SGD(model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=1e-4)
        schedule = CosineAnnealingLR(optimizer, T_max=settings.epochs)
        return cls(settings, dataset, rng, model, loader, optimizer, schedule)

    def train(self, first_epoch: int = 0, *, on_progress: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None,
              on_epoch: Callable[[str], None] | None = None,
              after_epoch: Callable[[int], None] | None = None) -> int | None:
        """Train from ``first_epoch`` to ``settings.epochs``; None when done, else the epoch
        in which ``should_stop()`` stopped it (see ``train_epochs``)."""
        return train_epochs(self.model, self.loader, self.optimizer, self.schedule,
                            range(first_epoch, self.settings.epochs), label="float",
                            on_progress=on_progress, should_stop=should_stop, on_epoch=on_epoch,
                            after_epoch=after_epoch)

    def accuracy(self) -> float:
        """The model's accuracy on the test split."""
        return evaluate_accuracy(self.model, self.dataset.x_test, self.dataset.y_test)

    def state_dict(self) -> dict:
        """Copies of the model, optimizer, schedule, loader and generator states."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "loader": self.loader.state_dict(),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s states; the loader last, as it redraws its epoch's
        order from the generator."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.bit_generator.state = state["rng"]
        self.loader.load_state_dict(state["loader"])


@dataclass(frozen=True, eq=False)
class FloatResult:
    """A finished float training: its test ``accuracy`` and the training objects (the
    trained ``model``, and the loader and generator QAT fine-tuning continues with)."""

    accuracy: float
    training: FloatTraining = field(repr=False)

    @property
    def model(self) -> Module:
        return self.training.model


def train_float(settings: RunSettings, dataset: Dataset | None = None, *,
                on_progress: Callable[[str], None] | None = None,
                on_epoch: Callable[[str], None] | None = None) -> FloatResult:
    """Train ``settings.model`` in float on ``dataset`` (default: ``load_dataset(settings)``)
    for ``settings.epochs`` epochs; writes no files. ``on_progress`` gets a line per step, ``on_epoch`` one per epoch
    (loss, training accuracy, time)."""
    training = FloatTraining.start(settings, dataset if dataset is not None else load_dataset(settings))
    training.train(on_progress=on_progress, on_epoch=on_epoch)
    return FloatResult(training.accuracy(), training)
