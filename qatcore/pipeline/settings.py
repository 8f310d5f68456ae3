"""What a run is made of: its settings, the reference model by name, the layer-wise
QAT config and the data set.

:class:`RunSettings` has one field per ``qatcore run`` option (``--qat-epochs`` is
``qat_epochs``), with the same defaults, and is checked when built; an error names
the option and what it accepts, so the command line and Python give the same message.

>>> settings = RunSettings(model="mlp", epochs=2, qat_epochs=1, output="runs/mlp")
>>> settings.output.name, settings.batch_size, settings.to_dict()["output"]
('mlp', 64, 'runs/mlp')
>>> RunSettings(bits=12)
Traceback (most recent call last):
...
qatcore.errors.ConfigError: --bits must be in [2, 8] (int8 runtime), got 12
>>> model = make_model("cnn", np.random.default_rng(0), image_size=8)
>>> type(model).__name__
'DigitsCNN'
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from qatcore import models
from qatcore.data import load_digits, load_mnist_idx
from qatcore.errors import ConfigError
from qatcore.nn import Module
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.qat import LayerwiseConfig

__all__ = ["MODELS", "ReferenceModel", "make_model", "model_input", "RunSettings", "load_layerwise_config", "Dataset",
           "load_dataset"]

@dataclass(frozen=True)
class ReferenceModel:
    """A reference model of ``qatcore run``: ``build(rng, image_size, channels)`` makes a
    fresh float model for (N, channels, image_size, image_size) inputs, and the embedded
    digits are loaded at ``digits_image_size`` x ``digits_channels`` for it (MNIST is
    1 x 28 x 28 for every model)."""

    build: Callable[[np.random.Generator, int, int], Module]
    digits_image_size: int = 8
    digits_channels: int = 1


# The reference models by name. The CIFAR-sized networks take the digits upsampled to
# 32x32x3 (load_digits(image_size=32, channels=3)); global pooling fits any side.
MODELS: Mapping[str, ReferenceModel] = MappingProxyType({
    "mlp": ReferenceModel(lambda rng, side, channels: models.MLP(in_features=channels * side * side, rng=rng)),
    "cnn": ReferenceModel(lambda rng, side, channels: models.DigitsCNN(rng=rng, image_size=side,
                                                                       in_channels=channels)),
    "resnet": ReferenceModel(lambda rng, side, channels: models.SmallResNet(in_channels=channels, rng=rng)),
    "resnet20": ReferenceModel(lambda rng, side, channels: models.resnet20(in_channels=channels, rng=rng),
                               digits_image_size=32, digits_channels=3),
    "mobilenetv2": ReferenceModel(lambda rng, side, channels: models.MobileNetV2(in_channels=channels, rng=rng),
                                  digits_image_size=32, digits_channels=3),
})


def _reference_model(name: str) -> ReferenceModel:
    if name not in MODELS:
        raise ConfigError(f"model must be one of {list(MODELS)}, got {name!r}")
    return MODELS[name]


def make_model(name: str, rng: np.random.Generator, image_size: int = 8, channels: int = 1) -> Module:
    """The reference model ``name`` (a key of ``MODELS``) for square inputs of ``image_size``
    and ``channels``, its weights drawn from ``rng``."""
    return _reference_model(name).build(rng, image_size, channels)


def model_input(name: str, mnist: bool = False) -> tuple[int, int]:
    """``(channels, image_size)`` of the images a run of model ``name`` trains on: MNIST's
    (1, 28), or the embedded digits at the model's shape (``MODELS[name]``).

    >>> model_input("cnn"), model_input("resnet20"), model_input("resnet20", mnist=True)
    ((1, 8), (3, 32), (1, 28))
    """
    entry = _reference_model(name)
    return (1, 28) if mnist else (entry.digits_channels, entry.digits_image_size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunSettings:
    """The settings of one run (each field is the ``qatcore run`` option of that name).

    Fields:
        model: a key of ``MODELS`` ("mlp", "cnn", "resnet", "resnet20", "mobilenetv2").
        config: a layer-wise QAT config file (JSON, or TOML on Python 3.11+), or None
            for the default config with ``bits``-bit weights.
        bits: weight bits of the default config, 2..8 (the int8 runtime's range); below 8
            the weight scales are learned (LSQ, ``QuantizationConfig.lsq_4bit_weights`` at that
            width). Only without ``config``: a config file sets its own bits.
        epochs, qat_epochs: float training epochs (positive) and QAT fine-tuning epochs
            (0: post-training quantization only; every run also reports it).
        lr: the float SGD learning rate; fine-tuning uses ``qat_lr`` (a fifth of it).
        batch_size: positive.  seed: the seed of every random choice (>= 0).
        output: the run folder.  mnist: a folder of MNIST IDX files, or None for the
            embedded digits (8x8, or 32x32x3 for resnet20 and mobilenetv2).

    Paths may be given as strings. The fields are saved in checkpoints as
    ``to_dict()`` and read back by ``from_dict``.
    """

    # The order is that of the options, and of the "run_args" record saved in checkpoints.
    model: str = "cnn"
    config: Path | None = None
    bits: int = 8
    epochs: int = 12
    qat_epochs: int = 3
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0
    output: Path = Path("qatcore-run")
    mnist: Path | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {list(MODELS)}, got {self.model!r}")
        if not (_is_int(self.bits) and 2 <= self.bits <= 8):
            raise ConfigError(f"--bits must be in [2, 8] (int8 runtime), got {self.bits}")
        if self.config is not None and self.bits != 8:
            raise ConfigError(f"--bits {self.bits} applies to the default config; with --config, set "
                              f"\"weight\": {{\"bits\": {self.bits}}} in the config file instead")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (_is_int(self.qat_epochs) and self.qat_epochs >= 0):
            raise ConfigError(f"--qat-epochs must be a non-negative integer (0: post-training quantization only), "
                              f"got {self.qat_epochs!r}")
        if not (_is_int(self.seed) and self.seed >= 0):
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
                and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))
        for name in ("config", "output", "mnist"):
            value = getattr(self, name)
            if value is None and name != "output":
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"--{name} must be a path, got {value!r}")
            object.__setattr__(self, name, Path(value))

    @property
    def qat_lr(self) -> float:
        """The fine-tuning learning rate: a fifth of ``lr`` (the weights are already trained)."""
        return self.lr * 0.2

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data (paths as strings), in field order."""
        return {f.name: (str(value) if isinstance(value, Path) else value)
                for f in fields(self) for value in (getattr(self, f.name),)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSettings:
        """Settings from ``to_dict()``'s data (missing fields take their defaults)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, Mapping) or set(data) - set(names):
            raise ConfigError(f"run settings must be a mapping with keys among {names}, got {data!r}")
        return cls(**dict(data))


def describe_scheme(layerwise: LayerwiseConfig) -> tuple[int, int, str]:
    """(weight bits, activation bits, a one-line description) of a run's global config, e.g.
    ``(4, 8, "weights int4 per-channel symmetric, LSQ; activations uint8 per-tensor affine")``;
    layer overrides are counted at the end."""
    config = layerwise.global_config
    weight, activation = config.weight, config.activation

    def spec(name: str, s, on: bool) -> str:
        if not on:
            return f"{name} float"
        learned = "" if s.learnable.value == "fixed" else f", {s.learnable.value.upper()}"
        kind = s.scheme.value.replace("_", " ").replace("per channel", "per-channel").replace("per tensor",
                                                                                             "per-tensor")
        return f"{name} {'int' if s.signed else 'uint'}{s.bits} {kind}{learned}"

    text = (f"{spec('weights', weight, config.mode.weights)}; "
            f"{spec('activations', activation, config.mode.activations)}")
    if layerwise.overrides:
        text += f" (+ {len(layerwise.overrides)} layer override{'s' if len(layerwise.overrides) > 1 else ''})"
    return (weight.bits if config.mode.weights else 32, activation.bits if config.mode.activations else 32, text)


def load_layerwise_config(settings: RunSettings) -> LayerwiseConfig:
    """The run's layer-wise QAT config: read from ``settings.config`` (JSON, or TOML with a
    ``.toml`` suffix; the format of ``LayerwiseConfig.from_dict``), or, without a file, the
    default ``QuantizationConfig`` with ``settings.bits``-bit LSQ weights when bits < 8."""
    path = settings.config
    if path is None:
        config = QuantizationConfig()
        if settings.bits != 8:
            base = QuantizationConfig.lsq_4bit_weights()
            config = base.replace(weight=base.weight.replace(bits=settings.bits))
        return LayerwiseConfig(global_config=config)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    toml = path.suffix.lower() == ".toml"
    if toml and sys.version_info < (3, 11):
        raise ConfigError(f"config file {path}: TOML needs Python 3.11 or newer (tomllib); write the config as JSON")
    try:
        if toml:
            import tomllib  # Python 3.11+, checked above

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from e
    return LayerwiseConfig.from_dict(data)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A run's data: ``name`` ("digits" or "mnist") and float32 images (N, channels, side, side)
    with integer labels, split into train and test."""

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)

    @property
    def image_size(self) -> int:
        """The side of the (square) images: 8 for the digits (32 for the CIFAR-sized models),
        28 for MNIST."""
        return int(self.x_train.shape[-1])

    @property
    def channels(self) -> int:
        """Image channels: 1, or 3 for the digits of the CIFAR-sized models."""
        return int(self.x_train.shape[1])


def load_dataset(settings: RunSettings) -> Dataset:
    """The embedded digits (split by ``settings.seed``) at the shape ``settings.model``
    takes (``model_input``: 8x8x1, or 32x32x3 for the CIFAR-sized models), or the MNIST
    IDX files in ``settings.mnist``."""
    if settings.mnist is None:
        channels, image_size = model_input(settings.model)
        return Dataset("digits", *load_digits(seed=settings.seed, image_size=image_size, channels=channels))
    return Dataset("mnist", *load_mnist_idx(settings.mnist))
