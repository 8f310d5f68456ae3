"""Conversion to an integer-only int8 model: structure, parity with the QAT model, accuracy."""

import numpy as np
import pytest

import qatcore
from qatcore import nn
from qatcore.data import load_digits
from qatcore.errors import ConfigError, ObserverError
from qatcore.models import DigitsCNN, SmallResNet
from qatcore.nn import functional as F
from qatcore.quantization import QuantizationConfig, QuantSpec
from qatcore.quantization.int8_layers import Dequantize, Int8Module
from qatcore.quantization.qat import LayerOverride, LayerwiseConfig, QATPreparer
from qatcore.quantization.qat.parity import parity_report
from qatcore.training import evaluate_accuracy


def test_every_node_between_quantize_and_dequantize_is_integer(digits_qat):
    _, _, _, int8_model = digits_qat
    kinds = []
    for node in int8_model.graph.nodes:
        if node.op == "call_module":
            module = int8_model.get_submodule(node.target)
            assert isinstance(module, Int8Module), node.name
            kinds.append(type(module).__name__)
        else:
            assert node.op in ("input", "output"), f"{node.name} is a {node.op}"
    assert kinds[0] == "Quantize" and kinds[-1] == "Dequantize" and kinds.count("Quantize") == 1
    assert kinds.count("Int8Conv2d") == 2 and kinds.count("Int8Linear") == 1
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    seen = []
    int8_model.run((x,), {}, lambda node, value: seen.append((node.name, value)))
    for name, value in seen[2:-1]:  # after Quantize, before Dequantize: integers only
        assert isinstance(value, np.ndarray) and value.dtype.kind in "iu", name


def test_digits_parity_and_accuracy(digits_qat):
    float_accuracy, _, qat, int8_model = digits_qat
    _, _, x_test, y_test = load_digits()
    report = parity_report(qat, int8_model, x_test)
    assert report.output.exact >= 0.999, str(report)
    assert report.output.max_lsb <= 1, str(report)
    assert report.top1_agreement >= 0.999
    assert report.passes
    int8_accuracy = evaluate_accuracy(int8_model, x_test, y_test)
    assert int8_accuracy >= float_accuracy - 0.005


def test_resnet_parity_on_random_inputs(fine_tune):
    model = SmallResNet()
    _, qat = fine_tune(model, epochs=1)
    int8_model = QATPreparer().convert_to_quantized(qat)
    x = np.random.default_rng(7).random((256, 1, 8, 8), dtype=np.float32)
    report = parity_report(qat, int8_model, x)
    assert report.output.exact >= 0.999 and report.output.max_lsb <= 1, str(report)
    assert report.top1_agreement >= 0.999
    names = [type(int8_model.get_submodule(n.target)).__name__ for n in int8_model.graph.nodes
             if n.op == "call_module"]
    assert names.count("Int8Add") == 2 and "Int8AvgPool2d" in names


class TwoBranch(nn.Module):
    """Two conv branches joined by a concatenation, optionally with a ReLU after it."""

    def __init__(self, relu_after_cat: bool) -> None:
        super().__init__()
        self.relu_after_cat = relu_after_cat
        rng = np.random.default_rng(12)  # seeded: an unseeded model made the parity bound flaky
        self.a = nn.Conv2d(1, 4, 3, padding=1, rng=rng)
        self.b = nn.Conv2d(1, 4, 3, padding=1, rng=rng)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 8 * 8, 10, rng=rng)

    def forward(self, x):
        y = F.cat([self.relu(self.a(x)), self.b(x)], dim=1)
        if self.relu_after_cat:
            y = F.relu(y)
        return self.fc(self.flatten(y))


@pytest.mark.parametrize("relu_after_cat", [False, True])
def test_concatenation_runs_on_integers(relu_after_cat, fine_tune):
    _, qat = fine_tune(TwoBranch(relu_after_cat), epochs=1)
    int8_model = QATPreparer().convert_to_quantized(qat)
    names = [type(int8_model.get_submodule(n.target)).__name__ for n in int8_model.graph.nodes
             if n.op == "call_module"]
    assert "Int8Cat" in names and names.count("Quantize") == 1 and names.count("Dequantize") == 1, names
    x = np.random.default_rng(3).random((256, 1, 8, 8), dtype=np.float32)
    report = parity_report(qat, int8_model, x)
    assert report.output.exact >= 0.999 and report.output.max_lsb <= 1, str(report)
    assert report.top1_agreement >= 0.999


