"""Export to ONNX: int8 (QDQ and operator form), QAT (QDQ pairs) and float models, checked
against ONNX Runtime on the CPU."""

import collections

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import onnx  # noqa: E402

from qatcore import nn  # noqa: E402
from qatcore.data import load_digits  # noqa: E402
from qatcore.errors import InteropError, SerializationError  # noqa: E402
from qatcore.interop.onnx import export_onnx  # noqa: E402
from qatcore.interop.onnx_export import weight_scales  # noqa: E402
from qatcore.models import DigitsCNN, SmallResNet  # noqa: E402
from qatcore.nn import functional as F  # noqa: E402
from qatcore.quantization import FakeQuantize, QuantizationConfig, QuantSpec  # noqa: E402
from qatcore.quantization.qat import LayerOverride, LayerwiseConfig, QATPreparer  # noqa: E402
from qatcore.quantization.qat.qat_layers import QAT_LAYER_TYPES  # noqa: E402
from qatcore.tensor import Tensor  # noqa: E402


def op_counts(path) -> collections.Counter:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return collections.Counter(node.op_type for node in model.graph.node)


def output_step(int8_model) -> float:
    *_, last = (n for n in int8_model.graph.nodes if n.op == "call_module")
    return float(int8_model.get_submodule(last.target).output_scale.data)


@pytest.fixture(scope="module")
def resnet_int8(fine_tune):
    _, qat = fine_tune(SmallResNet(), epochs=1)
    return qat.eval(), QATPreparer().convert_to_quantized(qat)


@pytest.mark.parametrize("form", ["qdq", "qoperator"])
def test_digits_int8_model_agrees_with_onnxruntime(digits_qat, form, tmp_path, run_onnxruntime, agree):
    float_accuracy, _, _, int8_model = digits_qat
    _, _, x_test, y_test = load_digits()
    path = tmp_path / f"digits_{form}.onnx"
    export_onnx(int8_model, path, x_test[:1], format=form)
    ours, theirs = int8_model(x_test).data, run_onnxruntime(path, x_test)
    exact, max_steps, top1 = agree(ours, theirs, output_step(int8_model))
    assert exact >= 0.999 and max_steps <= 1.0 + 1e-6 and top1 >= 0.999, (exact, max_steps, top1)
    ort_accuracy = float(np.mean(theirs.argmax(axis=1) == y_test))
    assert ort_accuracy >= float_accuracy - 0.005
    ops = op_counts(path)
    if form == "qdq":
        assert ops["Conv"] == 2 and ops["Gemm"] == 1 and "QLinearConv" not in ops
        assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= 4
    else:
        assert ops["QLinearConv"] == 3 and "Conv" not in ops  # the linear layer (with bias) as a 1x1 QLinearConv


def test_qdq_weights_are_int8_per_channel_on_axis_0_with_int32_bias(digits_qat, tmp_path):
    _, _, _, int8_model = digits_qat
    path = tmp_path / "digits.onnx"
    export_onnx(int8_model, path, np.zeros((1, 1, 8, 8), np.float32))
    model = onnx.load(str(path))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    conv1 = int8_model.get_submodule("conv1")
    assert np.array_equal(initializers["conv1.weight_quantized"], conv1.weight_q.data)
    assert initializers["conv1.weight_quantized"].dtype == np.int8
    assert initializers["conv1.bias_quantized"].dtype == np.int32
    assert initializers["conv1.weight_scale"].shape == (16,)
    assert initializers["conv1.scale"].shape == ()  # per-tensor activation scales are scalars
    weight_dq = next(n for n in model.graph.node if n.name == "conv1.weight/DequantizeLinear")
    assert {a.name: a.i for a in weight_dq.attribute}["axis"] == 0


def test_weight_scales_recovered_from_the_multiplier_are_the_trained_ones(digits_qat):
    _, _, qat, int8_model = digits_qat
    for name in ("conv1", "conv2", "fc"):
        trained = qat.get_submodule(name).weight_fake_quant.calculate_qparams().scale.astype(np.float32)
        input_scale = float(int8_model.value_sources[next(
            n.args[0].name for n in int8_model.graph.nodes if n.op == "call_module" and n.target == name)].scale)
        recovered = weight_scales(int8_model.get_submodule(name), input_scale)
        assert np.array_equal(recovered, np.broadcast_to(trained, recovered.shape)), name


