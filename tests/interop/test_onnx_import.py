"""Import of float ONNX models: every supported operator against ONNX Runtime, round trips
through qatcore's own export, the import -> QAT -> int8 -> ONNX pipeline, and clear errors."""

import warnings

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qatcore.data import load_digits  # noqa: E402
from qatcore.errors import InteropError  # noqa: E402
from qatcore.graph import GraphModule  # noqa: E402
from qatcore.interop.onnx import export_onnx, import_onnx  # noqa: E402
from qatcore.interop.onnx_import import supported_ops  # noqa: E402
from qatcore.models import MLP, DigitsCNN, SmallResNet  # noqa: E402
from qatcore.nn import functional as F  # noqa: E402
from qatcore.optim import SGD  # noqa: E402
from qatcore.quantization.qat import QATPreparer  # noqa: E402
from qatcore.training import evaluate_accuracy  # noqa: E402

RNG = np.random.default_rng(0)


def weights(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def save_model(tmp_path, nodes, initializers, input_shape, output_rank, name="m.onnx", opset=17):
    """A one-input float model from onnx helper nodes; dims after the batch are fixed."""
    graph = helper.make_graph(
        nodes, "built", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *input_shape])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, [None] * output_rank)],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def check_against_onnxruntime(path, x, run_onnxruntime, rtol=1e-5, atol=1e-5):
    gm = import_onnx(path)
    assert isinstance(gm, GraphModule) and gm.training
    ours = gm.eval()(x)
    theirs = run_onnxruntime(path, x)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.data, theirs, rtol=rtol, atol=atol)
    return gm


CASES = {
    "conv_bias_stride_pad": ([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1],
                                               strides=[2, 2])],
                             {"w": weights(4, 2, 3, 3), "b": weights(4)}, (2, 8, 8), 4),
    "conv_grouped_dilated": ([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=2, dilations=[2, 2],
                                               auto_pad="VALID")],
                             {"w": weights(4, 1, 3, 3)}, (2, 8, 8), 4),
    "gemm_alpha_beta_transB0": ([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=0.5, beta=2.0)],
                                {"w": weights(6, 3), "c": weights(3)}, (6,), 2),
    "gemm_transB1": ([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1)],
                     {"w": weights(3, 6), "c": weights(1, 3)}, (6,), 2),
    "matmul_add_folds_into_linear": ([helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                                      helper.make_node("Add", ["m", "b"], ["y"], name="add")],
                                     {"w": weights(6, 4), "b": weights(4)}, (6,), 2),
    "arithmetic_with_constants": ([helper.make_node("Mul", ["x", "s"], ["a"], name="mul"),
                                   helper.make_node("Sub", ["a", "t"], ["b"], name="sub"),
                                   helper.make_node("Div", ["b", "d"], ["c"], name="div"),
                                   helper.make_node("Add", ["c", "x"], ["y"], name="add")],
                                  {"s": np.array([2.0], np.float32), "t": weights(5), "d": np.float32(4.0)}, (5,), 2),
    "relu_clip_variants": ([helper.make_node("Relu", ["x"], ["a"], name="relu"),
                            helper.make_node("Clip", ["x", "zero", "six"], ["b"], name="relu6"),
                            helper.make_node("Clip", ["x", "lo"], ["c"], name="clamp"),
                            helper.make_node("Add", ["a", "b"], ["d"], name="add1"),
                            helper.make_node("Add", ["d", "c"], ["y"], name="add2")],
                           {"zero": np.float32(0), "six": np.float32(6), "lo": np.float32(-0.5)}, (7,), 2),
    "leaky_relu_sigmoid_tanh": ([helper.make_node("LeakyRelu", ["x"], ["a"], name="leaky", alpha=0.2),
                                 helper.make_node("Sigmoid", ["x"], ["b"], name="sigmoid"),
                                 helper.make_node("Tanh", ["x"], ["c"], name="tanh"),
                                 helper.make_node("HardSwish", ["x"], ["e"], name="hardswish"),
                                 helper.make_node("HardSigmoid", ["x"], ["g"], name="hardsigmoid", alpha=1 / 6),
                                 helper.make_node("Add", ["a", "b"], ["d"], name="add1"),
                                 helper.make_node("Add", ["d", "c"], ["f"], name="add2"),
                                 helper.make_node("Add", ["f", "e"], ["h"], name="add3"),
                                 helper.make_node("Add", ["h", "g"], ["y"], name="add4")], {}, (7,), 2),
    "batch_norm_4d": ([helper.make_node("BatchNormalization", ["x", "g", "be", "mu", "var"], ["y"], name="bn",
                                        epsilon=1e-3)],
                      {"g": weights(3), "be": weights(3), "mu": weights(3), "var": np.abs(weights(3)) + 0.5},
                      (3, 4, 4), 4),
    "batch_norm_2d": ([helper.make_node("BatchNormalization", ["x", "g", "be", "mu", "var"], ["y"], name="bn")],
                      {"g": weights(5), "be": weights(5), "mu": weights(5), "var": np.abs(weights(5)) + 0.5},
                      (5,), 2),
    "max_pool_padded": ([helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 3],
                                          strides=[2, 2], pads=[1, 1, 1, 1])], {}, (2, 7, 7), 4),
    "average_pool_count_include_pad": ([helper.make_node("AveragePool", ["x"], ["y"], name="pool",
                                                         kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                                         count_include_pad=1)], {}, (2, 6, 6), 4),
    "average_pool_exclude_pad": ([helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=[2, 2],
                                                   strides=[2, 2], pads=[1, 1, 1, 1])], {}, (2, 6, 6), 4),
    "global_average_pool_flatten": ([helper.make_node("GlobalAveragePool", ["x"], ["p"], name="gap"),
                                     helper.make_node("Flatten", ["p"], ["y"], name="flat")], {}, (3, 5, 5), 2),
    "reshape_variants": ([helper.make_node("Reshape", ["x", "s1"], ["a"], name="r1"),
                          helper.make_node("Reshape", ["a", "s2"], ["b"], name="r2"),
                          helper.make_node("Reshape", ["b", "s3"], ["y"], name="r3")],
                         {"s1": np.array([0, -1], np.int64), "s2": np.array([-1, 2, 24], np.int64),
                          "s3": np.array([0, 0, 4, 6], np.int64)}, (3, 4, 4), 4),
    "concat_identity_dropout_constant": ([helper.make_node("Constant", [], ["k"], name="const",
                                                           value=numpy_helper.from_array(weights(1, 2, 1, 1), "k")),
                                          helper.make_node("Mul", ["x", "k"], ["a"], name="scale"),
                                          helper.make_node("Identity", ["a"], ["b"], name="id"),
                                          helper.make_node("Dropout", ["x"], ["c"], name="drop"),
                                          helper.make_node("Concat", ["b", "c"], ["y"], name="cat", axis=1)],
                                         {}, (2, 3, 3), 4),
}


