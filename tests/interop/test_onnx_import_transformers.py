"""ONNX import of transformers (issue 20): embedding tables that keep their names and train,
constant folding and batch-sized shapes, refusals of malformed transformer operators (each an
InteropError naming the node), and PyTorch's TinyGPT exported by ``torch.onnx.export``: its
module names, its logits, and QAT preparation and training of the imported model."""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import qatcore.nn.functional as F  # noqa: E402
from qatcore.errors import InteropError  # noqa: E402
from qatcore.graph import GraphModule  # noqa: E402
from qatcore.interop.onnx import import_onnx  # noqa: E402
from qatcore.nn import Embedding, LayerNorm, Linear  # noqa: E402
from qatcore.optim import AdamW  # noqa: E402
from qatcore.quantization.config import QuantizationConfig  # noqa: E402
from qatcore.quantization.qat import QATLinear, QATPreparer  # noqa: E402
from qatcore.tensor import Tensor  # noqa: E402

RNG = np.random.default_rng(20)
INT64_MIN = np.iinfo(np.int64).min


def weights(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def ints(*values):
    return np.array(values, np.int64)


def save(tmp_path, nodes, initializers, inputs, outputs, opset=17, name="m.onnx", check=True):
    """A model with ``inputs`` / ``outputs`` as (name, element type, dims) triples."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model, full_check=True)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def onnxruntime_outputs(path, **feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


# ---- embedding tables ---------------------------------------------------------------------------------
TOKENS = ("ids", TensorProto.INT64, ["batch", 5])


def token_model(tmp_path):
    """ids -> tok.weight[ids] + pos.weight[:5] -> LayerNorm (blocks.0.ln) -> MatMul + bias (an
    exporter's constant-folded, transposed weight) -> logits, and the rows 1 and 3 of pos.weight."""
    nodes = [helper.make_node("Gather", ["tok.weight", "ids"], ["t"], name="/tok/Gather"),
             helper.make_node("Slice", ["pos.weight", "zero", "five", "zero"], ["p"], name="/Slice"),
             helper.make_node("Add", ["t", "p"], ["h"], name="/Add"),
             helper.make_node("LayerNormalization", ["h", "blocks.0.ln.weight", "blocks.0.ln.bias"], ["n"],
                              name="/blocks.0/ln/LayerNormalization", epsilon=1e-5),
             helper.make_node("MatMul", ["n", "onnx::MatMul_7"], ["m"], name="/head/MatMul"),
             helper.make_node("Add", ["head.bias", "m"], ["logits"], name="/head/Add"),
             helper.make_node("Gather", ["pos.weight", "rows"], ["picked"], name="/picked/Gather")]
    initializers = {"tok.weight": weights(11, 6), "pos.weight": weights(8, 6), "zero": ints(0), "five": ints(5),
                    "blocks.0.ln.weight": 1 + weights(6), "blocks.0.ln.bias": weights(6),
                    "onnx::MatMul_7": weights(6, 11), "head.bias": weights(11), "rows": ints(1, 3)}
    outputs = [("logits", TensorProto.FLOAT, ["batch", 5, 11]), ("picked", TensorProto.FLOAT, [2, 6])]
    return save(tmp_path, nodes, initializers, [TOKENS], outputs), initializers


def test_embedding_tables_keep_their_names_and_match_onnxruntime(tmp_path):
    path, initializers = token_model(tmp_path)
    gm = import_onnx(path).eval()
    ids = np.random.default_rng(0).integers(0, 11, (3, 5))
    logits, picked = gm(ids)
    theirs = onnxruntime_outputs(path, ids=ids)
    np.testing.assert_allclose(logits.data, theirs[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(picked.data, theirs[1])
    layers = {name: type(module) for name, module in gm.named_modules() if name}
    assert layers["tok"] is Embedding and layers["pos"] is Embedding
    assert layers["blocks.0.ln"] is LayerNorm and layers["head"] is Linear
    state = gm.state_dict()
    for name in ("tok.weight", "pos.weight", "blocks.0.ln.weight", "blocks.0.ln.bias", "head.bias"):
        np.testing.assert_array_equal(state[name], initializers[name])
    np.testing.assert_array_equal(state["head.weight"], initializers["onnx::MatMul_7"].T)
    # the position table is read twice (a slice and a gather) but held once
    assert sum(1 for m in gm.modules() if isinstance(m, Embedding)) == 2


def test_sliced_and_gathered_tables_train(tmp_path):
    gm = import_onnx(token_model(tmp_path)[0])
    logits, picked = gm(np.random.default_rng(1).integers(0, 11, (2, 5)))
    F.add(F.mean(F.mul(logits, logits)), F.mean(picked)).backward()
    pos, tok = gm.get_submodule("pos").weight, gm.get_submodule("tok").weight
    assert np.all(pos.grad[:5] != 0) and np.all(pos.grad[5:] == 0)  # rows 0..4 sliced, 1 and 3 gathered too
    assert np.any(tok.grad != 0)


def test_token_ids_that_are_floats_are_refused_naming_the_node(tmp_path):
    nodes = [helper.make_node("Gather", ["tok.weight", "x"], ["y"], name="/tok/Gather")]
    path = save(tmp_path, nodes, {"tok.weight": weights(4, 3)}, [("x", TensorProto.FLOAT, ["n", 2])],
                [("y", TensorProto.FLOAT, ["n", 2, 3])], check=False)
    with pytest.raises(InteropError, match="at node '/tok/Gather' .*embedding: input must hold integer indices"):
        import_onnx(path)


# ---- constant folding and batch-sized shapes ------------------------------------------------------
def causal_mask_model(tmp_path, batch):
    """x + where(tril(ones(T, T)) == 0, -inf, 0), the mask computed from x's shape the way
    PyTorch's TorchScript exporter writes it (Trilu and Equal run only on constants)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="/attn/Shape"),
             helper.make_node("Slice", ["s", "minus2", "minus1"], ["t"], name="/attn/Slice"),
             helper.make_node("Concat", ["t", "t"], ["tt"], name="/attn/Concat", axis=0),
             helper.make_node("Expand", ["one", "tt"], ["ones"], name="/attn/Expand"),
             helper.make_node("Trilu", ["ones"], ["lower"], name="/attn/Trilu", upper=0),
             helper.make_node("Equal", ["lower", "zero"], ["dead"], name="/attn/Equal"),
             helper.make_node("Where", ["dead", "minus_inf", "zero_f"], ["mask"], name="/attn/Where"),
             helper.make_node("Add", ["x", "mask"], ["scores"], name="/attn/Add"),
             helper.make_node("Softmax", ["scores"], ["y"], name="/attn/Softmax", axis=-1)]
    initializers = {"minus2": ints(-2), "minus1": ints(-1), "one": np.ones((), np.float32),
                    "zero": np.zeros((), np.float32), "minus_inf": np.float32(-np.inf), "zero_f": np.float32(0)}
    shape = [batch, 2, 4, 4]
    return save(tmp_path, nodes, initializers, [("x", TensorProto.FLOAT, shape)], [("y", TensorProto.FLOAT, shape)])


@pytest.mark.parametrize("batch", ["batch", 3])
def test_a_causal_mask_computed_from_shapes_is_folded_into_one_constant(batch, tmp_path):
    path = causal_mask_model(tmp_path, batch)
    gm = import_onnx(path).eval()
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [F.add, F.softmax]
    x = np.random.default_rng(2).standard_normal((3, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(gm(x).data, onnxruntime_outputs(path, x=x)[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.isneginf(gm.state_dict()["constant"]), np.triu(np.ones((4, 4)), 1) > 0)


def test_random_operators_are_not_frozen_into_a_constant(tmp_path):
    nodes = [helper.make_node("RandomUniformLike", ["c"], ["r"], name="noise"),
             helper.make_node("Add", ["x", "r"], ["y"], name="add")]
    path = save(tmp_path, nodes, {"c": np.zeros(3, np.float32)}, [("x", TensorProto.FLOAT, ["n", 3])],
                [("y", TensorProto.FLOAT, ["n", 3])])
    with pytest.raises(InteropError, match="'RandomUniformLike' at node 'noise': it draws random numbers"):
        import_onnx(path)


def test_a_batch_sized_entry_is_refused_where_no_reshape_can_take_it(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Expand", ["x", "s"], ["y"], name="grow")]
    path = save(tmp_path, nodes, {}, [("x", TensorProto.FLOAT, ["n", 3])], [("y", TensorProto.FLOAT, ["n", 3])])
    with pytest.raises(InteropError, match="'Expand' at node 'grow': input 1 .* depends on a dimension known only "
                                           "at run time"):
        import_onnx(path)
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Range", ["zero", "s", "one"], ["r"], name="range")]
    path = save(tmp_path, nodes, {"zero": ints(0)[0], "one": ints(1)[0]}, [("x", TensorProto.FLOAT, ["n"])],
                [("r", TensorProto.INT64, [None])], name="range.onnx", check=False)
    with pytest.raises(InteropError, match="'Range' at node 'range': input 1 depends on a dimension known only"):
        import_onnx(path)


# ---- malformed transformer operators: each an InteropError naming the node ---------------------------
def one_node(op_type, inputs, initializers, opset=17, input_shape=("n", 3, 4), input_type=TensorProto.FLOAT,
             outputs=("y",), **attributes):
    nodes = [helper.make_node(op_type, inputs, list(outputs), name="suspect", **attributes)]
    return nodes, initializers, opset, input_shape, input_type, outputs


MALFORMED = {
    # attributes out of range or of the wrong kind
    "layer_norm_axis_out_of_range": one_node("LayerNormalization", ["x", "g"], {"g": weights(4)}, axis=5),
    "layer_norm_scale_of_another_shape": one_node("LayerNormalization", ["x", "g"], {"g": weights(5)}),
    "softmax_axis_out_of_range": one_node("Softmax", ["x"], {}, axis=7),
    "gelu_unknown_approximation": one_node("Gelu", ["x"], {}, opset=20, approximate="erf"),
    "gather_axis_out_of_range": one_node("Gather", ["x", "i"], {"i": ints(0)}, axis=9),
    "gather_index_out_of_range": one_node("Gather", ["x", "i"], {"i": ints(4)}, axis=2),
    "transpose_not_a_permutation": one_node("Transpose", ["x"], {}, perm=[0, 0, 1]),
    "transpose_perm_of_another_rank": one_node("Transpose", ["x"], {}, perm=[1, 0]),
    "split_sizes_that_do_not_add_up": one_node("Split", ["x", "s"], {"s": ints(1, 1)}, outputs=("a", "b"), axis=1),
    "split_uneven_without_sizes": one_node("Split", ["x"], {}, outputs=("a", "b"), axis=1),
    "slice_step_zero": one_node("Slice", ["x", "s", "e", "a", "st"], {"s": ints(0), "e": ints(2), "a": ints(1),
                                                                      "st": ints(0)}),
    "slice_starts_and_axes_differ": one_node("Slice", ["x", "s", "e", "a"], {"s": ints(0, 1), "e": ints(2, 2),
                                                                             "a": ints(1)}),
    "slice_same_axis_twice": one_node("Slice", ["x", "s", "e", "a"], {"s": ints(0, 0), "e": ints(2, 2),
                                                                      "a": ints(1, -2)}),
    "unsqueeze_axis_out_of_range": one_node("Unsqueeze", ["x", "a"], {"a": ints(5)}),
    "squeeze_an_axis_longer_than_one": one_node("Squeeze", ["x", "a"], {"a": ints(1)}),
    "expand_to_a_shape_that_does_not_broadcast": one_node("Expand", ["x", "s"], {"s": ints(2, 5)}),
    "reduce_mean_axis_out_of_range": one_node("ReduceMean", ["x"], {}, axes=[3]),
    "concat_axis_out_of_range": one_node("Concat", ["x", "c"], {"c": weights(2, 3, 4)}, axis=9),
    "reshape_allowzero_with_minus_one": one_node("Reshape", ["x", "s"], {"s": ints(0, -1)}, allowzero=1),
    # ranks that do not fit
    "layer_norm_on_a_vector": one_node("LayerNormalization", ["x", "g"], {"g": weights(4, 4)}, input_shape=("n",)),
    "matmul_with_a_vector_constant": one_node("MatMul", ["x", "v"], {"v": weights(4)}),
    "matmul_of_misaligned_stacks": one_node("MatMul", ["x", "w"], {"w": weights(2, 5, 4)}),
    "softmax_opset_11_on_an_unknown_shape": one_node("Softmax", ["x"], {}, opset=11, input_shape=("n", "k", 4)),
    # missing inputs
    "where_without_y": one_node("Where", ["c", "x", ""], {"c": np.ones((3, 4), bool)}),
    "expand_without_a_shape": one_node("Expand", ["x", ""], {}),
    "gather_without_indices": one_node("Gather", ["x", ""], {}),
    "slice_without_ends": one_node("Slice", ["x", "s", ""], {"s": ints(0)}),
    "layer_norm_without_scale": one_node("LayerNormalization", ["x", ""], {}),
    "pow_without_exponent": one_node("Pow", ["x", ""], {}),
    # wrong element types
    "gather_float_indices": one_node("Gather", ["x", "i"], {"i": np.array([0.0], np.float32)}),
    "where_float_condition": one_node("Where", ["c", "x", "x"], {"c": np.ones((3, 4), np.float32)}),
    "expand_float_shape": one_node("Expand", ["x", "s"], {"s": np.ones(2, np.float32)}),
    "reshape_float_shape": one_node("Reshape", ["x", "s"], {"s": np.ones(2, np.float32)}),
    "layer_norm_integer_scale": one_node("LayerNormalization", ["x", "g"], {"g": ints(1, 1, 1, 1)}),
    "pow_vector_exponent": one_node("Pow", ["x", "p"], {"p": weights(4)}),
    "unsqueeze_float_axes": one_node("Unsqueeze", ["x", "a"], {"a": np.zeros(1, np.float32)}),
    "erf_of_integers": one_node("Erf", ["x"], {}, input_type=TensorProto.INT64),
    "softmax_of_integers": one_node("Softmax", ["x"], {}, input_type=TensorProto.INT32),
    # computed where a constant is needed
    "where_computed_condition": one_node("Where", ["x", "x", "x"], {}),
    "pow_computed_exponent": one_node("Pow", ["x", "x"], {}),
    "reshape_computed_shape": one_node("Reshape", ["x", "x"], {}),
}


def save_malformed(tmp_path, case):
    nodes, initializers, opset, input_shape, input_type, outputs = MALFORMED[case]
    return save(tmp_path, nodes, initializers, [("x", input_type, list(input_shape))],
                [(o, TensorProto.FLOAT, [None] * 3) for o in outputs], opset=opset, check=False)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_transformer_operators_raise_interop_errors_naming_the_node(case, tmp_path):
    with pytest.raises(InteropError, match="suspect") as error:
        import_onnx(save_malformed(tmp_path, case))
    assert "import_onnx" in str(error.value)


def test_random_mutations_of_the_new_operators_import_or_name_the_node(tmp_path):
    """The byte-level mutation test of test_onnx_import.py, structured: random attribute values,
    dropped inputs and retyped initializers on every malformed case's node. Never a crash, and
    every refusal names the node."""
    rng = np.random.default_rng(21)
    outcomes = {"imported": 0, "refused": 0}
    for trial in range(240):
        case = sorted(MALFORMED)[trial % len(MALFORMED)]
        model = onnx.load(str(save_malformed(tmp_path, case)))
        node = model.graph.node[0]
        kind = rng.integers(0, 3)
        if kind == 0 and len(node.attribute):  # an attribute gets a random value of its type
            attribute = node.attribute[int(rng.integers(0, len(node.attribute)))]
            if attribute.type == onnx.AttributeProto.INT:
                attribute.i = int(rng.integers(-6, 7))
            elif attribute.type == onnx.AttributeProto.INTS:
                attribute.ints[:] = rng.integers(-6, 7, int(rng.integers(0, 5))).tolist()
            elif attribute.type == onnx.AttributeProto.FLOAT:
                attribute.f = float(rng.standard_normal())
            elif attribute.type == onnx.AttributeProto.STRING:
                attribute.s = bytes(rng.choice([b"none", b"tanh", b"", b"SAME_UPPER"]))
        elif kind == 1 and len(node.input) > 1:  # an input goes missing
            node.input[int(rng.integers(0, len(node.input)))] = ""
        elif len(model.graph.initializer):  # an initializer changes type
            tensor = model.graph.initializer[int(rng.integers(0, len(model.graph.initializer)))]
            value = numpy_helper.to_array(tensor)
            retyped = value.astype(rng.choice([np.float32, np.int64, np.bool_, np.float64]))
            tensor.CopyFrom(numpy_helper.from_array(retyped, tensor.name))
        path = tmp_path / "mutated.onnx"
        onnx.save(model, str(path))
        try:
            gm = import_onnx(path)
        except InteropError as e:
            assert "suspect" in str(e), str(e)
            outcomes["refused"] += 1
            continue
        assert isinstance(gm, GraphModule)
        outcomes["imported"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 240


# ---- PyTorch's TinyGPT ---------------------------------------------------------------------------------
_TORCH_MODEL_FILE = Path(__file__).parents[2] / "benchmarks" / "torch_tiny_gpt.py"
SIZES = dict(vocabulary_size=65, block_size=16, n_layer=2, n_embd=64, n_head=4)


def torch_tiny_gpt():
    """PyTorch's TinyGPT (``benchmarks/torch_tiny_gpt.py``, loaded by path) with its GPT-2 init
    from seed 0, and biases and LayerNorms made non-trivial (they are 0 and 1 at init, which
    PyTorch's exporter stores once and shares by Identity nodes)."""
    import torch

    spec = importlib.util.spec_from_file_location("torch_tiny_gpt", _TORCH_MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TorchTinyGPT(**SIZES, generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    return model


def export_torch(model, path, batch_axis: bool = True, **options):
    import torch

    tokens = torch.zeros(2, SIZES["block_size"], dtype=torch.int64)
    try:
        with warnings.catch_warnings():  # the TorchScript exporter warns that it is the legacy one
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (tokens,), str(path), dynamo=False, opset_version=17, input_names=["idx"],
                              dynamic_axes={"idx": {0: "batch"}} if batch_axis else None, **options)
    except ImportError as e:  # only a missing exporter dependency skips; any other failure fails
        pytest.skip(f"torch.onnx.export needs a package that is not installed: {e}")
    return path


def torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("folding", [True, False], ids=["constant_folding", "no_folding"])
def test_pytorch_tiny_gpt_imports_with_its_module_names_and_logits(folding, tmp_path):
    import torch  # noqa: F401  (needs PyTorch: the marker's rule)
    model = torch_tiny_gpt()
    gm = import_onnx(export_torch(model, tmp_path / "gpt.onnx", do_constant_folding=folding)).eval()
    ids = np.random.default_rng(3).integers(0, 65, (3, SIZES["block_size"]))  # another batch than exported
    np.testing.assert_allclose(gm(ids).data, torch_logits(model, ids), rtol=1e-5, atol=1e-5)
    ours = dict(gm.named_parameters())
    assert sorted(ours) == sorted(name for name, _ in model.named_parameters())
    for name, parameter in model.named_parameters():
        np.testing.assert_array_equal(ours[name].data, parameter.detach().numpy(), err_msg=name)
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ("Linear", "LayerNorm", "Embedding"):
            assert type(gm.get_submodule(name)).__name__ == kind, name


@pytest.mark.torch
def test_pytorch_tiny_gpt_with_a_fixed_batch_imports_too(tmp_path):
    """Without a batch axis the exporter folds pos.weight[:T] into an unnamed constant (a buffer
    here); every other parameter keeps its name."""
    import torch  # noqa: F401  (needs PyTorch: the marker's rule)
    model = torch_tiny_gpt()
    gm = import_onnx(export_torch(model, tmp_path / "gpt.onnx", batch_axis=False)).eval()
    ids = np.random.default_rng(4).integers(0, 65, (2, SIZES["block_size"]))
    np.testing.assert_allclose(gm(ids).data, torch_logits(model, ids), rtol=1e-5, atol=1e-5)
    assert sorted(dict(gm.named_parameters())) == sorted(n for n, _ in model.named_parameters() if n != "pos.weight")


@pytest.mark.torch
def test_imported_pytorch_tiny_gpt_prepares_and_trains_under_8da4w(tmp_path):
    import torch  # noqa: F401  (needs PyTorch: the marker's rule)
    model = torch_tiny_gpt()
    gm = import_onnx(export_torch(model, tmp_path / "gpt.onnx"))
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(gm, QuantizationConfig.int8_dynamic_activation_int4_weight())
    linears = [name for name, m in qat.named_modules() if isinstance(m, QATLinear)]
    assert len(linears) == 4 * SIZES["n_layer"] + 1 and "blocks.1.attn.qkv" in linears
    optimizer = AdamW(qat.parameters(), lr=1e-3)
    before = {name: p.data.copy() for name, p in qat.named_parameters()}
    data = np.random.default_rng(5).integers(0, 65, (4, 4, SIZES["block_size"] + 1))
    losses = []
    for batch in data:
        logits = qat(batch[:, :-1])
        loss = F.cross_entropy(F.reshape(logits, (-1, SIZES["vocabulary_size"])), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.data))
    assert np.all(np.isfinite(losses)) and len(losses) == 4
    after = dict(qat.named_parameters())
    for name in ("tok.weight", "pos.weight", "blocks.0.attn.qkv.weight", "blocks.1.ln_2.bias", "head.weight"):
        assert not np.array_equal(after[name].data, before[name]), name
    assert isinstance(qat(Tensor(data[0, :, :-1])), Tensor)


@pytest.mark.torch
@pytest.mark.parametrize("scheme", ["4w", "8da4w"])
def test_imported_pytorch_tiny_gpt_tunes_converts_and_exports_back(scheme, tmp_path):
    """The whole way round (issue 20): torch.onnx -> import -> QAT fine-tuning -> packed low-bit
    conversion (bit for bit the QAT eval) -> ONNX again -> ONNX Runtime."""
    import torch  # noqa: F401  (needs PyTorch: the marker's rule)
    ort = pytest.importorskip("onnxruntime")
    from qatcore.autograd.grad_mode import no_grad
    from qatcore.interop.onnx import export_onnx
    from qatcore.quantization.qat.operators.lowbit import LowBitLinear

    config = (QuantizationConfig.int4_weight_only(32) if scheme == "4w"
              else QuantizationConfig.int8_dynamic_activation_int4_weight())
    gm = import_onnx(export_torch(torch_tiny_gpt(), tmp_path / "gpt.onnx"))
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(gm, config)
    optimizer = AdamW(qat.parameters(), lr=1e-3)
    data = np.random.default_rng(6).integers(0, 65, (2, 4, SIZES["block_size"] + 1))
    for batch in data:
        loss = F.cross_entropy(F.reshape(qat(batch[:, :-1]), (-1, SIZES["vocabulary_size"])), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.eval()
    converted = preparer.convert_to_quantized(qat)
    assert sum(isinstance(m, LowBitLinear) for m in converted.modules()) == 4 * SIZES["n_layer"] + 1
    ids = np.random.default_rng(7).integers(0, 65, (3, SIZES["block_size"]))
    with no_grad():
        ours = converted(ids).data
        assert np.array_equal(ours, qat(ids).data)
    path = tmp_path / "gpt_lowbit.onnx"
    export_onnx(converted, path, ids[:1])
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # float32 (docs/interop.md)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: ids.astype(np.int64)})[0]
    scale = np.abs(ours).max()
    if scheme == "4w":  # weight only: float32 sums of the same products
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5 * scale)
    else:  # per-token integers may move one step where ONNX Runtime's float ops differ by an ulp
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-2 * scale)
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.98
