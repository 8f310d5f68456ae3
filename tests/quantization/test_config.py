"""QuantSpec / QuantizationConfig: immutable, validated, presets, dict round trips."""

import dataclasses

import pytest

from qatcore.errors import ConfigError
from qatcore.quantization import QScheme, QuantizationConfig, QuantMode, QuantSpec


def test_default_config_matches_numerics():
    c = QuantizationConfig()
    w, a = c.weight, c.activation
    assert (w.qmin, w.qmax, w.scheme, w.axis) == (-127, 127, QScheme.PER_CHANNEL_SYMMETRIC, 0)
    assert (a.qmin, a.qmax, a.scheme, a.axis) == (0, 255, QScheme.PER_TENSOR_AFFINE, None)
    assert a.observer == "moving_average_minmax" and a.observer_options["averaging_constant"] == 0.01
    assert c.mode is QuantMode.WEIGHTS_AND_ACTIVATIONS


def test_presets():
    lsq = QuantizationConfig.lsq_4bit_weights()
    assert (lsq.weight.bits, lsq.weight.learnable, lsq.weight.qmin) == (4, "lsq", -7)
    assert QuantizationConfig.weights_only().mode is QuantMode.WEIGHTS_ONLY
    assert not QuantMode.WEIGHTS_ONLY.activations and QuantMode.ACTIVATIONS_ONLY.activations


def test_immutable():
    c = QuantizationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mode = QuantMode.WEIGHTS_ONLY
    with pytest.raises(TypeError):
        c.activation.observer_options["averaging_constant"] = 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=1), r"QuantSpec.bits must be an int in \[2, 16\], got 1"),
    (dict(scheme="per_row"), r"QuantSpec.scheme must be one of"),
    (dict(scheme=QScheme.PER_TENSOR_AFFINE, axis=1), "axis must be None"),
    (dict(scheme=QScheme.PER_CHANNEL_AFFINE, axis=-1), "non-negative"),
    (dict(observer="kmeans"), r"QuantSpec.observer must be one of \['minmax'"),
    (dict(observer="minmax", observer_options={"bins": 10}), "not accepted by observer 'minmax'"),
    (dict(observer_options={"averaging_constant": 2.0}), r"averaging_constant'\] must be in \(0, 1\]"),
    (dict(observer="histogram", observer_options={"percentile": 10}), "percentile"),
    (dict(learnable="sgd"), "learnable must be one of"),
    (dict(signed=True, scheme=QScheme.PER_TENSOR_SYMMETRIC, learnable="lsq+"), "affine"),
    (dict(scheme=QScheme.PER_TENSOR_AFFINE, learnable="lsq"), "learnable 'lsq' .* zero point held at 0"),
    (dict(grad_factor=-1.0), "grad_factor"),
    (dict(signed=False, narrow_range=True), "narrow_range"),
    (dict(ignore_nan=1), "ignore_nan"),
])
def test_validation_names_field_and_accepted_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantSpec(**kwargs)


def test_config_validation():
    with pytest.raises(ConfigError, match="mode must be one of"):
        QuantizationConfig(mode="everything")
    with pytest.raises(ConfigError, match="weight must be a QuantSpec"):
        QuantizationConfig(weight=8)
    with pytest.raises(ConfigError, match="activation is per channel along axis 0, the batch axis"):
        QuantizationConfig(activation=QuantSpec(scheme=QScheme.PER_CHANNEL_AFFINE, axis=0))
    with pytest.raises(ConfigError, match="QuantizationConfig.weight: unknown fields"):
        QuantizationConfig(weight={"bitz": 4})
    with pytest.raises(ConfigError, match="no fields"):
        QuantizationConfig().replace(weights=None)


@pytest.mark.parametrize("config", [QuantizationConfig(), QuantizationConfig.lsq_4bit_weights(),
                                    QuantizationConfig.weights_only()])
def test_dict_round_trip_and_hash(config):
    again = QuantizationConfig.from_dict(config.to_dict())
    assert again == config and hash(again) == hash(config)


def test_replace_revalidates():
    spec = QuantSpec()
    assert spec.replace(bits=4).qmax == 15
    with pytest.raises(ConfigError):
        spec.replace(bits=40)