def ints(*values):
    return np.array(values, np.int64)


# issue 20: the transformer operators and the CNN attributes, one model each, within 1e-6 of
# ONNX Runtime; (nodes, initializers, input shape past the batch, output rank[, opset])
ISSUE_20_CASES = {
    "layer_norm_last_axis": ([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", epsilon=1e-3)],
                             {"g": weights(6), "b": weights(6)}, (4, 6), 3),
    "layer_norm_two_axes_no_bias": ([helper.make_node("LayerNormalization", ["x", "g"], ["y"], name="ln", axis=1)],
                                    {"g": weights(4, 6)}, (4, 6), 3),
    "softmax_middle_axis": ([helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis=1)], {}, (4, 5), 3),
    "softmax_opset_11_flattens_from_its_axis": ([helper.make_node("Softmax", ["x"], ["y"], name="softmax")],
                                                {}, (4, 5), 3, 11),
    "gelu_exact_and_tanh_opset_20": ([helper.make_node("Gelu", ["x"], ["a"], name="gelu"),
                                      helper.make_node("Gelu", ["x"], ["b"], name="gelu_tanh", approximate="tanh"),
                                      helper.make_node("Add", ["a", "b"], ["y"], name="add")], {}, (7,), 2, 20),
    "erf_gelu_op_by_op": ([helper.make_node("Div", ["x", "root2"], ["a"], name="div"),
                           helper.make_node("Erf", ["a"], ["b"], name="erf"),
                           helper.make_node("Add", ["b", "one"], ["c"], name="add"),
                           helper.make_node("Mul", ["x", "c"], ["d"], name="mul"),
                           helper.make_node("Mul", ["d", "half"], ["y"], name="half")],
                          {"root2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)}, (7,), 2),
    "gather_constant_indices": ([helper.make_node("Gather", ["x", "i"], ["y"], name="take", axis=1)],
                                {"i": ints([0, 2], [1, 1])}, (3, 4), 4),
    "gather_one_negative_index": ([helper.make_node("Gather", ["x", "i"], ["y"], name="take", axis=2)],
                                  {"i": np.array(-1, np.int64)}, (3, 4), 2),
    "transpose_perm_and_reversed": ([helper.make_node("Transpose", ["x"], ["a"], name="t1", perm=[2, 1, 0]),
                                     helper.make_node("Transpose", ["x"], ["b"], name="t2"),
                                     helper.make_node("Add", ["a", "b"], ["y"], name="add")], {}, (4, 5), 3),
    "matmul_batched_activations": ([helper.make_node("Transpose", ["x"], ["t"], name="t", perm=[0, 2, 1]),
                                    helper.make_node("MatMul", ["x", "t"], ["y"], name="scores")], {}, (3, 4), 3),
    "matmul_3d_times_matrix_and_bias": ([helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
                                         helper.make_node("Add", ["b", "m"], ["y"], name="bias")],
                                        {"w": weights(4, 5), "b": weights(5)}, (3, 4), 3),
    "matmul_stacked_constant": ([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                                {"w": weights(2, 4, 5)}, (2, 3, 4), 4),
    "split_sizes": ([helper.make_node("Split", ["x", "sizes"], ["a", "b"], name="split", axis=1),
                     helper.make_node("Concat", ["b", "a"], ["y"], name="swap", axis=1)],
                    {"sizes": ints(1, 3)}, (4, 5), 3),
    "split_equal_parts_opset_11": ([helper.make_node("Split", ["x"], ["a", "b"], name="split", axis=-1),
                                    helper.make_node("Sub", ["a", "b"], ["y"], name="sub")], {}, (3, 4), 3, 11),
    "split_num_outputs_opset_18": ([helper.make_node("Split", ["x"], ["a", "b", "c"], name="split", axis=1,
                                                    num_outputs=3),
                                   helper.make_node("Concat", ["c", "a", "b"], ["y"], name="rotate", axis=1)],
                                  {}, (5, 2), 3, 18),
    "slice_negative_step_two_axes": ([helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"], name="slice")],
                                     {"s": ints(-1, 0), "e": ints(np.iinfo(np.int64).min, 3), "a": ints(2, 1),
                                      "st": ints(-2, 1)}, (4, 5), 3),
    "unsqueeze_squeeze": ([helper.make_node("Unsqueeze", ["x", "a1"], ["u"], name="unsqueeze"),
                           helper.make_node("Squeeze", ["u", "a2"], ["y"], name="squeeze")],
                          {"a1": ints(0, 3), "a2": ints(0)}, (3, 4), 4),
    "expand": ([helper.make_node("Expand", ["x", "shape"], ["y"], name="expand")], {"shape": ints(1, 1, 4)},
               (3, 1), 3),
    "where_pow_sqrt_reduce_mean": ([helper.make_node("Where", ["c", "x", "low"], ["a"], name="where"),
                                    helper.make_node("Pow", ["x", "two"], ["b"], name="pow"),
                                    helper.make_node("Sqrt", ["b"], ["c2"], name="sqrt"),
                                    helper.make_node("ReduceMean", ["c2"], ["d"], name="mean", axes=[1]),
                                    helper.make_node("Add", ["a", "c2"], ["e"], name="add1"),
                                    helper.make_node("Add", ["e", "d"], ["y"], name="add2")],
                                   {"c": np.array([[True], [False], [True]]), "low": np.float32(-1.0),
                                    "two": np.float32(2.0)}, (3, 4), 3),
    "reduce_mean_opset_18_axes_input": ([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean",
                                                          keepdims=0)], {"axes": ints(-1, 1)}, (3, 4), 1, 18),
    "shape_of_the_batch_becomes_minus_one": ([helper.make_node("Shape", ["x"], ["s"], name="shape"),
                                              helper.make_node("Gather", ["s", "zero"], ["n"], name="batch"),
                                              helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"], name="n1"),
                                              helper.make_node("Concat", ["n1", "rest"], ["t"], name="target",
                                                               axis=0),
                                              helper.make_node("Reshape", ["x", "t"], ["y"], name="reshape")],
                                             {"zero": np.array(0, np.int64), "axis0": ints(0), "rest": ints(12)},
                                             (3, 4), 2),
    "concat_with_a_constant": ([helper.make_node("Concat", ["x", "c"], ["y"], name="cat", axis=0)],
                               {"c": weights(2, 4)}, (4,), 2),
    "reshape_allowzero_1": ([helper.make_node("Slice", ["x", "s", "e", "a"], ["empty"], name="empty"),
                             helper.make_node("Reshape", ["empty", "t1"], ["zero_rows"], name="r1", allowzero=1),
                             helper.make_node("Reshape", ["x", "t2"], ["rows"], name="r2", allowzero=1),
                             helper.make_node("Concat", ["rows", "zero_rows"], ["y"], name="cat", axis=0)],
                            {"s": ints(0), "e": ints(0), "a": ints(2), "t1": ints(0, 5), "t2": ints(-1, 5)},
                            (2, 5), 2),
    "conv_same_upper_odd_size_stride_2": ([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", strides=[2, 2],
                                                            auto_pad="SAME_UPPER")],
                                          {"w": weights(3, 2, 3, 3)}, (2, 7, 7), 4),
    "conv_same_lower_even_size_stride_2": ([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", strides=[2, 2],
                                                             auto_pad="SAME_LOWER")],
                                           {"w": weights(3, 2, 3, 3)}, (2, 8, 8), 4),
    "conv_uneven_explicit_pads": ([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[0, 1, 2, 0])],
                                  {"w": weights(3, 2, 3, 3)}, (2, 5, 6), 4),
    "max_pool_same_upper_odd_size_stride_2": ([helper.make_node("MaxPool", ["x"], ["y"], name="pool",
                                                                kernel_shape=[2, 2], strides=[2, 2],
                                                                auto_pad="SAME_UPPER")], {}, (2, 7, 7), 4),
    "max_pool_ceil_mode": ([helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 3],
                                             strides=[2, 2], ceil_mode=1)], {}, (2, 6, 8), 4),
    "average_pool_same_lower_excludes_pads": ([helper.make_node("AveragePool", ["x"], ["y"], name="pool",
                                                                kernel_shape=[3, 3], strides=[2, 2],
                                                                auto_pad="SAME_LOWER")], {}, (2, 8, 7), 4),
    "average_pool_ceil_mode_includes_pads": ([helper.make_node("AveragePool", ["x"], ["y"], name="pool",
                                                               kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                                               ceil_mode=1, count_include_pad=1)], {}, (2, 6, 6), 4),
    "average_pool_ceil_mode_excludes_pads": ([helper.make_node("AveragePool", ["x"], ["y"], name="pool",
                                                               kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
                                             {}, (2, 5, 7), 4),
}
CASES.update(ISSUE_20_CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_operator_imports_and_matches_onnxruntime(case, tmp_path, run_onnxruntime):
    nodes, initializers, input_shape, output_rank, *opset = CASES[case]
    path = save_model(tmp_path, nodes, initializers, input_shape, output_rank, opset=opset[0] if opset else 17)
    x = np.random.default_rng(1).standard_normal((3, *input_shape)).astype(np.float32)
    tolerance = 1e-6 if case in ISSUE_20_CASES else 1e-5
    gm = check_against_onnxruntime(path, x, run_onnxruntime, rtol=tolerance, atol=tolerance)
    # and back out: the re-exported file computes the same (functional calls, constants, buffers)
    export_onnx(gm, tmp_path / "again.onnx", x[:1])
    np.testing.assert_allclose(run_onnxruntime(tmp_path / "again.onnx", x), run_onnxruntime(path, x),
                               rtol=1e-5, atol=1e-5)


def test_every_supported_operator_has_a_case():
    covered = {node.op_type for nodes, *_ in CASES.values() for node in nodes}
    assert covered == set(supported_ops())


def test_matmul_bias_is_folded_into_a_trainable_linear(tmp_path):
    nodes, initializers, input_shape, output_rank = CASES["matmul_add_folds_into_linear"]
    gm = import_onnx(save_model(tmp_path, nodes, initializers, input_shape, output_rank))
    assert [n.op for n in gm.graph.nodes] == ["input", "call_module", "output"]
    assert sorted(gm.state_dict()) == ["mm.bias", "mm.weight"]
    assert np.array_equal(gm.get_submodule("mm").bias.data, initializers["b"])


def test_a_batched_matmul_and_its_bias_fold_into_one_linear(tmp_path):
    nodes, initializers, input_shape, output_rank = CASES["matmul_3d_times_matrix_and_bias"]
    gm = import_onnx(save_model(tmp_path, nodes, initializers, input_shape, output_rank))
    assert [n.op for n in gm.graph.nodes] == ["input", "call_module", "output"]
    assert np.array_equal(gm.get_submodule("fc").weight.data, initializers["w"].T)
    assert np.array_equal(gm.get_submodule("fc").bias.data, initializers["b"])


@pytest.mark.parametrize("make", [lambda: MLP(hidden=(16, 8)), lambda: DigitsCNN(rng=np.random.default_rng(3)),
                                  lambda: SmallResNet(rng=np.random.default_rng(4))], ids=["mlp", "cnn", "resnet"])
def test_float_export_import_round_trip_keeps_outputs_and_state_dict(make, tmp_path):
    model = make()
    x = np.random.default_rng(2).random((32, 1, 8, 8), dtype=np.float32)
    model.train()
    model(x)  # BatchNorm running statistics that are not the initial ones
    model.eval()
    export_onnx(model, tmp_path / "float.onnx", x[:1])
    gm = import_onnx(tmp_path / "float.onnx").eval()
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert np.array_equal(gm.state_dict()[key], value), key
    np.testing.assert_allclose(gm(x).data, model(x).data, rtol=1e-6, atol=1e-6)


def test_imported_model_trains(tmp_path):
    model = DigitsCNN(rng=np.random.default_rng(5)).eval()
    export_onnx(model, tmp_path / "cnn.onnx", np.zeros((1, 1, 8, 8), np.float32))
    gm = import_onnx(tmp_path / "cnn.onnx")
    x_train, y_train, _, _ = load_digits()
    optimizer = SGD(gm.parameters(), lr=0.05)
    before = gm.get_submodule("conv1").weight.data.copy()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(gm(x_train[:128]), y_train[:128])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.data))
    assert losses[-1] < losses[0]
    assert not np.array_equal(before, gm.get_submodule("conv1").weight.data)