@pytest.mark.parametrize("form", ["qdq", "qoperator"])
def test_resnet_int8_model_agrees_with_onnxruntime(resnet_int8, form, tmp_path, run_onnxruntime, agree):
    _, int8_model = resnet_int8
    x = np.random.default_rng(7).random((256, 1, 8, 8), dtype=np.float32)
    path = tmp_path / "resnet.onnx"
    export_onnx(int8_model, path, x[:2], format=form)
    exact, max_steps, top1 = agree(int8_model(x).data, run_onnxruntime(path, x), output_step(int8_model))
    assert exact >= 0.999 and max_steps <= 1.0 + 1e-6 and top1 >= 0.999, (exact, max_steps, top1)
    ops = op_counts(path)
    assert ops["Add"] == 2 and ops["GlobalAveragePool"] == 1


def count_fake_quant_nodes(qat) -> int:
    """Enabled fake-quant operations the QAT model runs in eval: activation quantizers plus
    each enabled QAT layer's weight and output quantizers."""
    count = 0
    for module in qat.modules():
        if isinstance(module, QAT_LAYER_TYPES) and module.enabled:
            count += len(module.quantizers())
    activation = [n for n in qat.graph.nodes if n.op == "call_module"
                  and isinstance(qat.get_submodule(n.target), FakeQuantize)]
    return count + len(activation)


@pytest.mark.parametrize("which", ["digits", "resnet"])
def test_qat_model_exports_a_qdq_pair_at_every_fake_quant_node(which, digits_qat, resnet_int8, tmp_path,
                                                                run_onnxruntime, agree):
    qat, int8_model = (digits_qat[2], digits_qat[3]) if which == "digits" else resnet_int8
    x = load_digits()[2] if which == "digits" else np.random.default_rng(3).random((256, 1, 8, 8), np.float32)
    path = tmp_path / "qat.onnx"
    export_onnx(qat.eval(), path, x[:1])
    ops = op_counts(path)
    fake_quant_nodes = count_fake_quant_nodes(qat)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == fake_quant_nodes
    model = onnx.load(str(path))
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    # ONNX Runtime on the QDQ model computes what the QAT model computes in eval, up to a value
    # now and then one step apart: ORT runs the QDQ graph's convolutions in float32, whose sums
    # land on the other side of a rounding tie for a few values in a thousand, how many depending
    # on the trained weights (at most 1 step, measured in float32 as a difference over the step,
    # and the same top-1)
    exact, max_steps, top1 = agree(qat(x).data, run_onnxruntime(path, x), output_step(int8_model))
    assert exact >= 0.995 and max_steps <= 1.0 + 1e-5 and top1 >= 0.999, (exact, max_steps, top1)


def test_float_model_exports_the_float_graph(tmp_path, run_onnxruntime):
    model = DigitsCNN(rng=np.random.default_rng(2)).eval()
    x = np.random.default_rng(4).random((16, 1, 8, 8), dtype=np.float32)
    path = tmp_path / "float.onnx"
    export_onnx(model, path, x[:1])
    ops = op_counts(path)
    assert ops == collections.Counter({"Conv": 2, "BatchNormalization": 2, "Relu": 2, "MaxPool": 2, "Flatten": 1,
                                       "Gemm": 1})
    np.testing.assert_allclose(run_onnxruntime(path, x), model(x).data, rtol=1e-4, atol=1e-5)


def test_4bit_models_export_their_narrow_integer_ranges(fine_tune, tmp_path, run_onnxruntime, agree):
    base = QuantizationConfig.lsq_4bit_weights()
    config = QuantizationConfig(weight=base.weight, activation=QuantSpec(bits=4))  # 4-bit weights and activations
    _, qat = fine_tune(DigitsCNN(), config, epochs=1)
    int8_model = QATPreparer().convert_to_quantized(qat)
    x = load_digits()[2]
    for form in ("qdq", "qoperator"):
        path = tmp_path / f"int4_{form}.onnx"
        export_onnx(int8_model, path, x[:1], format=form)
        assert op_counts(path)["Clip"] >= 1  # 4-bit values in an 8-bit container are clipped on the integers
        exact, max_steps, top1 = agree(int8_model(x).data, run_onnxruntime(path, x), output_step(int8_model))
        assert exact >= 0.999 and max_steps <= 1.0 + 1e-6 and top1 >= 0.999, (form, exact, max_steps, top1)
    path = tmp_path / "qat4.onnx"
    export_onnx(qat.eval(), path, x[:1])
    exact, max_steps, _ = agree(qat(x).data, run_onnxruntime(path, x), output_step(int8_model))
    assert exact >= 0.999 and max_steps <= 1.0 + 1e-6


class CatModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(0)  # seeded: the agreement measured is that of one fixed model
        self.a = nn.Conv2d(1, 4, 3, padding=1, rng=rng)
        self.b = nn.Conv2d(1, 4, 3, padding=1, rng=rng)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 8, 10, rng=rng)

    def forward(self, x):
        y = F.cat([self.relu(self.a(x)), self.b(x)], dim=1)
        return self.fc(F.flatten(self.pool(y), 1))


def test_concatenation_average_pool_and_float_layers_export(fine_tune, tmp_path, run_onnxruntime, agree):
    x = load_digits()[2]
    config = LayerwiseConfig(overrides={"fc": LayerOverride(enabled=False)})
    for layerwise in (None, config):
        _, qat = fine_tune(CatModel(), layerwise, epochs=1)
        int8_model = QATPreparer().convert_to_quantized(qat)
        path = tmp_path / "cat.onnx"
        export_onnx(int8_model, path, x[:1])
        ops = op_counts(path)
        assert ops["Concat"] == 1 and ops["AveragePool"] == 1
        ours, theirs = int8_model(x).data, run_onnxruntime(path, x)
        if layerwise is None:
            exact, max_steps, top1 = agree(ours, theirs, output_step(int8_model))
            assert exact >= 0.999 and max_steps <= 1.0 + 1e-6 and top1 >= 0.999, (exact, max_steps, top1)
        else:  # the float fc runs in float32 in both
            assert ops["Gemm"] == 1 and ops["DequantizeLinear"] >= 3
            np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


class NoBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 32, bias=False, rng=rng)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 10, bias=False, rng=rng)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def test_linear_layers_without_bias_become_qlinearmatmul(fine_tune, tmp_path, run_onnxruntime, agree):
    _, qat = fine_tune(NoBias(), epochs=1)
    int8_model = QATPreparer().convert_to_quantized(qat)
    x = load_digits()[2]
    path = tmp_path / "nobias.onnx"
    export_onnx(int8_model, path, x[:1], format="qoperator")
    ops = op_counts(path)
    assert ops["QLinearMatMul"] == 2 and "QLinearConv" not in ops
    exact, max_steps, top1 = agree(int8_model(x).data, run_onnxruntime(path, x), output_step(int8_model))
    assert exact >= 0.999 and max_steps <= 1.0 + 1e-6 and top1 >= 0.999, (exact, max_steps, top1)


def test_qat_export_of_a_disabled_layer_is_the_float_layer(fine_tune, tmp_path, run_onnxruntime, agree):
    preparer, qat = fine_tune(DigitsCNN(), epochs=1)
    preparer.disable(qat, "conv2")  # at runtime: conv2 (with its BatchNorm) computes in float again
    qat.eval()
    x = load_digits()[2]
    path = tmp_path / "disabled.onnx"
    export_onnx(qat, path, x[:1])
    ops = op_counts(path)
    assert ops["BatchNormalization"] == 1 and ops["QuantizeLinear"] == count_fake_quant_nodes(qat)
    np.testing.assert_allclose(run_onnxruntime(path, x), qat(x).data, rtol=1e-4, atol=1e-4)


def test_export_keeps_training_flags_and_outputs(digits_qat, tmp_path):
    _, _, qat, _ = digits_qat
    modes = {name: m.training for name, m in qat.named_modules()}
    state = {k: v.copy() for k, v in qat.state_dict().items()}
    export_onnx(qat, tmp_path / "a.onnx", np.zeros((1, 1, 8, 8), np.float32))
    assert {name: m.training for name, m in qat.named_modules()} == modes
    after = qat.state_dict()
    assert all(np.array_equal(state[k], after[k]) for k in state)  # no observer saw the example


