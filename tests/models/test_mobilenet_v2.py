"""MobileNetV2 for 32x32 inputs: the stage table, parameter counts, determinism, QAT round trip."""

import math

import numpy as np
import pytest

from qatcore.errors import ConfigError
from qatcore.graph import trace
from qatcore.models import MOBILENET_V2_CIFAR_STAGES, InvertedResidual, MobileNetV2
from qatcore.nn import Conv2d
from qatcore.quantization.qat import QATPreparer, parity_report


def _parameter_count(model) -> int:
    return sum(p.data.size for p in model.parameters())


def _expected_parameters(num_classes: int = 10, in_channels: int = 3) -> int:
    """Width 1.0 counted by hand from the table: convs without bias, BatchNorm weight + bias."""
    total = 9 * in_channels * 32 + 2 * 32  # stem
    channels = 32
    for expansion, out_channels, blocks, _ in MOBILENET_V2_CIFAR_STAGES:
        for _ in range(blocks):
            hidden = channels * expansion
            if expansion != 1:
                total += channels * hidden + 2 * hidden
            total += 9 * hidden + 2 * hidden + hidden * out_channels + 2 * out_channels
            channels = out_channels
    total += channels * 1280 + 2 * 1280  # head
    return total + 1280 * num_classes + num_classes


def test_the_stage_table_is_the_papers_with_cifar_strides():
    assert MOBILENET_V2_CIFAR_STAGES == ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def test_a_32x32_input_ends_at_4x4_through_the_documented_stages():
    model = MobileNetV2()
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    h = model.stem(x)
    assert h.shape == (2, 32, 32, 32) and model.stem[0].stride == (1, 1)
    shapes = []
    for block in model.blocks:
        h = block(h)
        shapes.append(h.shape[1:])
    stage_ends = np.cumsum([n for _, _, n, _ in MOBILENET_V2_CIFAR_STAGES]) - 1
    assert [shapes[i] for i in stage_ends] == [(16, 32, 32), (24, 32, 32), (32, 16, 16), (64, 8, 8),
                                               (96, 8, 8), (160, 4, 4), (320, 4, 4)]
    assert model.head(h).shape == (2, 1280, 4, 4)
    assert model(x).shape == (2, 10)


def test_blocks_expand_depthwise_project_and_add_where_shapes_match():
    model = MobileNetV2()
    blocks = list(model.blocks)
    assert len(blocks) == 17 and all(isinstance(b, InvertedResidual) for b in blocks)
    assert blocks[0].expand is None  # expansion 1
    for block in blocks:
        depthwise = block.depthwise[0]
        assert depthwise.groups == depthwise.in_channels == depthwise.out_channels
        assert depthwise.kernel_size == (3, 3) and len(block.project) == 2  # linear: conv + bn, no activation
    # a residual add in every block after the first of a stage, except 96 <- 64 and 320 <- 160
    assert [b.use_residual for b in blocks].count(True) == 10


def test_parameter_counts():
    assert _parameter_count(MobileNetV2()) == 2_236_682 == _expected_parameters()
    assert _parameter_count(MobileNetV2(num_classes=7, in_channels=1)) == _expected_parameters(7, 1)
    assert _parameter_count(MobileNetV2(width_mult=0.5)) == 700_490
    assert _parameter_count(MobileNetV2(width_mult=0.25)) == 250_922


@pytest.mark.parametrize("width_mult", [0.25, 0.35, 0.5, 0.75, 1.3])
def test_width_mult_rounds_channels_to_multiples_of_8(width_mult):
    model = MobileNetV2(width_mult=width_mult)
    convs = [m for _, m in model.named_modules() if isinstance(m, Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert model.stem[0].out_channels >= 0.9 * 32 * width_mult
    assert model.head[0].out_channels == (1280 if width_mult <= 1 else 1664)
    assert model(np.zeros((1, 3, 32, 32), dtype=np.float32)).shape == (1, 10)


@pytest.mark.parametrize("width_mult", [0, -1.0, math.nan, math.inf, True, "1.0"])
def test_width_mult_must_be_a_positive_finite_number(width_mult):
    with pytest.raises(ConfigError, match="MobileNetV2: width_mult must be a positive finite number, got"):
        MobileNetV2(width_mult=width_mult)


def test_construction_is_deterministic():
    first, second = MobileNetV2(width_mult=0.25), MobileNetV2(width_mult=0.25, rng=np.random.default_rng(0))
    for key, value in first.state_dict().items():
        np.testing.assert_array_equal(value, second.state_dict()[key])
    other = MobileNetV2(width_mult=0.25, rng=np.random.default_rng(1))
    assert not np.array_equal(first.stem[0].weight.data, other.stem[0].weight.data)


def test_mobilenet_v2_traces_prepares_fuses_trains_and_converts(qat_round_trip):
    model = MobileNetV2()
    ops = [n.op for n in trace(model).graph.nodes]
    # 52 convs, 52 BatchNorms, 35 ReLU6, pool, flatten, fc; 10 residual adds
    assert ops.count("call_module") == 142 and ops.count("call_function") == 10
    run = qat_round_trip(model)
    records = QATPreparer.controller(run.qat_model).layers
    convs = [r for r in records if r.float_type == "Conv2d"]
    # every conv is folded with its BatchNorm; ReLU6 is not fused (it gets its own quantizer)
    assert len(convs) == 52 and all(r.qat_type == "QATConvBn2d" and len(r.fused) == 1 for r in convs)
    assert run.preparer.describe(run.qat_model).endswith("preparation: graph mode")

    assert np.isfinite(run.losses).all()
    assert not np.array_equal(run.weights_before["fc.weight"], run.qat_model.get_submodule("fc").weight.data)
    kinds = [type(run.int8_model.get_submodule(n.target)).__name__ for n in run.int8_model.graph.nodes
             if n.op == "call_module"]
    assert kinds.count("Int8Conv2d") == 52 and kinds.count("Int8Add") == 10 and kinds.count("Int8Linear") == 1
    assert kinds.count("Quantize") == 1 and kinds.count("Dequantize") == 1
    assert run.int8_model(run.inputs).shape == (2, 10)
    report = parity_report(run.qat_model, run.int8_model, run.inputs)
    assert report.output.elements == 20  # exactness is checked where conversion is tested
