"""RunSettings: checked when built, errors naming the option, plain data both ways; the
models by name, the layer-wise config file and the data set."""

from pathlib import Path

import numpy as np
import pytest

from qatcore.data import load_digits
from qatcore.errors import ConfigError
from qatcore.models import MLP, CifarResNet, DigitsCNN, MobileNetV2, SmallResNet
from qatcore.pipeline import (
    MODELS,
    FloatTraining,
    RunSettings,
    load_dataset,
    load_layerwise_config,
    make_model,
    model_input,
)


@pytest.mark.parametrize("changes, message", [
    ({"model": "vgg"}, "--model must be one of ['mlp', 'cnn', 'resnet', 'resnet20', 'mobilenetv2'], got 'vgg'"),
    ({"bits": 12}, "--bits must be in [2, 8] (int8 runtime), got 12"),
    ({"bits": 1}, "--bits must be in [2, 8]"),
    ({"epochs": 0}, "--epochs must be a positive integer, got 0"),
    ({"qat_epochs": 2.5}, "--qat-epochs must be a non-negative integer (0: post-training quantization only), got 2.5"),
    ({"batch_size": True}, "--batch-size must be a positive integer"),
    ({"seed": -1}, "--seed must be a non-negative integer, got -1"),
    ({"lr": 0}, "--lr must be a positive number, got 0"),
    ({"lr": float("inf")}, "--lr must be a positive number"),
    ({"output": None}, "--output must be a path, got None"),
    ({"config": 3}, "--config must be a path, got 3"),
])
def test_bad_settings_name_the_option(changes, message):
    with pytest.raises(ConfigError) as error:
        RunSettings(**changes)
    assert message in str(error.value)


def test_paths_and_numbers_are_normalised():
    settings = RunSettings(output="runs/a", config="c.json", mnist="mnist", lr=1)
    assert settings.output == Path("runs/a") and settings.config == Path("c.json")
    assert settings.mnist == Path("mnist") and settings.lr == 1.0 and isinstance(settings.lr, float)
    assert RunSettings(lr=0.05).qat_lr == 0.05 * 0.2


def test_plain_data_round_trip_in_option_order():
    settings = RunSettings(model="mlp", config=Path("c.toml"), bits=8, epochs=2, output=Path("r"), mnist=None)
    data = settings.to_dict()
    assert list(data) == ["model", "config", "bits", "epochs", "qat_epochs", "lr", "batch_size", "seed",
                          "output", "mnist"]
    assert data["config"] == "c.toml" and data["output"] == "r" and data["mnist"] is None
    assert RunSettings.from_dict(data) == settings
    assert RunSettings.from_dict({"model": "mlp"}) == RunSettings(model="mlp")
    with pytest.raises(ConfigError, match="keys among"):
        RunSettings.from_dict({"modle": "mlp"})


def test_models_by_name():
    assert list(MODELS) == ["mlp", "cnn", "resnet", "resnet20", "mobilenetv2"]
    rng = np.random.default_rng(0)
    assert isinstance(make_model("mlp", rng, 28), MLP) and make_model("mlp", rng, 28).layers[1].in_features == 784
    assert isinstance(make_model("cnn", rng), DigitsCNN) and isinstance(make_model("resnet", rng), SmallResNet)
    resnet20 = make_model("resnet20", rng, 32, 3)
    assert isinstance(resnet20, CifarResNet) and resnet20.conv1.in_channels == 3
    assert isinstance(make_model("mobilenetv2", rng, 32, 3), MobileNetV2)
    # every model takes any channel count: MNIST is one channel for all of them
    for name in MODELS:
        assert make_model(name, rng, 28, 1)(np.zeros((2, 1, 28, 28), dtype=np.float32)).shape == (2, 10), name
    with pytest.raises(ConfigError, match="model must be one of"):
        make_model("vgg", rng)


def test_default_config_and_bits():
    assert load_layerwise_config(RunSettings()).global_config.weight.bits == 8
    four = load_layerwise_config(RunSettings(bits=4)).global_config.weight
    assert four.bits == 4 and four.learnable == "lsq"


@pytest.mark.parametrize("name, content, message", [
    ("missing.json", None, "does not exist"),
    ("bad.json", "{not json", "is not valid JSON"),
    ("bad.toml", "[[overrides", "is not valid TOML"),
])
def test_bad_config_files(tmp_path, name, content, message):
    if name.endswith(".toml"):
        pytest.importorskip("tomllib", reason="TOML configs need Python 3.11+")
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_layerwise_config(RunSettings(config=path))


def test_config_file_is_read(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"overrides": [{"match": "layers.5", "enabled": false}]}')
    config = load_layerwise_config(RunSettings(config=path))
    assert config.to_dict()["overrides"][0]["match"] == "layers.5"
    assert config.global_config.weight.bits == 8
    with pytest.raises(ConfigError, match="applies to the default config"):  # bits shape only the default config
        RunSettings(config=path, bits=4)


def test_dataset():
    dataset = load_dataset(RunSettings(seed=0))
    assert dataset.name == "digits" and dataset.image_size == 8
    assert len(dataset.x_train) == 1438 and len(dataset.x_test) == 359


def test_each_model_trains_on_the_digits_at_its_own_shape():
    assert [model_input(name) for name in MODELS] == [(1, 8), (1, 8), (1, 8), (3, 32), (3, 32)]
    assert all(model_input(name, mnist=True) == (1, 28) for name in MODELS)
    with pytest.raises(ConfigError, match="model must be one of"):
        model_input("vgg")
    default = load_dataset(RunSettings(seed=0))
    dataset = load_dataset(RunSettings(model="resnet20", seed=0))
    assert dataset.name == "digits" and (dataset.channels, dataset.image_size) == (3, 32)
    assert (default.channels, default.image_size) == (1, 8)
    expected = load_digits(seed=0, image_size=32, channels=3)
    for got, want in zip((dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test), expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dataset.y_test, default.y_test)  # the same split


def test_float_training_builds_the_cifar_models_for_their_digits():
    dataset = load_dataset(RunSettings(model="mobilenetv2"))
    for name in ("resnet20", "mobilenetv2"):
        training = FloatTraining.start(RunSettings(model=name), dataset)
        assert training.model(dataset.x_test[:2]).shape == (2, 10)