def test_bad_requests_raise_interop_errors(digits_qat, tmp_path):
    _, _, qat, int8_model = digits_qat
    x = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(InteropError, match="format must be one of"):
        export_onnx(int8_model, tmp_path / "m.onnx", x, format="qlinear")
    with pytest.raises(InteropError, match="qoperator.*this is a qat model"):
        export_onnx(qat, tmp_path / "m.onnx", x, format="qoperator")
    with pytest.raises(InteropError, match="takes 1 inputs.*got 2"):
        export_onnx(int8_model, tmp_path / "m.onnx", (x, x))
    with pytest.raises(InteropError, match="float array"):
        export_onnx(int8_model, tmp_path / "m.onnx", np.zeros((1, 1, 8, 8), np.int32))
    with pytest.raises(SerializationError, match="does not exist"):
        export_onnx(int8_model, tmp_path / "missing" / "m.onnx", x)
    assert not list(tmp_path.iterdir())  # nothing written by any failed export


class Variance(nn.Module):
    def forward(self, x):
        return F.var(x, dim=1)


def test_an_operation_without_an_onnx_counterpart_is_named(tmp_path):
    with pytest.raises(InteropError, match="node 'var'.*function var"):
        export_onnx(Variance(), tmp_path / "v.onnx", np.zeros((2, 3), np.float32))
    assert not (tmp_path / "v.onnx").exists()


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if float(x.data.sum()) > 0:  # value-dependent: untraceable, eager-mode QAT
            return self.fc(x)
        return self.fc(-x)


def test_eager_mode_qat_and_int8_models_are_refused(tmp_path):
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(Branchy())
    x = np.ones((1, 4), np.float32)
    with pytest.raises(InteropError, match="QAT model was prepared in eager mode"):
        export_onnx(qat, tmp_path / "e.onnx", x)
    qat(Tensor(x))  # observe
    with pytest.raises(InteropError, match="int8 model was converted from a QAT model prepared in eager mode"):
        export_onnx(preparer.convert_to_quantized(qat), tmp_path / "e.onnx", x)
    assert not (tmp_path / "e.onnx").exists()


def test_missing_onnx_extra_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(InteropError, match=r'pip install "qatcore\[onnx\]"'):
        export_onnx(DigitsCNN(), tmp_path / "m.onnx", np.zeros((1, 1, 8, 8), np.float32))


