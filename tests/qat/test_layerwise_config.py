"""Layer-wise config: overrides by name, glob and type, precedence, conflicts, errors."""

import numpy as np
import pytest

from qatcore import nn
from qatcore.errors import ConfigError
from qatcore.models import SmallResNet
from qatcore.quantization import QuantizationConfig, QuantMode
from qatcore.quantization.qat import LayerOverride, LayerwiseConfig, QATPreparer

FOUR_BIT = QuantizationConfig.lsq_4bit_weights()
CONV = nn.Conv2d(1, 1, 1, rng=np.random.default_rng(0))
LINEAR = nn.Linear(1, 1, rng=np.random.default_rng(0))


class MyConv(nn.Conv2d):
    """A subclass, to test that the most specific type wins."""


def test_global_when_nothing_matches():
    r = LayerwiseConfig().resolve("conv1", CONV)
    assert r.rule == "global" and r.enabled and r.config == QuantizationConfig()


def test_override_by_name():
    r = LayerwiseConfig(overrides={"layer1.conv1": FOUR_BIT}).resolve("layer1.conv1", CONV)
    assert r.rule == "name 'layer1.conv1'" and r.config == FOUR_BIT


def test_override_by_glob():
    config = LayerwiseConfig(overrides={"layer*.conv?": "weights_only"})
    r = config.resolve("layer2.conv1", CONV)
    assert r.rule == "glob 'layer*.conv?'" and r.config.mode is QuantMode.WEIGHTS_ONLY
    assert config.resolve("layer2.conv10", CONV).rule == "global"


def test_override_by_type():
    r = LayerwiseConfig(overrides={nn.Linear: LayerOverride(enabled=False)}).resolve("fc", LINEAR)
    assert r.rule == "type Linear" and not r.enabled


def test_precedence_name_over_glob_over_type():
    config = LayerwiseConfig(overrides={
        nn.Conv2d: "activations_only",
        "layer1.*": "weights_only",
        "layer1.conv1": FOUR_BIT,
    })
    assert config.resolve("layer1.conv1", CONV).rule == "name 'layer1.conv1'"
    assert config.resolve("layer1.conv2", CONV).rule == "glob 'layer1.*'"
    assert config.resolve("layer2.conv1", CONV).rule == "type Conv2d"
    assert config.resolve("fc", LINEAR).rule == "global"


def test_conflicting_globs_first_listed_wins():
    config = LayerwiseConfig(overrides={"layer*": "weights_only", "*conv1": "activations_only"})
    assert config.resolve("layer1.conv1", CONV).config.mode is QuantMode.WEIGHTS_ONLY
    flipped = LayerwiseConfig(overrides={"*conv1": "activations_only", "layer*": "weights_only"})
    assert flipped.resolve("layer1.conv1", CONV).config.mode is QuantMode.ACTIVATIONS_ONLY


def test_conflicting_types_most_specific_wins():
    config = LayerwiseConfig(overrides={nn.Conv2d: "weights_only", MyConv: "activations_only"})
    mine = MyConv(1, 1, 1, rng=np.random.default_rng(0))
    assert config.resolve("a", mine).rule == "type MyConv"
    assert config.resolve("b", CONV).rule == "type Conv2d"


def test_override_keeps_config_and_changes_mode():
    config = LayerwiseConfig(global_config=FOUR_BIT, overrides={"fc": LayerOverride(mode="weights_only")})
    r = config.resolve("fc", LINEAR)
    assert r.config.weight == FOUR_BIT.weight and r.config.mode is QuantMode.WEIGHTS_ONLY


@pytest.mark.parametrize("overrides, message", [
    ({3: FOUR_BIT}, "expected a module name, a glob pattern or a Module type"),
    ({"fc": 8}, "expected a QuantizationConfig"),
    ({"fc": "all"}, "mode must be one of"),
    ({int: FOUR_BIT}, "expected a module name"),
])
def test_bad_keys_and_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        LayerwiseConfig(overrides=overrides)


def test_unmatched_overrides_list_closest_names():
    config = LayerwiseConfig(overrides={"layer1.cnv1": FOUR_BIT, "block*": FOUR_BIT, nn.Linear: FOUR_BIT})
    with pytest.raises(ConfigError) as info:
        QATPreparer().prepare_for_qat(SmallResNet(), LayerwiseConfig(overrides={"layer1.cnv1": FOUR_BIT}))
    assert "closest: ['layer1.conv1'" in str(info.value)
    layers = [("conv1", CONV), ("layer1.conv1", CONV)]
    with pytest.raises(ConfigError) as info:
        config.check_matches(layers)
    message = str(info.value)
    assert "name 'layer1.cnv1'" in message and "glob 'block*'" in message and "type Linear" in message


def test_prepare_applies_overrides_per_layer():
    config = LayerwiseConfig(overrides={"layer2.*": FOUR_BIT, "fc": LayerOverride(enabled=False)})
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(SmallResNet(), config)
    assert qat.get_submodule("layer2.conv1").weight_fake_quant.spec.bits == 4
    assert qat.get_submodule("layer1.conv1").weight_fake_quant.spec.bits == 8
    assert type(qat.get_submodule("fc")) is nn.Linear
    text = preparer.describe(qat)
    assert "glob 'layer2.*'" in text and "name 'fc'" in text


def test_dict_round_trip():
    config = LayerwiseConfig(global_config=QuantizationConfig(), overrides={
        "fc": LayerOverride(enabled=False), "layer*": FOUR_BIT, nn.Conv2d: "weights_only"})
    again = LayerwiseConfig.from_dict(config.to_dict())
    for name, module in [("fc", LINEAR), ("layer1.conv1", CONV), ("conv1", CONV)]:
        assert again.resolve(name, module) == config.resolve(name, module)
    with pytest.raises(ConfigError, match="is not a qatcore.nn layer"):
        LayerwiseConfig.from_dict({"overrides": [{"type": "Conv9d"}]})
    with pytest.raises(ConfigError, match="exactly one of 'match' or 'type'"):
        LayerwiseConfig.from_dict({"overrides": [{"config": None}]})


def test_dicts_refuse_repeats_non_strings_and_foreign_types():
    with pytest.raises(ConfigError, match=r"overrides\[1\] repeats match 'fc'"):
        LayerwiseConfig.from_dict({"overrides": [{"match": "fc", "enabled": False},
                                                 {"match": "fc", "mode": "weights_only"}]})
    with pytest.raises(ConfigError, match=r"overrides\[0\].match must be a string, got \['fc'\]"):
        LayerwiseConfig.from_dict({"overrides": [{"match": ["fc"]}]})
    with pytest.raises(ConfigError, match=r"overrides\[0\].type must be a string"):
        LayerwiseConfig.from_dict({"overrides": [{"type": ["Linear"]}]})

    class Linear(nn.Linear):  # a user's own class with a qatcore.nn name
        pass

    config = LayerwiseConfig(overrides={Linear: LayerOverride(enabled=False)})
    with pytest.raises(ConfigError, match="only qatcore.nn layer types can"):
        config.to_dict()