def test_import_qat_convert_export_round_trip(digits_qat, fine_tune, tmp_path, run_onnxruntime, agree):
    """The issue's pipeline: a float ONNX file in, QAT here, an int8 ONNX file out that ONNX
    Runtime runs with qatcore's results, at the conversion issue's accuracy."""
    from qatcore.pipeline import RunSettings, train_float

    result = train_float(RunSettings(model="cnn", epochs=12, lr=0.05, batch_size=64, seed=0))
    float_model, float_accuracy = result.model.eval(), result.accuracy
    export_onnx(float_model, tmp_path / "float.onnx", np.zeros((1, 1, 8, 8), np.float32))
    imported = import_onnx(tmp_path / "float.onnx")
    _, _, x_test, y_test = load_digits()
    assert evaluate_accuracy(imported.eval(), x_test, y_test) == float_accuracy
    preparer, qat = fine_tune(imported.train(), epochs=3)
    assert {type(qat.get_submodule(name)).__name__ for name in ("conv1", "conv2", "fc")} == {
        "QATConvBn2d", "QATLinear"}
    int8_model = QATPreparer().convert_to_quantized(qat)
    int8_accuracy = evaluate_accuracy(int8_model, x_test, y_test)
    assert int8_accuracy >= float_accuracy - 0.005
    export_onnx(int8_model, tmp_path / "int8.onnx", x_test[:1])
    ours, theirs = int8_model(x_test).data, run_onnxruntime(tmp_path / "int8.onnx", x_test)
    step = float(int8_model.get_submodule("fc_dequantize").output_scale.data)
    exact, max_steps, top1 = agree(ours, theirs, step)
    assert exact >= 0.999 and max_steps <= 1.0 + 1e-6 and top1 >= 0.999