def test_float_layer_stays_float_between_dequantize_and_quantize(fine_tune):
    config = LayerwiseConfig(overrides={"fc": LayerOverride(enabled=False)})
    _, qat = fine_tune(DigitsCNN(), config, epochs=1)
    int8_model = QATPreparer().convert_to_quantized(qat)
    modules = [int8_model.get_submodule(n.target) for n in int8_model.graph.nodes if n.op == "call_module"]
    position = next(i for i, m in enumerate(modules) if isinstance(m, nn.Linear))
    assert isinstance(modules[position - 1], Dequantize)
    x = np.random.default_rng(1).random((8, 1, 8, 8), dtype=np.float32)
    assert int8_model(x).shape == (8, 10)


def test_conversion_before_training_names_the_quantizer():
    qat = QATPreparer().prepare_for_qat(DigitsCNN())
    with pytest.raises(ObserverError, match="nothing was observed"):
        QATPreparer().convert_to_quantized(qat)


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("config, message", [
    (QuantizationConfig(weight=QuantSpec(bits=8, signed=True, scheme="per_channel_affine", axis=0)),
     "'fc' weight quantizer has nonzero zero points"),
    (QuantizationConfig(weight=QuantSpec(bits=8, signed=True, scheme="per_tensor_affine")),
     "'fc' weight quantizer has nonzero zero points"),
    (QuantizationConfig(weight=QuantSpec(bits=8, signed=True, scheme="per_channel_symmetric", axis=1)),
     "per channel along axis 1.*set weight.axis to 0"),
    (QuantizationConfig(weight=QuantSpec(bits=8, signed=False, scheme="per_tensor_affine")),
     "needs signed weights of at most 8 bits"),
    (QuantizationConfig(activation=QuantSpec(bits=12)), "activations of at most 8 bits"),
])
def test_grids_the_int8_kernels_cannot_run_are_refused(config, message):
    # weights shifted off zero, so an affine weight grid gets nonzero zero points
    model = OneLinear()
    model.fc.weight.data += np.float32(0.3)
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model, config)
    qat.train()
    x = np.random.default_rng(0).random((8, 6), dtype=np.float32)
    qat(x)
    assert qat.eval()(x).shape == (8, 3)  # the QAT model itself evaluates on any of these grids
    with pytest.raises(ConfigError, match=message):
        preparer.convert_to_quantized(qat)


@pytest.mark.parametrize("model", [DigitsCNN, SmallResNet])
def test_weights_only_models_convert_to_int8_weights_with_float_activations(fine_tune, model, tmp_path):
    from qatcore.quantization.qat import load_int8_model, save_int8_model
    from qatcore.quantization.qat.operators.weighted import Int8WeightOnly

    _, qat = fine_tune(model(), QuantizationConfig.weights_only(), epochs=1)
    int8_model = QATPreparer().convert_to_quantized(qat.eval())
    layers = [m for m in int8_model.modules() if isinstance(m, Int8WeightOnly)]
    assert len(layers) == sum(1 for m in qat.modules() if type(m).__name__.startswith("QAT") and
                              type(m).__name__ != "QATController")
    assert all(layer.weight_q.data.dtype == np.int8 for layer in layers)
    path = tmp_path / "weights_only.int8"
    save_int8_model(path, int8_model)
    x = load_digits()[2]
    with qatcore.no_grad():
        expected = qat(x).numpy()  # the QAT eval forward: the same float computation on the grid weights
        assert qat.interpreter.fallback_reason is None
        np.testing.assert_array_equal(load_int8_model(path)(x).numpy(), expected)


def test_int8_model_accepts_tensor_and_array(digits_qat):
    _, _, _, int8_model = digits_qat
    x = np.random.default_rng(2).random((2, 1, 8, 8), dtype=np.float32)
    a, b = int8_model(x), int8_model(qatcore.tensor(x))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert a.dtype == np.float32


