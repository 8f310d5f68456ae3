"""The resume file of an interrupted run: what it holds, and how each stage restarts from it.

An interrupted run leaves ``resume.ckpt`` in its folder, written between two training
steps (on a stop request, and after every epoch, so that a crash loses at most one),
in one of two forms:

- during float training, a ``qatcore.save`` container ``{"format": "qatcore.run_float",
  "run_args": settings, "epoch": e, "model", "optimizer", "schedule", "loader", "rng"}``;
- during fine-tuning, a QAT checkpoint (``save_qat_checkpoint``, format
  ``"qatcore.qat_checkpoint"``) with the data generator under ``generators["data"]`` and
  ``extra = {"run_args", "epoch", "schedule", "loader", "float_accuracy"}``; the trained
  float model is then ``float.qat`` beside it.

``epoch`` is the epoch that was interrupted; the loader's state says which of its
batches come next. The run deletes the file when it finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import qatcore
from qatcore.errors import ConfigError
from qatcore.optim import CosineAnnealingLR
from qatcore.pipeline.float_training import FloatTraining
from qatcore.pipeline.qat_training import QATTraining, make_qat_optimizer
from qatcore.pipeline.settings import RunSettings
from qatcore.quantization.qat import QATPreparer, save_qat_checkpoint

__all__ = ["RESUME_FILE", "ResumePoint", "read_resume_point", "save_float_resume", "save_qat_resume",
           "restore_float", "restore_qat"]

RESUME_FILE = "resume.ckpt"
_FLOAT_FORMAT = "qatcore.run_float"
_QAT_FORMAT = "qatcore.qat_checkpoint"


@dataclass(frozen=True, eq=False)
class ResumePoint:
    """Where an interrupted run stopped: its ``settings``, the ``stage`` ("float" or
    "qat") and the file's contents."""

    settings: RunSettings
    stage: str
    payload: dict = field(repr=False)


def read_resume_point(folder: Path) -> ResumePoint:
    """Read ``folder/resume.ckpt`` (ConfigError when there is none or it is not a run state)."""
    path = folder / RESUME_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {folder}: no resume.ckpt there (nothing was interrupted)")
    payload = qatcore.load(path)
    if not isinstance(payload, dict) or payload.get("format") not in (_FLOAT_FORMAT, _QAT_FORMAT):
        raise ConfigError(f"--resume {folder}: resume.ckpt is not a qatcore run state")
    stage = "float" if payload["format"] == _FLOAT_FORMAT else "qat"
    run_args = payload["run_args"] if stage == "float" else (payload.get("extra") or {}).get("run_args")
    return ResumePoint(RunSettings.from_dict(run_args or {}), stage, payload)


def save_float_resume(folder: Path, training: FloatTraining, epoch: int) -> None:
    """Write the float stage's state, interrupted in ``epoch``."""
    qatcore.save({"format": _FLOAT_FORMAT, "run_args": training.settings.to_dict(), "epoch": epoch,
                  **training.state_dict()}, folder / RESUME_FILE)


def save_qat_resume(folder: Path, training: QATTraining, epoch: int, float_accuracy: float) -> None:
    """Write the fine-tuning stage's state, interrupted in ``epoch``."""
    float_training = training.float_training
    save_qat_checkpoint(folder / RESUME_FILE, training.model, training.optimizer,
                        extra={"run_args": float_training.settings.to_dict(), "epoch": epoch,
                               "schedule": training.schedule.state_dict(),
                               "loader": float_training.loader.state_dict(), "float_accuracy": float_accuracy},
                        generators={"data": float_training.rng})


def restore_float(training: FloatTraining, point: ResumePoint) -> int:
    """Put a fresh float stage back where ``point`` stopped; returns the epoch to continue."""
    training.load_state_dict(point.payload)
    return int(point.payload["epoch"])


def restore_qat(training: FloatTraining, folder: Path) -> tuple[QATTraining, int, float]:
    """Rebuild the fine-tuning stage from ``folder``'s float.qat and resume.ckpt on a fresh
    float stage; returns it, the epoch to continue and the float model's accuracy."""
    training.model.load_state_dict(qatcore.load(folder / "float.qat"))
    settings = training.settings
    qat_model, info = QATPreparer.from_checkpoint(folder / RESUME_FILE, training.model,
                                                  lambda parameters: make_qat_optimizer(parameters, settings),
                                                  generators={"data": training.rng})
    # Building a schedule sets the learning rate of its epoch 0; put the restored one back.
    optimizer_state = info.optimizer.state_dict()
    schedule = CosineAnnealingLR(info.optimizer, T_max=settings.qat_epochs)
    info.optimizer.load_state_dict(optimizer_state)
    schedule.load_state_dict(info.extra["schedule"])
    training.loader.load_state_dict(info.extra["loader"])  # after the generator: it redraws the epoch's order
    return (QATTraining(training, qat_model, info.optimizer, schedule), int(info.extra["epoch"]),
            float(info.extra["float_accuracy"]))