@pytest.mark.torch
def test_pytorch_exported_model_imports_with_its_module_names(tmp_path, fine_tune, run_onnxruntime):
    import torch
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU6(),
                                          nn.AvgPool2d(2))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1),
                                      nn.Linear(32, 10))

        def forward(self, x):
            return self.head(self.features(x))

    torch.manual_seed(0)
    net = Net().eval()
    path = tmp_path / "torch.onnx"
    try:
        with warnings.catch_warnings():  # the TorchScript exporter warns that it is the legacy one
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.rand(2, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    except ImportError as e:  # only a missing exporter dependency skips; any other failure fails
        pytest.skip(f"torch.onnx.export needs a package that is not installed: {e}")
    gm = import_onnx(path).eval()
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(gm(x).data, expected, rtol=1e-5, atol=1e-5)
    assert "features.0.weight" in gm.state_dict() and "head.4.weight" in gm.state_dict()
    # and on through QAT, conversion and export, as for qatcore's own models
    preparer, qat = fine_tune(gm.train(), epochs=1)
    int8_model = preparer.convert_to_quantized(qat)
    export_onnx(int8_model, tmp_path / "int8.onnx", x[:1])
    x_test = load_digits()[2]
    theirs = run_onnxruntime(tmp_path / "int8.onnx", x_test)
    assert np.mean(theirs == int8_model(x_test).data) >= 0.999


# ---- errors ------------------------------------------------------------------------------------
def test_unsupported_operator_names_the_operator_and_the_node(tmp_path):
    path = save_model(tmp_path, [helper.make_node("Cos", ["x"], ["y"], name="gate")], {}, (4,), 2)
    with pytest.raises(InteropError, match="operator 'Cos' at node 'gate' is not supported; supported: Add"):
        import_onnx(path)


@pytest.mark.parametrize("node, initializers, message", [
    (helper.make_node("Conv", ["x", "w"], ["y"], name="c", auto_pad="SAME_MIDDLE"), {"w": weights(2, 2, 3, 3)},
     "'Conv' at node 'c': auto_pad='SAME_MIDDLE' is not an ONNX padding mode"),
    (helper.make_node("LayerNormalization", ["x", "g"], ["y"], name="ln", stash_type=0), {"g": weights(6)},
     "'LayerNormalization' at node 'ln': stash_type=0 is not supported"),
    (helper.make_node("MaxPool", ["x"], ["y", "i"], name="p", kernel_shape=[2, 2]), {}, "Indices output"),
    (helper.make_node("Flatten", ["x"], ["y"], name="f", axis=2), {}, "'Flatten' at node 'f': axis=2"),
    (helper.make_node("Conv", ["x", "x"], ["y"], name="c"), {}, "input 1 .* must be a constant"),
    (helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transA=1), {"w": weights(2, 2)}, "transA=1"),
])
def test_settings_the_layers_cannot_express_are_refused(node, initializers, message, tmp_path):
    path = tmp_path / "bad.onnx"
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    with pytest.raises(InteropError, match=message):
        import_onnx(path)