def test_qat_export_follows_a_disabled_weight_quantizer(fine_tune, tmp_path, run_onnxruntime, agree):
    _, qat = fine_tune(DigitsCNN(), epochs=1)
    qat.get_submodule("conv2").weight_fake_quant.disable_fake_quant()  # conv2 computes with float weights
    qat.eval()
    x = load_digits()[2]
    export_onnx(qat, tmp_path / "q.onnx", x[:1])
    ops = {n.name for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "conv2.weight/QuantizeLinear" not in ops and "conv1.weight/QuantizeLinear" in ops
    step = float(qat.get_submodule("fc").output_fake_quant.calculate_qparams().scale[0])
    # ONNX Runtime's WeightBiasQuantization optimizer would quantize the float weight it finds
    # between DequantizeLinear and QuantizeLinear itself (docs/interop.md); without it, the file's
    # float conv is what runs
    theirs = run_onnxruntime(tmp_path / "q.onnx", x, disabled_optimizers=["WeightBiasQuantization"])
    exact, max_steps, _ = agree(qat(x).data, theirs, step)
    assert exact >= 0.999 and max_steps <= 1.0 + 1e-6, (exact, max_steps)


def test_a_model_in_training_mode_exports_its_eval_computation(fine_tune, tmp_path):
    _, qat = fine_tune(SmallResNet(), epochs=1)
    x = np.zeros((1, 1, 8, 8), np.float32)
    qat.train()
    export_onnx(qat, tmp_path / "train.onnx", x)
    assert qat.training
    qat.eval()
    export_onnx(qat, tmp_path / "eval.onnx", x)
    assert (tmp_path / "train.onnx").read_bytes() == (tmp_path / "eval.onnx").read_bytes()


def test_16_bit_activations_export_and_load_in_onnxruntime(fine_tune, tmp_path, run_onnxruntime):
    for bits in (12, 16):
        config = QuantizationConfig(activation=QuantSpec(bits=bits))
        _, qat = fine_tune(DigitsCNN(), config, epochs=1)
        qat.eval()
        x = load_digits()[2]
        path = tmp_path / f"a{bits}.onnx"
        export_onnx(qat, path, x[:1])
        step = float(qat.get_submodule("fc").output_fake_quant.calculate_qparams().scale[0])
        steps = np.abs(run_onnxruntime(path, x) - qat(x).data) / step
        # float32 arithmetic in ONNX Runtime against the QAT eval path's exact float64 sums: with
        # steps of 2^-12 to 2^-16 of the range some values land one step apart (measured 99.9% and
        # 97.2% exact); never more than one step
        assert np.mean(steps < 1e-3) >= 0.95 and steps.max() <= 1.01, (bits, np.mean(steps < 1e-3), steps.max())


class Literals(nn.Module):
    def __init__(self, with_constant_output: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, rng=np.random.default_rng(0))
        self.with_constant_output = with_constant_output

    def forward(self, x):
        y = self.fc(x * 2 + 1)
        return (y, 1.0) if self.with_constant_output else y


def test_integer_literals_export_as_float_constants(tmp_path, run_onnxruntime):
    model = Literals()
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    export_onnx(model, tmp_path / "lit.onnx", x[:1])
    np.testing.assert_allclose(run_onnxruntime(tmp_path / "lit.onnx", x), model(x).data, rtol=1e-5, atol=1e-6)
    with pytest.raises(InteropError, match="returns a constant"):
        export_onnx(Literals(with_constant_output=True), tmp_path / "c.onnx", x[:1])


def test_back_to_back_requantizations_survive_onnxruntime_optimizations(tmp_path, run_onnxruntime):
    """Q -> DQ -> Q -> DQ chains (a Requantize between two quantized values) are what ONNX
    Runtime's DoubleQDQPairsRemover merges into one quantization to a recomputed grid; the
    exporter keeps an exact no-op between them, so the default session computes the file."""
    from qatcore.graph import Graph, GraphModule
    from qatcore.quantization.int8_layers import Dequantize, Quantize, Requantize

    root = nn.Module()
    root.add_module("q", Quantize(0.02, 128, 0, 255))
    root.add_module("r1", Requantize(0.02, 128, 0.031, 100, 0, 0, 255))  # a grid change, no ReLU
    root.add_module("r2", Requantize(0.031, 100, 0.013, 140, 140, 0, 255))  # with a ReLU (clamp at z)
    root.add_module("dq", Dequantize(0.013, 140))
    graph = Graph()
    value = graph.input("x")
    for name in ("q", "r1", "r2", "dq"):
        value = graph.call_module(name, (value,))
    graph.output(value)
    int8_model = GraphModule(root, graph)
    x = np.random.default_rng(0).uniform(-2.5, 2.5, (64, 100)).astype(np.float32)
    export_onnx(int8_model, tmp_path / "r.onnx", x[:1])
    assert np.array_equal(run_onnxruntime(tmp_path / "r.onnx", x), int8_model(x).data)


class Relu6Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(2)
        self.conv = nn.Conv2d(1, 8, 3, padding=1, rng=rng)
        self.act = nn.ReLU6()
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 10, rng=rng)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.act(self.conv(x)))))


def test_relu6_models_convert_to_integers_and_export(fine_tune, tmp_path, run_onnxruntime, agree):
    _, qat = fine_tune(Relu6Net(), epochs=1)
    int8_model = QATPreparer().convert_to_quantized(qat)
    kinds = [type(int8_model.get_submodule(n.target)).__name__ for n in int8_model.graph.nodes
             if n.op == "call_module"]
    assert "ReLU6" not in kinds and kinds.count("Dequantize") == 1  # the ReLU6 is a Requantize's clamp
    x = load_digits()[2]
    export_onnx(int8_model, tmp_path / "relu6.onnx", x[:1])
    exact, max_steps, top1 = agree(int8_model(x).data, run_onnxruntime(tmp_path / "relu6.onnx", x),
                                   output_step(int8_model))
    assert exact >= 0.999 and max_steps <= 1.0 + 1e-6 and top1 >= 0.999, (exact, max_steps, top1)