def test_int8_conv_plans_are_kept_per_shape_and_remade_when_a_buffer_is_replaced(digits_qat):
    """An Int8Conv2d keeps the kernel plan of each input shape; replacing a buffer (as
    load_state_dict does) makes a new one, so the forward follows the new weights."""
    from qatcore.quantization.qat.operators.weighted import Int8Conv2d

    _, _, _, int8_model = digits_qat
    x = np.random.default_rng(4).random((3, 1, 8, 8), dtype=np.float32)
    before = int8_model(x).numpy()
    np.testing.assert_array_equal(int8_model(x).numpy(), before)
    np.testing.assert_array_equal(int8_model(x[:1]).numpy(), before[:1])
    conv = next(m for m in int8_model.modules() if isinstance(m, Int8Conv2d))
    assert {(3, 1, 8, 8), (1, 1, 8, 8)} <= {key[0] for key in conv._kernel_plans}
    state = conv.state_dict()
    conv.load_state_dict({**state, "weight_q": -state["weight_q"].clip(-127, 127)})
    changed = int8_model(x).numpy()
    assert not np.array_equal(changed, before)
    conv.load_state_dict(state)
    np.testing.assert_array_equal(int8_model(x).numpy(), before)


def test_int8_model_saves_loads_and_is_small(digits_qat, tmp_path):
    from qatcore.quantization.qat.int8_serialization import int8_model_from_dict, int8_model_to_dict

    _, _, qat, int8_model = digits_qat
    int8_path, float_path = tmp_path / "model.int8", tmp_path / "model.float"
    qatcore.save(int8_model_to_dict(int8_model), int8_path)
    qatcore.save(DigitsCNN().state_dict(), float_path)
    assert int8_path.stat().st_size <= 0.30 * float_path.stat().st_size
    loaded = int8_model_from_dict(qatcore.load(int8_path))
    _, _, x_test, _ = load_digits()
    np.testing.assert_array_equal(loaded(x_test).numpy(), int8_model(x_test).numpy())
    assert parity_report(qat, loaded, x_test[:64]).passes


def test_int8_file_is_at_most_30_percent_of_float():
    from qatcore.quantization.qat.int8_serialization import int8_model_to_dict

    model = SmallResNet(width=32)  # 77k parameters: the size is the weights', not the metadata's
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model)
    qat(np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32))
    int8_bytes = len(qatcore.dumps(int8_model_to_dict(preparer.convert_to_quantized(qat))))
    assert int8_bytes <= 0.30 * len(qatcore.dumps(model.state_dict()))


def test_int8_model_loading_rejects_bad_records(digits_qat):
    from qatcore.quantization.qat.int8_serialization import int8_model_from_dict, int8_model_to_dict

    record = int8_model_to_dict(digits_qat[3])
    with pytest.raises(ConfigError, match="format"):
        int8_model_from_dict({"format": "something else"})
    with pytest.raises(ConfigError, match="version"):
        int8_model_from_dict(dict(record, version=99))
    nodes = [list(n) for n in record["nodes"]]
    module_node = next(i for i, n in enumerate(nodes) if len(n) == 4)
    nodes[module_node][3] = ["os.system", {}, []]
    with pytest.raises(ConfigError, match="unknown module type 'os.system'"):
        int8_model_from_dict(dict(record, nodes=nodes))
    forward_reference = [list(n) for n in record["nodes"]]
    forward_reference[module_node][2] = [len(forward_reference) + 5]
    with pytest.raises(ConfigError, match="not defined before it"):
        int8_model_from_dict(dict(record, nodes=forward_reference))
    short = [list(n) for n in record["nodes"]]
    short[module_node][3] = [short[module_node][3][0], short[module_node][3][1], []]
    with pytest.raises(ConfigError, match="state values"):
        int8_model_from_dict(dict(record, nodes=short))
    conv_node = next(i for i, n in enumerate(nodes) if len(n) == 4 and n[3][0] == "Int8Conv2d")
    no_config = [list(n) for n in record["nodes"]]
    no_config[conv_node][3] = [no_config[conv_node][3][0], {}, no_config[conv_node][3][2]]
    with pytest.raises(ConfigError, match=r"Int8Conv2d config needs exactly the keys \['dilation'"):
        int8_model_from_dict(dict(record, nodes=no_config))


