"""What the ``qatcore`` commands find in a run folder, and how they rebuild a run's models.

A run folder is what :func:`~qatcore.pipeline.run_pipeline` writes (``float.qat``,
``qat.ckpt``, ``model.int8``, ``statistics.qat`` and ``.json``, ``report.md``,
``result.json``). The commands that read a run take the folder or a file from it:

- :func:`run_file` turns a folder into the file of a given name in it;
- :func:`load_statistics` reads the statistics of a folder, ``statistics.qat``,
  ``statistics.json`` or a QAT checkpoint;
- :func:`load_run_checkpoint` rebuilds the QAT model of a checkpoint, taking the
  reference model and its input shape from the run settings saved in it (``--model``
  and ``--image-size`` override them); a checkpoint whose tensors do not fit says
  which model they do fit, and which option to pass;
- :func:`output_path` is where a command writes by default: next to its source, so
  into the run folder.

Every error is a ``ConfigError`` of one line that names what to change.

>>> from qatcore.pipeline import RunSettings, run_pipeline
>>> settings = RunSettings(model="mlp", epochs=1, qat_epochs=1, output="folder-run")
>>> _ = run_pipeline(settings)
>>> run_file(settings.output, "qat.ckpt").name, output_path(settings.output, "model.onnx").as_posix()
('qat.ckpt', 'folder-run/model.onnx')
>>> checkpoint = load_run_checkpoint("folder-run")
>>> checkpoint.model, checkpoint.channels, checkpoint.image_size
('mlp', 1, 8)
>>> sorted(load_statistics("folder-run/statistics.json").quantizers)[:2]
['activation_fake_quant.x', 'layers.1.output']
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qatcore.errors import ConfigError, QATCoreError
from qatcore.nn import Module
from qatcore.pipeline.resume import RESUME_FILE
from qatcore.pipeline.settings import MODELS, make_model, model_input
from qatcore.quantization.qat import QATPreparer, QATStatistics
from qatcore.quantization.qat.checkpointing import read_qat_checkpoint

__all__ = ["run_file", "output_path", "run_settings_of", "guess_reference_model", "RunCheckpoint",
           "load_run_checkpoint", "load_statistics"]

QAT_CHECKPOINT = "qat.ckpt"
STATISTICS_FILE = "statistics.qat"


def _must_exist(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{path} does not exist")


def run_file(path: str | os.PathLike, name: str) -> Path:
    """``path`` itself if it is a file, else the file ``name`` in the run folder ``path``."""
    path = Path(path)
    _must_exist(path)
    if not path.is_dir():
        return path
    if (path / name).is_file():
        return path / name
    if (path / RESUME_FILE).is_file():
        raise ConfigError(f"{path} holds an interrupted run, without {name} yet: finish it with "
                          f"qatcore run --resume {path}")
    raise ConfigError(f"{path} is not a run folder: it has no {name} (qatcore run --output {path} makes one)")


def output_path(source: str | os.PathLike, name: str) -> Path:
    """Where a command reading ``source`` writes ``name`` by default: in the run folder
    ``source``, or next to the file ``source`` (so in its run folder)."""
    source = Path(source)
    return (source if source.is_dir() else source.parent) / name


def run_settings_of(path: str | os.PathLike) -> dict[str, Any]:
    """The ``qatcore run`` settings saved in the QAT checkpoint ``path`` (``RunSettings.to_dict()``),
    or {} when it holds none (a checkpoint saved from Python, or not a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        payload = read_qat_checkpoint(path)
    except QATCoreError:
        return {}
    extra = payload.get("extra")
    settings = extra.get("run_args") if isinstance(extra, Mapping) else None
    return dict(settings) if isinstance(settings, Mapping) else {}


def guess_reference_model(state: Mapping[str, Any]) -> str | None:
    """The reference model (a key of ``MODELS``) whose float state names all appear in the QAT
    state ``state``, the one with the most of them when several do; None when none does.
    Names do not depend on the input size, so this holds whatever size the run trained at."""
    best, best_count = None, 0
    for name in MODELS:
        channels, image_size = model_input(name)
        keys = set(make_model(name, np.random.default_rng(0), image_size, channels).state_dict())
        if keys <= state.keys() and len(keys) > best_count:
            best, best_count = name, len(keys)
    return best


@dataclass(frozen=True, eq=False)
class RunCheckpoint:
    """A QAT checkpoint rebuilt: the QAT model, the reference model's name and the input
    (channels, image_size) it takes, and the checkpoint's path."""

    qat_model: Module
    model: str
    channels: int
    image_size: int
    path: Path


def load_run_checkpoint(source: str | os.PathLike, model: str | None = None,
                        image_size: int | None = None) -> RunCheckpoint:
    """The QAT model of the checkpoint ``source`` (or of the run folder ``source``).

    The reference model and the input shape are the run's (``run_settings_of``; MNIST runs
    take 1 x 28 x 28, others ``model_input``); ``model`` and ``image_size`` replace them. A
    checkpoint without run settings is of the reference model its tensor names match.
    ConfigError, in one line, for a float checkpoint or one whose tensors do not fit: it
    names the model the tensors fit (``--model``) or asks for the side (``--image-size``).
    """
    path = run_file(source, QAT_CHECKPOINT)
    payload = read_qat_checkpoint(path)
    if payload["format"] == "float":
        raise ConfigError(f"{path} is a float checkpoint: convert and export take a QAT checkpoint "
                          f"({QAT_CHECKPOINT} in a run folder)")
    settings = run_settings_of(path)
    name = model or settings.get("model") or guess_reference_model(payload["model"])
    if name is None:
        raise ConfigError(f"{path} is not a checkpoint of a reference model ({', '.join(MODELS)}); rebuild your "
                          f"own model with QATPreparer.from_checkpoint(path, float_model) in Python")
    channels, side = model_input(name, mnist=bool(settings.get("mnist")))
    side = image_size or side
    float_model = make_model(name, np.random.default_rng(0), side, channels)
    try:
        qat_model, _ = QATPreparer.from_checkpoint(path, float_model)
    except QATCoreError as e:
        guess = guess_reference_model(payload["model"])
        if guess is not None and guess != name:
            raise ConfigError(f"{path} is not a checkpoint of {name}: its tensors are those of {guess}; "
                              f"pass --model {guess}") from e
        if guess == name:
            raise ConfigError(f"{path}: the {name} checkpoint's tensors do not fit {channels} x {side} x {side} "
                              f"inputs; pass --image-size with the side it was trained at") from e
        raise ConfigError(f"{path} is not a checkpoint of {name}, nor of another reference model "
                          f"({', '.join(MODELS)}); rebuild your own model with "
                          f"QATPreparer.from_checkpoint(path, float_model) in Python") from e
    return RunCheckpoint(qat_model, name, channels, side, path)


def load_statistics(source: str | os.PathLike) -> QATStatistics:
    """The QAT statistics in ``source``: a run folder (its ``statistics.qat``, else its QAT
    checkpoint's), a ``statistics.qat`` file, a ``statistics.json`` record or a QAT checkpoint."""
    source = Path(source)
    _must_exist(source)
    if source.is_dir():
        source = run_file(source, STATISTICS_FILE if (source / STATISTICS_FILE).is_file() else QAT_CHECKPOINT)
    if source.suffix.lower() == ".json":
        try:
            return QATStatistics.from_json(source.read_text(errors="replace"))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    try:
        return QATStatistics.load(source)
    except QATCoreError:
        payload = read_qat_checkpoint(source)
    if payload["format"] == "float":
        raise ConfigError(f"{source} is a float checkpoint: it holds no QAT statistics (qat.ckpt does)")
    return QATStatistics.from_dict(payload["statistics"])