def test_custom_domains_and_quantized_files_are_refused(tmp_path, digits_qat):
    int8_path = tmp_path / "int8.onnx"
    export_onnx(digits_qat[3], int8_path, np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(InteropError, match="operator 'QuantizeLinear' at node .* is not supported"):
        import_onnx(int8_path)
    node = helper.make_node("QLinearAdd", ["x"], ["y"], name="q", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, str(tmp_path / "custom.onnx"))
    with pytest.raises(InteropError, match="com.microsoft.QLinearAdd at node 'q' is not supported"):
        import_onnx(tmp_path / "custom.onnx")


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", b"\x08\x07\x12\x03abc" * 3, bytes(range(256))])
def test_malformed_files_raise_interop_errors(content, tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InteropError, match="import_onnx"):
        import_onnx(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InteropError, match="no such file"):
        import_onnx(tmp_path / "absent.onnx")


def attention_block_file(tmp_path):
    """A file of the transformer operators (issue 20): LayerNormalization, MatMul + Add, Split,
    Transpose, batched MatMul, Softmax, Gather, Unsqueeze, Expand, Erf, Slice, Where, Pow,
    Sqrt, ReduceMean, Concat with a constant, Reshape with a batch-sized entry."""
    nodes = [helper.make_node("LayerNormalization", ["x", "ln.weight", "ln.bias"], ["n"], name="/ln/LN"),
             helper.make_node("MatMul", ["n", "w"], ["m"], name="/qk/MatMul"),
             helper.make_node("Add", ["m", "b"], ["qk"], name="/qk/Add"),
             helper.make_node("Split", ["qk", "halves"], ["q", "k"], name="/split", axis=-1),
             helper.make_node("Transpose", ["k"], ["kt"], name="/kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="/scores"),
             helper.make_node("Where", ["causal", "scores", "minus_inf"], ["masked"], name="/mask"),
             helper.make_node("Softmax", ["masked"], ["p"], name="/softmax", axis=-1),
             helper.make_node("Gather", ["p", "last"], ["row"], name="/row", axis=1),
             helper.make_node("Unsqueeze", ["row", "one"], ["row3"], name="/row3"),
             helper.make_node("Expand", ["row3", "wide"], ["rows"], name="/rows"),
             helper.make_node("Erf", ["rows"], ["e"], name="/erf"),
             helper.make_node("Slice", ["e", "zero", "two", "minus1"], ["s"], name="/slice"),
             helper.make_node("Pow", ["s", "two_f"], ["sq"], name="/pow"),
             helper.make_node("Sqrt", ["sq"], ["abs"], name="/sqrt"),
             helper.make_node("ReduceMean", ["abs"], ["mean"], name="/mean", axes=[1]),
             helper.make_node("Concat", ["mean", "extra"], ["cat"], name="/cat", axis=0),
             helper.make_node("Shape", ["cat"], ["shape"], name="/shape"),
             helper.make_node("Gather", ["shape", "zero_scalar"], ["batch"], name="/batch"),
             helper.make_node("Unsqueeze", ["batch", "zero"], ["batch1"], name="/batch1"),
             helper.make_node("Concat", ["batch1", "columns"], ["target"], name="/target", axis=0),
             helper.make_node("Reshape", ["cat", "target"], ["y"], name="/reshape")]
    initializers = {"ln.weight": 1 + weights(6), "ln.bias": weights(6), "w": weights(6, 8), "b": weights(8),
                    "halves": ints(4, 4), "causal": np.tril(np.ones((4, 4), bool)), "minus_inf": np.float32(-np.inf),
                    "last": np.array(3, np.int64), "one": ints(1), "wide": ints(1, 3, 1), "zero": ints(0),
                    "two": ints(2), "minus1": ints(-1), "two_f": np.float32(2), "extra": weights(2, 1, 2),
                    "zero_scalar": np.array(0, np.int64), "columns": ints(2)}
    return save_model(tmp_path, nodes, initializers, (4, 6), 2, name="attention.onnx")


@pytest.mark.parametrize("source", ["digits_cnn", "attention_block"])
def test_mutated_and_truncated_files_import_or_raise_interop_error(source, tmp_path, run_onnxruntime):
    """Never a crash: every corruption of a valid file either imports or raises InteropError
    (qatcore's DigitsCNN export, and a file of the transformer operators)."""
    if source == "digits_cnn":
        model = DigitsCNN(rng=np.random.default_rng(6)).eval()
        export_onnx(model, tmp_path / "good.onnx", np.zeros((1, 1, 8, 8), np.float32))
        good = tmp_path / "good.onnx"
    else:
        good = attention_block_file(tmp_path)
        x = np.random.default_rng(8).standard_normal((3, 4, 6)).astype(np.float32)
        check_against_onnxruntime(good, x, run_onnxruntime, rtol=1e-6, atol=1e-6)  # the unmutated file
    data = good.read_bytes()
    rng = np.random.default_rng(7)
    outcomes = {"imported": 0, "refused": 0}
    path = tmp_path / "mutated.onnx"
    for trial in range(150):
        mutated = bytearray(data)
        if trial % 3 == 0:
            mutated = mutated[:int(rng.integers(0, len(data)))]
        else:
            for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                mutated[position] = int(rng.integers(0, 256))
        path.write_bytes(bytes(mutated))
        try:
            gm = import_onnx(path)
        except InteropError:
            outcomes["refused"] += 1
            continue
        outcomes["imported"] += 1
        assert isinstance(gm, GraphModule)
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 150


def test_node_names_that_would_shadow_module_attributes_are_renamed(tmp_path):
    names = ["forward", "graph", "training", "eval.x", "", "1st", "class", "_modules", "_non_persistent"]
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"t{i}"], [f"t{i + 1}"], name=name)
             for i, name in enumerate(names)]
    path = save_model(tmp_path, nodes, {}, (3,), 2)
    gm = import_onnx(path)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["forward_1", "graph_1", "training_1", "eval_x", "relu", "relu_1st", "relu_class", "modules_1",
                       "non_persistent"]
    assert np.array_equal(gm(np.array([[-1, 2, 3]], np.float32)).data, [[0, 2, 3]])


