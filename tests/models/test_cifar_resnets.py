"""The CIFAR ResNets: shapes at every depth, parameter counts, determinism, QAT round trip."""

import numpy as np
import pytest

from qatcore.errors import ConfigError
from qatcore.graph import trace
from qatcore.models import CIFAR_RESNET_DEPTHS, BasicBlock, CifarResNet, cifar_resnet, resnet20
from qatcore.nn import Conv2d, Linear
from qatcore.quantization.qat import QATPreparer, parity_report


def _parameter_count(model) -> int:
    return sum(p.data.size for p in model.parameters())


def _expected_parameters(n: int, num_classes: int = 10, in_channels: int = 3) -> int:
    """Counted by hand: 3x3 convs without bias, BatchNorm weight + bias, option-B shortcuts."""
    def conv3(c_in, c_out):
        return 9 * c_in * c_out + 2 * c_out  # conv + its BatchNorm

    stem = conv3(in_channels, 16)
    stage1 = n * (2 * conv3(16, 16))
    stage2 = conv3(16, 32) + conv3(32, 32) + (16 * 32 + 2 * 32) + (n - 1) * 2 * conv3(32, 32)
    stage3 = conv3(32, 64) + conv3(64, 64) + (32 * 64 + 2 * 64) + (n - 1) * 2 * conv3(64, 64)
    return stem + stage1 + stage2 + stage3 + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth", CIFAR_RESNET_DEPTHS)
def test_every_depth_has_its_layers_shapes_and_parameters(depth):
    n = (depth - 2) // 6
    model = cifar_resnet(depth)
    blocks = [m for _, m in model.named_modules() if isinstance(m, BasicBlock)]
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [n, n, n]
    # 6n + 2 weighted layers: the stem, two convs per block and the head (shortcuts not counted)
    convs = [name for name, m in model.named_modules() if isinstance(m, Conv2d) and "shortcut" not in name]
    linears = [m for _, m in model.named_modules() if isinstance(m, Linear)]
    assert len(convs) + len(linears) == depth and len(blocks) == 3 * n
    assert [b.shortcut is not None for b in blocks].count(True) == 2  # the two width changes (option B)
    assert _parameter_count(model) == _expected_parameters(n)

    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    h = model.relu(model.bn1(model.conv1(x)))
    shapes = []
    for stage in (model.layer1, model.layer2, model.layer3):
        h = stage(h)
        shapes.append(h.shape)
    assert shapes == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    assert model(x).shape == (2, 10)


def test_resnet20_is_cifar_resnet_20_with_272474_parameters():
    assert _parameter_count(resnet20()) == 272_474 == _expected_parameters(3)
    a, b = resnet20(), cifar_resnet(20)
    assert type(a) is CifarResNet and a.state_dict().keys() == b.state_dict().keys()
    assert all(np.array_equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_classes_and_input_channels():
    model = resnet20(num_classes=7, in_channels=1)
    assert model(np.zeros((3, 1, 32, 32), dtype=np.float32)).shape == (3, 7)
    assert _parameter_count(model) == _expected_parameters(3, num_classes=7, in_channels=1)
    # global average pooling: any side divisible by 4 works (the digits at 8x8 too)
    assert model(np.zeros((1, 1, 8, 8), dtype=np.float32)).shape == (1, 7)


@pytest.mark.parametrize("depth", [8, 18, 26, 110, 20.0, True, "20"])
def test_other_depths_are_refused_naming_the_accepted_ones(depth):
    with pytest.raises(ConfigError, match=r"depth must be one of \[20, 32, 44, 56\].*got"):
        cifar_resnet(depth)


@pytest.mark.parametrize("blocks", [0, -1, 1.5])
def test_blocks_per_stage_must_be_positive(blocks):
    with pytest.raises(ConfigError, match="blocks_per_stage must be a positive integer"):
        CifarResNet(blocks)


def test_construction_is_deterministic_and_draws_from_one_generator():
    first, second = resnet20(), resnet20(rng=np.random.default_rng(0))
    other = resnet20(rng=np.random.default_rng(1))
    for key, value in first.state_dict().items():
        np.testing.assert_array_equal(value, second.state_dict()[key])
    assert not np.array_equal(first.conv1.weight.data, other.conv1.weight.data)
    # each layer draws in turn: no two convolutions of equal shape start equal
    weights = [m.weight.data for _, m in first.named_modules() if isinstance(m, Conv2d)]
    for i, w in enumerate(weights):
        assert not any(w.shape == v.shape and np.array_equal(w, v) for v in weights[:i])


def test_resnet20_traces_prepares_fuses_trains_and_converts(qat_round_trip):
    model = resnet20()
    ops = [n.op for n in trace(model).graph.nodes]
    # 21 convs, 21 BatchNorms, 19 ReLUs, pool, flatten, fc; 9 residual adds
    assert ops.count("call_module") == 64 and ops.count("call_function") == 9
    run = qat_round_trip(model)
    records = {r.name: r for r in QATPreparer.controller(run.qat_model).layers}
    conv_bn_relu = [name for name, r in records.items() if len(r.fused) == 2]
    conv_bn = [name for name, r in records.items() if len(r.fused) == 1]
    assert sorted(conv_bn_relu) == sorted(["conv1"] + [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)])
    assert sorted(conv_bn) == sorted([f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)]
                                     + ["layer2.0.shortcut.0", "layer3.0.shortcut.0"])
    assert {r.qat_type for name, r in records.items() if name != "fc"} == {"QATConvBn2d"}
    assert run.preparer.describe(run.qat_model).endswith("preparation: graph mode")

    assert np.isfinite(run.losses).all()
    assert not np.array_equal(run.weights_before["fc.weight"], run.qat_model.get_submodule("fc").weight.data)
    kinds = [type(run.int8_model.get_submodule(n.target)).__name__ for n in run.int8_model.graph.nodes
             if n.op == "call_module"]
    assert kinds.count("Int8Conv2d") == 21 and kinds.count("Int8Add") == 9 and kinds.count("Int8Linear") == 1
    assert kinds.count("Quantize") == 1 and kinds.count("Dequantize") == 1
    assert run.int8_model(run.inputs).shape == (2, 10)
    report = parity_report(run.qat_model, run.int8_model, run.inputs)
    assert report.output.elements == 20  # exactness is checked where conversion is tested