@pytest.mark.parametrize("kernel, stride, padding, shape", [
    ((2, 2), (2, 2), (0, 0), (3, 4, 8, 8)),     # tiling windows: the strided-view path
    ((3, 3), (3, 3), (0, 0), (2, 2, 9, 6)),
    ((2, 2), (1, 1), (0, 0), (2, 3, 5, 5)),     # overlapping: the float kernel path
    ((3, 3), (2, 2), (1, 1), (2, 3, 7, 7)),     # padded
])
def test_int8_max_pool_paths_equal_numpy(kernel, stride, padding, shape):
    from qatcore.quantization.qat.operators.pooling import Int8MaxPool2d

    q = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    out = Int8MaxPool2d(kernel, stride, padding, (1, 1))(q)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    padded = np.pad(q.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-1)
    oh, ow = (shape[2] + 2 * ph - kh) // sh + 1, (shape[3] + 2 * pw - kw) // sw + 1
    expected = np.full(shape[:2] + (oh, ow), -1, np.int64)
    for i in range(kh):
        for j in range(kw):
            expected = np.maximum(expected, padded[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


class ConvRelu6(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(5)
        self.conv = nn.Conv2d(1, 6, 3, padding=1, rng=rng)
        self.act = nn.ReLU6()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 8 * 8, 10, rng=rng)

    def forward(self, x):
        return self.fc(self.flatten(self.act(self.conv(x))))


def test_relu6_becomes_an_integer_clamp_when_its_grid_ends_below_6(fine_tune):
    _, qat = fine_tune(ConvRelu6(), epochs=1)
    int8_model = QATPreparer().convert_to_quantized(qat)
    kinds = [type(int8_model.get_submodule(n.target)).__name__ for n in int8_model.graph.nodes
             if n.op == "call_module"]
    assert kinds == ["Quantize", "Int8Conv2d", "Requantize", "Int8Flatten", "Int8Linear", "Dequantize"]
    x = np.random.default_rng(2).random((128, 1, 8, 8), dtype=np.float32) * 4
    report = parity_report(qat, int8_model, x)
    assert report.output.exact >= 0.999 and report.output.max_lsb <= 1, str(report)
    # a quantizer whose grid reaches past 6 (fixed qparams up to 8): the ReLU6 is no clamp at
    # qmax there, so it becomes a lookup table of the QAT computation (exact, no float left)
    quantizer = qat.get_submodule("activation_fake_quant.act")
    quantizer.disable_observer()
    quantizer.scale.data[...] = np.float32(8 / 255)
    quantizer.zero_point.data[...] = 0
    int8_model = QATPreparer().convert_to_quantized(qat)
    kinds = [type(m).__name__ for m in int8_model.modules()]
    assert "Int8Lookup" in kinds and "ReLU6" not in kinds
    report = parity_report(qat, int8_model, x)
    assert report.output.exact >= 0.999 and report.output.max_lsb <= 1, str(report)


class SmoothActivations(nn.Module):
    """One of each activation that converts to an integer lookup table."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, rng=rng)
        self.sigmoid, self.tanh, self.leaky = nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU(0.1)
        self.hardswish, self.hardsigmoid = nn.Hardswish(), nn.Hardsigmoid()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4 * 4 * 4, 16, rng=rng)
        self.fc2 = nn.Linear(16, 16, rng=rng)
        self.fc3 = nn.Linear(16, 10, rng=rng)

    def forward(self, x):
        x = self.pool(self.leaky(self.conv(x)))
        x = self.tanh(self.fc1(F.flatten(x, 1)))
        x = self.hardsigmoid(self.hardswish(self.sigmoid(self.fc2(x))))
        return self.fc3(x)


def test_smooth_activations_convert_to_integer_lookup_tables(fine_tune, tmp_path):
    _, qat = fine_tune(SmoothActivations(), epochs=1)
    int8_model = QATPreparer().convert_to_quantized(qat)
    for node in int8_model.graph.nodes:  # the graph walk: nothing float between Quantize and Dequantize
        assert node.op in ("input", "output", "call_module"), node.name
        if node.op == "call_module":
            assert isinstance(int8_model.get_submodule(node.target), Int8Module), node.name
    kinds = [type(m).__name__ for m in int8_model.modules()]
    assert kinds.count("Int8Lookup") == 5
    x = np.random.default_rng(4).random((64, 1, 8, 8), dtype=np.float32)
    report = parity_report(qat, int8_model, x)
    assert report.output.exact == 1.0 and all(layer.exact == 1.0 for layer in report.layers), str(report)
    from qatcore.quantization.qat.checkpointing import load_int8_model, save_int8_model

    save_int8_model(tmp_path / "smooth.int8", int8_model)
    np.testing.assert_array_equal(load_int8_model(tmp_path / "smooth.int8")(x).numpy(), int8_model(x).numpy())


class LinearBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(4)
        self.fc1 = nn.Linear(64, 32, rng=rng)
        self.bn1 = nn.BatchNorm1d(32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 10, rng=rng)
        self.bn2 = nn.BatchNorm1d(10)

    def forward(self, x):
        return self.bn2(self.fc2(self.relu(self.bn1(self.fc1(F.flatten(x, 1))))))


def test_linear_batch_norm_folds_like_conv_batch_norm(fine_tune, tmp_path):
    from qatcore.quantization.qat import QATLinearBn1d, load_int8_model, save_int8_model

    model = LinearBatchNorm()
    preparer, qat = fine_tune(model, epochs=1)
    assert isinstance(qat.get_submodule("fc1"), QATLinearBn1d) and isinstance(qat.get_submodule("fc2"), QATLinearBn1d)
    assert "bn1, relu" in preparer.describe(qat)
    # with its quantizers off the folded layer computes Linear then BatchNorm (training mode, batch statistics)
    layer = qat.get_submodule("fc1")
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    for quantizer in layer.quantizers():
        quantizer.disable_fake_quant()
    reference = F.relu(model.bn1(model.fc1(x))).numpy()
    np.testing.assert_allclose(layer(x).numpy(), reference, rtol=1e-5, atol=1e-5)
    for quantizer in layer.quantizers():
        quantizer.enable_fake_quant()
    qat.eval()
    int8_model = preparer.convert_to_quantized(qat)
    kinds = [type(m).__name__ for m in int8_model.modules()]
    assert kinds.count("Int8Linear") == 2 and "BatchNorm1d" not in kinds
    images = load_digits()[2]
    assert parity_report(qat, int8_model, images).passes
    save_int8_model(tmp_path / "fold.int8", int8_model)
    np.testing.assert_array_equal(load_int8_model(tmp_path / "fold.int8")(images).numpy(), int8_model(images).numpy())


class PoolThenBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(6)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, rng=rng)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 10, rng=rng)

    def forward(self, x):
        return self.fc(F.flatten(self.relu(self.bn(self.pool(self.conv(x)))), 1))


def test_a_standalone_batch_norm_is_an_integer_per_channel_affine_map(fine_tune):
    preparer, qat = fine_tune(PoolThenBatchNorm(), epochs=1)
    bn = qat.get_submodule("bn")
    bn.weight.data[0] = -0.5  # a negative scale: w_q = -127
    int8_model = preparer.convert_to_quantized(qat.eval())
    layers = [m for m in int8_model.modules() if type(m).__name__ == "Int8Conv2d"]
    assert "BatchNorm2d" not in [type(m).__name__ for m in int8_model.modules()]
    depthwise = [m for m in layers if m.groups == 4]
    assert len(depthwise) == 1 and set(np.unique(depthwise[0].weight_q.data)) <= {-127, 127}
    assert int(depthwise[0].clamp_min.data) == int(depthwise[0].output_zero_point.data)  # the ReLU is the clamp
    assert parity_report(qat, int8_model, load_digits()[2]).passes


class _BatchNorm1dModel(nn.Module):
    """Linear -> ReLU -> BatchNorm1d on (N, C) and, after a reshape, on (N, C, L)."""

    def __init__(self, rng):
        super().__init__()
        self.fc1 = nn.Linear(64, 24, rng=rng)
        self.relu = nn.ReLU()
        self.bn_2d_input = nn.BatchNorm1d(24)
        self.bn_3d_input = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(24, 10, rng=rng)

    def forward(self, x):
        h = self.bn_2d_input(self.relu(self.fc1(x.reshape(-1, 64))))
        h = self.bn_3d_input(h.reshape(-1, 6, 4))
        return self.fc2(h.reshape(-1, 24))


@pytest.mark.parametrize("requantization", ["fixed_point", "float32"])
def test_a_standalone_batch_norm_1d_is_an_integer_per_channel_affine_map_at_any_rank(requantization, tmp_path):
    from qatcore.quantization.qat import load_int8_model, save_int8_model

    rng = np.random.default_rng(0)
    model = _BatchNorm1dModel(rng)
    x = load_digits()[0][:256]
    model.train()
    model(x)  # running statistics away from (0, 1)
    model.bn_3d_input.weight.data[1] = -0.5
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model, QuantizationConfig(requantization=requantization))
    qat(x)
    qat.eval()
    int8_model = preparer.convert_to_quantized(qat)
    kinds = [type(m).__name__ for m in int8_model.modules()]
    assert kinds.count("Int8ChannelAffine") == 2 and "BatchNorm1d" not in kinds
    path = tmp_path / "bn1d.int8"
    save_int8_model(path, int8_model)
    report = parity_report(qat, load_int8_model(path), load_digits()[2])
    assert report.passes, str(report)


@pytest.mark.parametrize("requantization", ["fixed_point", "float32"])
@pytest.mark.parametrize("x_dtype, x_zero_point, relu", [(np.uint8, 128, False), (np.int8, -3, True),
                                                         (np.uint8, 0, True)])
def test_requantize_gathers_its_numpy_formula_from_a_table(requantization, x_dtype, x_zero_point, relu):
    """An 8-bit Requantize looks its results up in a table of its NumPy formula
    (``reference_forward``): the same bits for every input value, in any shape."""
    from qatcore.quantization.int8_layers import Requantize

    module = Requantize(0.0371, x_zero_point, 0.0213, 7, 7 if relu else -128, -128, 127, requantization)
    info = np.iinfo(x_dtype)
    every = np.arange(info.min, info.max + 1).astype(x_dtype)
    x = np.random.default_rng(0).integers(info.min, info.max, (2, 3, 5, 7), endpoint=True).astype(x_dtype)
    for values in (every, x):
        got, expected = module(values), module.reference_forward(values)
        assert got.dtype == expected.dtype == np.int8 and got.shape == values.shape
        np.testing.assert_array_equal(got, expected)
    wide = x.astype(np.int16)  # not 8-bit: the formula itself
    np.testing.assert_array_equal(module(wide), module.reference_forward(x))


def test_int8_forward_runs_its_execution_plan_and_follows_graph_changes(digits_qat):
    """A forward runs the ExecutionPlan (the same values as the plain interpretation); an
    observer or keyword inputs go back to GraphModule.run; another graph remakes the steps."""
    from qatcore.quantization.qat.int8_model import ExecutionPlan

    _, preparer, qat, int8_model = digits_qat
    assert isinstance(int8_model.interpreter, ExecutionPlan)
    x = np.random.default_rng(5).random((4, 1, 8, 8), dtype=np.float32)
    planned = int8_model(x).numpy()
    seen = []
    plain = int8_model.run((x,), {}, lambda node, value: seen.append(node.name)).numpy()
    np.testing.assert_array_equal(planned, plain)
    assert len(seen) == len(int8_model.graph.nodes) - 1  # the observer saw every node: the plain run
    plan = ExecutionPlan()
    assert plan(int8_model, (x,), {"x": x}, None) is NotImplemented
    np.testing.assert_array_equal(plan(int8_model, (x,), {}, None).numpy(), planned)
    other = preparer.convert_to_quantized(qat)  # the same network, a graph of other nodes
    np.testing.assert_array_equal(plan(other, (x,), {}, None).numpy(), planned)
    assert plan._nodes[0] is other.graph.nodes[0]