def two_input_model(tmp_path, nodes, initializers, outputs, name="m.onnx"):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * rank) for o, rank in outputs],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def test_a_bias_add_is_folded_only_when_nothing_else_reads_the_matmul(tmp_path, run_onnxruntime):
    w, b = weights(4, 3), weights(3)
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    # the MatMul's result is also a graph output: the Add must stay an Add
    path = two_input_model(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                                      helper.make_node("Add", ["m", "b"], ["y"], name="add")],
                           {"w": w, "b": b}, [("m", 2), ("y", 2)])
    m, y = import_onnx(path).eval()(x)
    np.testing.assert_allclose(m.data, x @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y.data, x @ w + b, rtol=1e-5, atol=1e-6)
    # a (1, 1, 3) constant broadcasts the result to rank 3: not a bias either
    path = two_input_model(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                                      helper.make_node("Add", ["m", "b"], ["y"], name="add")],
                           {"w": w, "b": b.reshape(1, 1, 3)}, [("y", 3)], name="m3.onnx")
    assert import_onnx(path).eval()(x).shape == run_onnxruntime(path, x).shape == (1, 5, 3)


def test_dead_nodes_are_skipped_and_identity_passes_constants(tmp_path, run_onnxruntime):
    w = weights(3, 4)
    nodes = [helper.make_node("Identity", ["w"], ["w_shared"], name="share"),
             helper.make_node("Gemm", ["x", "w_shared"], ["y"], name="fc", transB=1),
             helper.make_node("Sigmoid", ["x"], ["unused"], name="dead")]  # unsupported, but nothing reads it
    path = two_input_model(tmp_path, nodes, {"w": w}, [("y", 2)])
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(import_onnx(path).eval()(x).data, run_onnxruntime(path, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target, layer", [([0, 0, -1], "Flatten"), ([0, -1, 4], None), ([-1, 16], None)])
def test_reshape_zero_entries_copy_the_input_dimension(target, layer, tmp_path, run_onnxruntime):
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="r")]
    path = save_model(tmp_path, nodes, {"s": np.array(target, np.int64)}, (2, 4, 2), len(target))
    x = np.random.default_rng(5).standard_normal((3, 2, 4, 2)).astype(np.float32)
    gm = check_against_onnxruntime(path, x, run_onnxruntime)
    assert any(type(m).__name__ == layer for m in gm.modules()) == (layer is not None)
    x7 = np.random.default_rng(6).standard_normal((7, 2, 4, 2)).astype(np.float32)
    if target[0] == 0:  # the batch axis is copied, whatever the batch
        np.testing.assert_allclose(gm(x7).data, run_onnxruntime(path, x7), rtol=1e-6)


