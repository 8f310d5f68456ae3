"""The two requantization arithmetics: the config field, conversion, integer eval, files, and
float32's exact agreement with ONNX Runtime."""

import numpy as np
import pytest

from qatcore import no_grad
from qatcore.errors import ConfigError
from qatcore.models import SmallResNet
from qatcore.nn import Conv2d
from qatcore.quantization.config import QuantizationConfig, Requantization
from qatcore.quantization.qat import (
    LayerwiseConfig,
    QATPreparer,
    int8_model_from_dict,
    int8_model_to_dict,
    parity_report,
)


def test_the_default_is_fixed_point_and_the_field_round_trips():
    assert QuantizationConfig().requantization is Requantization.FIXED_POINT
    config = QuantizationConfig(requantization="float32")
    assert config.requantization is Requantization.FLOAT32 and config.requantization == "float32"
    assert QuantizationConfig.from_dict(config.to_dict()) == config
    older = {k: v for k, v in QuantizationConfig().to_dict().items() if k != "requantization"}
    assert QuantizationConfig.from_dict(older).requantization is Requantization.FIXED_POINT
    assert QuantizationConfig().replace(requantization="float32") == config


def test_an_unknown_arithmetic_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"QuantizationConfig.requantization must be one of \['fixed_point', "
                                          r"'float32'\], got 'float64'"):
        QuantizationConfig(requantization="float64")


def test_a_layer_override_must_keep_the_models_arithmetic():
    with pytest.raises(ConfigError, match=r"overrides\['conv1'\]: requantization is one setting per model"):
        LayerwiseConfig(QuantizationConfig(), {"conv1": QuantizationConfig(requantization="float32")})
    same = LayerwiseConfig(QuantizationConfig(requantization="float32"),
                           {Conv2d: QuantizationConfig(requantization="float32")})
    assert same.global_config.requantization is Requantization.FLOAT32


def residual_model(requantization: str, seed: int = 2):
    """A small residual CNN (convs, BatchNorm, adds, global average pool, linear), calibrated
    on random images, and its int8 model (seed 2: a model where the two arithmetics differ)."""
    rng = np.random.default_rng(seed)
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(SmallResNet(in_channels=3, width=16, rng=np.random.default_rng(seed)),
                                   QuantizationConfig(requantization=requantization))
    with no_grad():
        qat(rng.normal(size=(64, 3, 16, 16)).astype(np.float32))
    qat.eval()
    return qat, preparer.convert_to_quantized(qat)


@pytest.mark.parametrize("requantization", ["fixed_point", "float32"])
def test_each_arithmetic_is_exact_between_qat_eval_and_the_int8_model(requantization):
    qat, int8_model = residual_model(requantization)
    requantizing = [m for m in int8_model.modules() if getattr(m, "REQUANTIZES", False)]
    assert requantizing and all(m.requantization == requantization for m in requantizing)
    x = np.random.default_rng(1).normal(size=(64, 3, 16, 16)).astype(np.float32)
    report = parity_report(qat, int8_model, x)
    assert report.passes, str(report)
    with no_grad():
        assert np.array_equal(qat(x).data, int8_model(x).data)


def test_the_arithmetics_differ_somewhere():
    """The same calibrated model in the two arithmetics: a few values a million apart by one step."""
    x = np.random.default_rng(1).normal(size=(256, 3, 16, 16)).astype(np.float32)
    outputs = []
    for requantization in ("fixed_point", "float32"):
        _, int8_model = residual_model(requantization)
        values = {}
        with no_grad():
            int8_model.run((x,), {}, lambda node, v, values=values: values.__setitem__(node.name, v)
                           if isinstance(v, np.ndarray) and v.dtype.kind in "iu" else None)
        outputs.append(values)
    differences = [np.abs(outputs[0][k].astype(np.int64) - outputs[1][k]) for k in outputs[0]]
    assert sum(int(np.count_nonzero(d)) for d in differences) > 0
    assert max(int(d.max()) for d in differences) <= 2
    assert sum(int(np.count_nonzero(d)) for d in differences) < 1e-4 * sum(d.size for d in differences)


def test_a_float32_model_saves_and_loads_with_its_arithmetic():
    _, int8_model = residual_model("float32")
    again = int8_model_from_dict(int8_model_to_dict(int8_model))
    assert all(m.requantization == "float32" for m in again.modules() if getattr(m, "REQUANTIZES", False))
    x = np.random.default_rng(2).normal(size=(16, 3, 16, 16)).astype(np.float32)
    with no_grad():
        assert np.array_equal(again(x).data, int8_model(x).data)


def test_a_version_2_file_loads_as_fixed_point():
    """Version 2 had no arithmetic in the configs and no trailing float32 buffers."""
    _, int8_model = residual_model("fixed_point")
    data = int8_model_to_dict(int8_model)
    data["version"] = 2
    for node in data["nodes"]:
        record = node[3] if len(node) > 3 else None
        if isinstance(record, list) and isinstance(record[1], dict) and "requantization" in record[1]:
            del record[1]["requantization"]
            kind = record[0]
            trailing = {"Int8Conv2d": 1, "Int8Linear": 1, "Int8Add": 1, "Requantize": 1}.get(kind, 0)
            if trailing:
                record[2] = record[2][:-trailing]
    again = int8_model_from_dict(data)
    x = np.random.default_rng(3).normal(size=(16, 3, 16, 16)).astype(np.float32)
    with no_grad():
        assert np.array_equal(again(x).data, int8_model(x).data)


def test_a_float32_int8_module_needs_its_float_multiplier():
    from qatcore.quantization.qat.operators.weighted import Int8Linear
    args = (np.ones((2, 3), np.int8), np.zeros(2, np.int32), np.full(2, 2**30, np.int32), np.zeros(2, np.int32),
            0, 0.1, 0, 0, 0, 255)
    with pytest.raises(ConfigError, match="float32 requantization needs its float_multiplier"):
        Int8Linear(*args, None, "float32")
    with pytest.raises(ConfigError, match="requantization must be one of"):
        Int8Linear(*args, None, "double")