def test_input_names_stay_distinct(tmp_path):
    nodes = [helper.make_node("Add", ["a.b", "a_b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 3])
                                           for n in ("a.b", "a_b")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    gm = import_onnx(tmp_path / "m.onnx")
    names = [n.target for n in gm.graph.nodes if n.op == "input"]
    assert len(set(names)) == 2
    ones = np.ones((1, 3), np.float32)
    export_onnx(gm, tmp_path / "again.onnx", (ones, ones))  # and it exports back
    assert np.array_equal(gm(ones, 2 * ones).data, 3 * ones)


@pytest.mark.parametrize("node, initializers, message", [
    (helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c"), {"w": weights(3, 2, 3, 3), "b": weights(5)},
     "B has 5 values for 3 output channels"),
    (helper.make_node("Conv", ["x", "w"], ["y"], name="c", strides=[0, 1]), {"w": weights(3, 2, 3, 3)},
     "strides .* must be two positive values"),
    (helper.make_node("MaxPool", ["x"], ["y"], name="p", kernel_shape=[2, 2], pads=[2, 2, 2, 2]), {},
     "does not run on zeros of shape \\(1, 2, 6, 6\\)"),
    (helper.make_node("Reshape", ["x", "s"], ["y"], name="r"), {"s": np.array([0, 0], np.int64)},
     "does not run on zeros"),
    (helper.make_node("MatMul", ["x", "v"], ["y"], name="m"), {"v": weights(6)}, "only a matrix"),
])
def test_files_whose_parts_do_not_fit_are_refused_at_import(node, initializers, message, tmp_path):
    path = tmp_path / "bad.onnx"
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(InteropError, match=message):
        import_onnx(path)


def test_one_element_constants_keep_their_shape(tmp_path, run_onnxruntime):
    path = two_input_model(tmp_path, [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0)], {},
                           [("s", 0)])
    with pytest.raises(InteropError, match="'ReduceSum'"):
        import_onnx(path)
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"], name="mul")]
    path = two_input_model(tmp_path, nodes, {"k": np.array([2.0], np.float32)}, [("y", 2)], name="k.onnx")
    x = np.ones((2, 4), np.float32)
    assert import_onnx(path)(x).shape == run_onnxruntime(path, x).shape == (2, 4)
