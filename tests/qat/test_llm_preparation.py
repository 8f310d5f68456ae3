"""TinyGPT prepared under the transformer presets (issue 19): which quantizers exist where
(8da4w: a per-token quantizer at each QAT layer's input and nothing after any op;
weight-only: weights only; ternary: absmean weights and symmetric per-token inputs), that
each preset trains and evaluates as it trains (no float64 eval for dynamic weights), the
describe() rows, the embedding spec (QATEmbedding) and the attention spec (QATAttention,
checked against a hand composition), LSQ group scales joining the optimizer, the refusals
of conversion and export, mixed activation placements, statistics, and eager mode."""

import re

import numpy as np
import pytest

import qatcore
from qatcore.autograd import gradcheck
from qatcore.autograd.grad_mode import no_grad
from qatcore.errors import ConfigError, InteropError
from qatcore.graph import GraphModule
from qatcore.models import TinyGPT
from qatcore.nn import Embedding
from qatcore.nn import functional as F
from qatcore.optim import AdamW
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.block_fake_quantize import BlockFakeQuantize
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.group_token_fake_quantize import (
    absmean_scale,
    fake_quantize_per_group,
    fake_quantize_per_token,
    fake_quantize_ternary,
)
from qatcore.quantization.qat import (
    LayerOverride,
    LayerwiseConfig,
    QATLinear,
    QATPreparer,
    StatisticsConfig,
    learnable_quantizer_parameters,
)
from qatcore.quantization.qat.qat_attention import QATAttention
from qatcore.quantization.qat.qat_layers import QATEmbedding

VOCABULARY = 11
LINEARS = [f"blocks.{b}.{layer}" for b in range(2) for layer in ("attn.qkv", "attn.proj", "fc_1", "fc_2")] + ["head"]
F32 = np.float32


def gpt() -> TinyGPT:
    return TinyGPT(vocabulary_size=VOCABULARY, block_size=16, n_layer=2, n_embd=64, n_head=4)


def tokens(seed: int = 0, batch: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCABULARY, size=(batch, 16))


def eight_da_four_w() -> QuantizationConfig:
    return QuantizationConfig.int8_dynamic_activation_int4_weight()


def lsq_group_variant() -> QuantizationConfig:
    config = eight_da_four_w()
    return config.replace(weight=config.weight.replace(learnable="lsq"))


PRESETS = {
    "8da4w": eight_da_four_w,
    "int4_weight_only_g32": lambda: QuantizationConfig.int4_weight_only(32),
    "int2_weight_only_g32": lambda: QuantizationConfig.intx_weight_only(2, 32),
    "ternary": QuantizationConfig.ternary_weight,
    "ternary_g32": lambda: QuantizationConfig.ternary_weight(group_size=32),
    "8da4w_lsq": lsq_group_variant,
}


def loss_of(model, x) -> qatcore.Tensor:
    return F.cross_entropy(model(x).reshape(-1, VOCABULARY), x.reshape(-1))


def train(model, optimizer, x, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(model, x)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.data))
    return losses


def quantizers(model) -> dict[str, FakeQuantize]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantize)}


def describe_rows(preparer, model) -> dict[str, list[str]]:
    lines = preparer.describe(model).splitlines()
    assert lines[0].split() == ["layer", "float", "qat", "fused", "weights", "activations", "mode", "rule"]
    return {row[0]: row for row in (re.split(r" {2,}", line) for line in lines[2:-1])}


# ---------------------------------------------------------------- which quantizers exist where

@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_8da4w_quantizes_each_layer_input_per_token_and_nothing_else(mode):
    qat = QATPreparer(mode=mode).prepare_for_qat(gpt(), eight_da_four_w())
    assert isinstance(qat, GraphModule) == (mode == "graph")
    expected = {}
    for name in LINEARS:
        layer = qat.get_submodule(name)
        assert type(layer) is QATLinear
        weight, inputs = layer.weight_fake_quant, layer.input_fake_quant
        assert type(weight) is BlockFakeQuantize and weight.spec == eight_da_four_w().weight
        assert (weight.spec.scheme.value, weight.group_size, weight.name) == ("per_group_symmetric", 32,
                                                                             f"{name}.weight")
        assert type(inputs) is BlockFakeQuantize and inputs.spec == eight_da_four_w().activation
        assert (inputs.spec.scheme.value, inputs.name) == ("per_token_affine", f"{name}.input")
        assert layer.output_fake_quant is None and layer.input_quantizer is inputs
        assert layer.interpreter is None  # no int8 arithmetic for dynamic schemes, in eval either
        expected[f"{name}.weight_fake_quant"] = weight
        expected[f"{name}.input_fake_quant"] = inputs
    assert quantizers(qat) == expected   # 18 quantizers, all in the QAT layers
    assert type(qat.tok) is Embedding and type(qat.pos) is Embedding  # no embedding spec: float
    if mode == "graph":
        assert list(qat.activation_fake_quant.named_children()) == []
        assert not any(node.op == "call_module" and node.target.startswith("activation_fake_quant")
                       for node in qat.graph.nodes)
        assert qat.interpreter is None    # not IntegerEval: the int8 runtime holds none of these schemes


@pytest.mark.parametrize("preset, bits", [("int4_weight_only_g32", 4), ("int2_weight_only_g32", 2)])
def test_weight_only_presets_have_no_input_or_output_quantizers(preset, bits):
    qat = QATPreparer().prepare_for_qat(gpt(), PRESETS[preset]())
    found = quantizers(qat)
    assert sorted(found) == sorted(f"{name}.weight_fake_quant" for name in LINEARS)
    for name in LINEARS:
        layer = qat.get_submodule(name)
        assert layer.input_fake_quant is None and layer.output_fake_quant is None
        weight = layer.weight_fake_quant
        assert (weight.spec.bits, weight.spec.scheme.value, weight.group_size, weight.qrange) == (
            bits, "per_group_symmetric", 32, (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    assert list(qat.activation_fake_quant.named_children()) == []


@pytest.mark.parametrize("preset, scheme, group_size", [("ternary", "per_tensor_absmean", None),
                                                        ("ternary_g32", "per_group_absmean", 32)])
def test_ternary_presets_quantize_weights_ternary_and_inputs_symmetric_per_token(preset, scheme, group_size):
    qat = QATPreparer().prepare_for_qat(gpt(), PRESETS[preset]())
    assert len(quantizers(qat)) == 2 * len(LINEARS)
    for name in LINEARS:
        layer = qat.get_submodule(name)
        assert (layer.weight_fake_quant.spec.scheme.value, layer.weight_fake_quant.group_size) == (scheme, group_size)
        assert layer.weight_fake_quant.qrange == (-1, 1)
        assert layer.input_fake_quant.spec.scheme.value == "per_token_symmetric"
        assert layer.input_fake_quant.qrange == (-128, 127) and layer.output_fake_quant is None


def test_a_quantized_layer_computes_what_the_functions_compute():
    qat = QATPreparer().prepare_for_qat(gpt(), eight_da_four_w())
    layer = qat.get_submodule("blocks.0.fc_1")
    x = np.random.default_rng(3).standard_normal((2, 16, 64)).astype(F32)
    expected = F.linear(fake_quantize_per_token(x), fake_quantize_per_group(layer.weight.data, 32, 4), layer.bias)
    np.testing.assert_array_equal(layer(x).numpy(), expected.numpy())
    ternary = QATPreparer().prepare_for_qat(gpt(), QuantizationConfig.ternary_weight()).get_submodule("head")
    expected = F.linear(fake_quantize_per_token(x, 8, symmetric=True), fake_quantize_ternary(ternary.weight.data))
    np.testing.assert_array_equal(ternary(x).numpy(), expected.numpy())


# ---------------------------------------------------------------- training and eval

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_trains_and_evaluates_as_it_trains(preset):
    qat = QATPreparer(statistics=StatisticsConfig(enabled=False)).prepare_for_qat(gpt(), PRESETS[preset]())
    x = tokens()
    losses = train(qat, AdamW(qat.parameters(), lr=3e-3), x, steps=6)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0], losses
    with qatcore.no_grad():
        training_forward = qat(x).numpy()
    with_gradients = qat(x).numpy()
    qat.eval()
    # eval with gradients computes what training computes (no observers, no int8 interpreter)
    np.testing.assert_array_equal(qat(x).numpy(), training_forward)
    np.testing.assert_array_equal(with_gradients, training_forward)
    # without gradients, the low-bit arithmetic of the converted model (issue 20): the same
    # integers, summed exactly (or in float64) instead of float32 BLAS, so close to it
    with qatcore.no_grad():
        low_bit = qat(x).numpy()
    np.testing.assert_allclose(low_bit, training_forward, rtol=0, atol=0.02 * np.abs(training_forward).max())
    converted = QATPreparer().convert_to_quantized(qat)
    np.testing.assert_array_equal(converted(x).numpy(), low_bit)


def test_graph_and_eager_preparation_train_identically_under_8da4w():
    x = tokens(1)
    runs = {}
    for mode in ("graph", "eager"):
        preparer = QATPreparer(mode=mode, statistics=StatisticsConfig(enabled=False))
        qat = preparer.prepare_for_qat(gpt(), eight_da_four_w())
        assert preparer.controller(qat).preparation_mode == mode
        losses = train(qat, AdamW(qat.parameters(), lr=3e-3), x, steps=4)
        runs[mode] = (losses, {name: p.data.copy() for name, p in qat.named_parameters()}, qat.eval()(x).numpy())
    assert runs["graph"][0] == runs["eager"][0]
    assert runs["graph"][1].keys() == runs["eager"][1].keys()
    for name, value in runs["graph"][1].items():
        np.testing.assert_array_equal(runs["eager"][1][name], value, err_msg=name)
    np.testing.assert_array_equal(runs["graph"][2], runs["eager"][2])


# ---------------------------------------------------------------- describe

@pytest.mark.parametrize("preset, weights, activations, mode", [
    ("8da4w", "int4 per_group_symmetric g32", "int8 per_token_affine", "weights_and_activations"),
    ("int4_weight_only_g32", "int4 per_group_symmetric g32", "float", "weights_only"),
    ("int2_weight_only_g32", "int2 per_group_symmetric g32", "float", "weights_only"),
    ("ternary", "int2_narrow per_tensor_absmean", "int8 per_token_symmetric", "weights_and_activations"),
    ("ternary_g32", "int2_narrow per_group_absmean g32", "int8 per_token_symmetric", "weights_and_activations"),
    ("8da4w_lsq", "int4 per_group_symmetric g32 lsq", "int8 per_token_affine", "weights_and_activations"),
])
def test_describe_rows(preset, weights, activations, mode):
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(gpt(), PRESETS[preset]())
    rows = describe_rows(preparer, qat)
    assert list(rows) == ["tok", *LINEARS]
    for name in LINEARS:
        assert rows[name] == [name, "Linear", "QATLinear", "-", weights, activations, mode, "global"]
    assert rows["tok"] == ["tok", "Embedding", "Embedding", "-", "float", "float", "float", "global"]


def test_describe_rows_of_an_embedding_spec_and_of_overrides():
    config = LayerwiseConfig(global_config=eight_da_four_w().replace(embedding=eight_da_four_w().weight),
                             overrides={"head": LayerOverride(mode="weights_only"),
                                        "blocks.1.fc_2": LayerOverride(enabled=False)})
    preparer = QATPreparer()
    rows = describe_rows(preparer, preparer.prepare_for_qat(gpt(), config))
    assert rows["tok"] == ["tok", "Embedding", "QATEmbedding", "-", "int4 per_group_symmetric g32", "float",
                           "weights_only", "global"]
    assert rows["head"] == ["head", "Linear", "QATLinear", "-", "int4 per_group_symmetric g32", "float",
                            "weights_only", "name 'head'"]
    assert rows["blocks.1.fc_2"] == ["blocks.1.fc_2", "Linear", "Linear", "-", "float", "float", "disabled",
                                     "name 'blocks.1.fc_2'"]


# ---------------------------------------------------------------- the embedding spec

@pytest.mark.parametrize("spec_name", ["per_group", "ternary"])
def test_the_embedding_spec_makes_tok_a_qat_embedding_of_the_quantized_table(spec_name):
    embedding_spec = (eight_da_four_w().weight if spec_name == "per_group"
                      else QuantizationConfig.ternary_weight(group_size=16).weight)
    model = gpt()
    qat = QATPreparer().prepare_for_qat(model, eight_da_four_w().replace(embedding=embedding_spec))
    tok = qat.tok
    assert type(tok) is QATEmbedding and tok.weight is model.tok.weight   # the float model's Parameter
    assert type(tok.weight_fake_quant) is BlockFakeQuantize and tok.weight_fake_quant.name == "tok.weight"
    assert tok.input_fake_quant is None and tok.output_fake_quant is None
    assert tok.weight_fake_quant in quantizers(qat).values()
    idx = tokens(2)
    table = tok.weight.data
    quantized = (fake_quantize_per_group(table, 32, 4) if spec_name == "per_group"
                 else fake_quantize_ternary(table, 16))
    np.testing.assert_array_equal(tok(idx).numpy(), F.embedding(idx, quantized).numpy())
    # the gradient reaches the table through the weight quantizer's straight-through estimator
    g = np.random.default_rng(4).standard_normal((4, 16, 64)).astype(F32)
    tok(idx).backward(g)
    reference = qatcore.tensor(table.copy(), requires_grad=True)
    lookup = (fake_quantize_per_group(reference, 32, 4) if spec_name == "per_group"
              else fake_quantize_ternary(reference, 16))
    F.embedding(idx, lookup).backward(g)
    np.testing.assert_array_equal(tok.weight.grad, reference.grad)


# ---------------------------------------------------------------- the attention spec

def test_the_attention_spec_replaces_each_attention_call_by_a_qat_attention():
    config = eight_da_four_w().replace(attention=eight_da_four_w().activation)
    qat = QATPreparer().prepare_for_qat(gpt(), config)
    calls = [node for node in qat.graph.nodes if node.op == "call_module"
             and isinstance(qat.get_submodule(node.target), QATAttention)]
    assert [node.target for node in calls] == ["attention_fake_quant.scaled_dot_product_attention",
                                               "attention_fake_quant.scaled_dot_product_attention_1"]
    assert not any(node.op == "call_function" and node.target is F.scaled_dot_product_attention
                   for node in qat.graph.nodes)
    for node in calls:
        assert node.kwargs == {"is_causal": True} and len(node.args) == 3
        attention = qat.get_submodule(node.target)
        for operand, quantizer in zip(("query", "key", "value", "probabilities"), attention.quantizers()):
            assert type(quantizer) is BlockFakeQuantize and quantizer.spec == config.attention
            assert quantizer.name == f"{node.target}.{operand}"
    losses = train(qat, AdamW(qat.parameters(), lr=3e-3), tokens(), steps=4)
    assert losses[-1] < losses[0], losses


def test_qat_attention_by_hand():
    spec = eight_da_four_w().activation
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 4, 16, 16)).astype(F32) for _ in range(3))
    attention = QATAttention(spec, "attn")
    y = attention(q, k, v, is_causal=True).numpy()
    # q and k per row over the head dimension; the probabilities per row over the keys
    qq, kq = fake_quantize_per_token(q), fake_quantize_per_token(k)
    scores = (qq @ kq.swapaxes(-1, -2)).astype(np.float64) / 4.0
    scores[..., np.triu(np.ones((16, 16), bool), 1)] = -np.inf
    probabilities = np.exp(scores - scores.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    ours = F.attention_probabilities(qq, kq, None, True).numpy()
    np.testing.assert_allclose(ours, probabilities, rtol=1e-5, atol=1e-7)   # softmax, by hand
    # v per column: each of its channels across the positions (quantized transposed)
    vq = fake_quantize_per_token(v.swapaxes(-1, -2)).swapaxes(-1, -2)
    expected = fake_quantize_per_token(ours) @ vq
    np.testing.assert_array_equal(y, expected)
    per_row = fake_quantize_per_token(ours) @ fake_quantize_per_token(v)
    assert not np.array_equal(y, per_row)              # the axis matters
    np.testing.assert_allclose(y, fake_quantize_per_token(probabilities.astype(F32)) @ vq, rtol=1e-4, atol=1e-5)


def test_qat_attention_backward_is_the_straight_through_composition():
    spec = QuantizationConfig.ternary_weight().activation   # symmetric per token
    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal((1, 2, 8, 16)).astype(F32) for _ in range(3)]
    g = rng.standard_normal((1, 2, 8, 16)).astype(F32)
    ours = [qatcore.tensor(a, requires_grad=True) for a in arrays]
    QATAttention(spec, "attn")(*ours, is_causal=True).backward(g)
    ref = [qatcore.tensor(a, requires_grad=True) for a in arrays]

    def token(t):
        return fake_quantize_per_token(t, 8, symmetric=True)

    value = F.transpose(token(F.transpose(ref[2], -2, -1)), -2, -1)
    F.matmul(token(F.attention_probabilities(token(ref[0]), token(ref[1]), None, True)), value).backward(g)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a.grad, b.grad)


def test_qat_attention_with_its_quantizers_off_is_the_float_attention():
    attention = QATAttention(eight_da_four_w().activation, "attn")
    for quantizer in attention.quantizers():
        quantizer.disable_fake_quant()
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 4, 3)) for _ in range(3))
    np.testing.assert_array_equal(attention(q, k, v, is_causal=True).numpy(),
                                  F.scaled_dot_product_attention(q, k, v, is_causal=True).numpy())
    # float64 and differentiable: the transposes around the value quantizer keep the gradient exact
    assert gradcheck(lambda a, b, c: attention(a, b, c, is_causal=True), [q, k, v])


def test_a_per_tensor_attention_spec_observes_each_operand_as_it_is():
    attention = QATAttention(QuantizationConfig().activation, "attn")
    assert all(type(quantizer) is FakeQuantize for quantizer in attention.quantizers())
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 2, 4, 8)).astype(F32) for _ in range(3))
    attention(q, k, v)
    observer = attention.value_fake_quant.observer
    assert observer.min_val.data.tolist() == [float(v.min())]
    assert observer.max_val.data.tolist() == [float(v.max())]


# ---------------------------------------------------------------- LSQ group scales and optimizers

def test_lsq_group_scales_join_the_optimizer_that_holds_the_weights_and_learn():
    model = gpt()
    optimizer = AdamW(model.parameters(), lr=3e-3)      # built before preparation
    qat = QATPreparer().prepare_for_qat(model, lsq_group_variant())
    scales = learnable_quantizer_parameters(qat)
    assert [name for name, _ in scales] == [f"{name}.weight_fake_quant.scale" for name in LINEARS]
    for name, scale in scales:
        layer = qat.get_submodule(name.rsplit(".", 2)[0])
        assert optimizer.holds(scale) and scale.data.shape == (1,)
        group = next(g for g in optimizer.param_groups if any(p is layer.weight for p in g["params"]))
        assert any(p is scale for p in group["params"])
    x = tokens()
    optimizer.zero_grad()
    loss_of(qat, x).backward()
    initial = {}
    for name, scale in scales:
        layer = qat.get_submodule(name.rsplit(".", 2)[0])
        assert scale.data.shape == (layer.weight.data.size // 32,)
        np.testing.assert_array_equal(scale.data, layer.weight_fake_quant.block_qparams(layer.weight.data)[0]
                                      .reshape(-1))
        assert scale.grad is not None and scale.grad.shape == scale.data.shape and np.any(scale.grad != 0)
        initial[name] = scale.data.copy()
    optimizer.step()
    for name, scale in scales:
        assert not np.array_equal(scale.data, initial[name]), name
    # an optimizer built after preparation from qat.parameters() holds them too
    after = AdamW(qat.parameters(), lr=3e-3)
    assert all(after.holds(scale) for _, scale in scales)


def test_lsq_variant_refuses_training_when_no_optimizer_holds_the_scales():
    qat = QATPreparer().prepare_for_qat(gpt(), lsq_group_variant())
    AdamW([p for name, p in qat.named_parameters() if not name.endswith(".scale")], lr=1e-3)
    with pytest.raises(ConfigError, match=r"no optimizer holds the learned quantization parameter\(s\) "
                                          r"blocks\.0\.attn\.qkv\.weight_fake_quant\.scale"):
        qat(tokens())


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("config, first", [
    (eight_da_four_w(), "blocks.0.attn.qkv.weight_fake_quant' uses per_group_symmetric (int4, group_size=32)"),
    (QuantizationConfig.int4_weight_only(32), "blocks.0.attn.qkv.weight_fake_quant' uses per_group_symmetric"),
    (QuantizationConfig.ternary_weight(), "blocks.0.attn.qkv.weight_fake_quant' uses per_tensor_absmean "
                                          "(int2_narrow)"),
    (QuantizationConfig().replace(embedding=eight_da_four_w().weight), "tok.weight_fake_quant' uses "
                                                                       "per_group_symmetric"),
    (QuantizationConfig().replace(attention=eight_da_four_w().activation),
     "attention_fake_quant.scaled_dot_product_attention.query_fake_quant' uses per_token_affine (int8)"),
], ids=["8da4w", "4w", "ternary", "embedding", "attention"])
def test_conversion_is_exact_and_qat_export_refuses_naming_the_quantizer(config, first, tmp_path):
    """Each of these converts (issue 20: the low-bit runtime, ``test_lowbit_conversion.py``) to a
    model equal to the QAT eval; the QAT model itself does not export (its converted model does)."""
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(gpt(), config)
    qat(tokens())
    qat.eval()
    converted = preparer.convert_to_quantized(qat)
    with no_grad():
        assert np.array_equal(converted(tokens()).data, qat(tokens()).data)
    pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install qatcore[onnx])")
    from qatcore.interop.onnx import export_onnx

    path = tmp_path / "model.onnx"
    with pytest.raises(InteropError, match=r"^export_onnx: quantizer '" + re.escape(first)):
        export_onnx(qat, path, tokens(batch=1))
    assert not path.exists()


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_mixing_dynamic_and_observed_activations_is_refused(mode):
    preparer = QATPreparer(mode=mode)
    mixed = LayerwiseConfig(global_config=eight_da_four_w(), overrides={"blocks.0.fc_1": QuantizationConfig()})
    with pytest.raises(ConfigError, match=r"layer 'blocks\.0\.fc_1' quantizes activations per_tensor_affine but the "
                                          r"global config per_token_affine; .* change the override's activation "
                                          r"spec, or its mode to weights_only"):
        preparer.prepare_for_qat(gpt(), mixed)
    reverse = LayerwiseConfig(global_config=QuantizationConfig(), overrides={"head": eight_da_four_w()})
    with pytest.raises(ConfigError, match=r"layer 'head' quantizes activations per_token_affine but the global "
                                          r"config per_tensor_affine"):
        preparer.prepare_for_qat(gpt(), reverse)
    # a weights-only override of a dynamic model is fine: that layer quantizes no input
    allowed = LayerwiseConfig(global_config=eight_da_four_w(), overrides={"head": "weights_only"})
    qat = preparer.prepare_for_qat(gpt(), allowed)
    assert qat.get_submodule("head").input_fake_quant is None
    assert type(qat.get_submodule("blocks.0.fc_1").input_fake_quant) is BlockFakeQuantize


# ---------------------------------------------------------------- statistics

def test_statistics_of_group_weights_and_per_token_inputs():
    preparer = QATPreparer(statistics=StatisticsConfig(every=1, per_channel_detail=True))
    qat = preparer.prepare_for_qat(gpt(), eight_da_four_w())
    layer = qat.get_submodule("blocks.0.fc_1")
    inputs = []
    layer.input_fake_quant.register_forward_pre_hook(lambda module, args: inputs.append(args[0].data.copy()))
    optimizer = AdamW(qat.parameters(), lr=3e-3)
    x = tokens()
    weights, gradients = [], []
    for _ in range(3):
        weights.append(layer.weight.data.copy())
        optimizer.zero_grad()
        loss_of(qat, x).backward()
        gradients.append(layer.weight.grad.copy())
        optimizer.step()
    records = preparer.get_qat_statistics(qat).quantizers
    weight = records["blocks.0.fc_1.weight"]
    assert weight.kind == "weight"
    series = weight.series
    fq = layer.weight_fake_quant
    for step, (w, g) in enumerate(zip(weights, gradients)):
        scale, _, integers = fq.block_qparams(w)
        assert series["scale_mean"].values[step] == float(np.mean(scale))
        assert series["scale_min"].values[step] == float(np.min(scale))
        assert series["scale_max"].values[step] == float(np.max(scale))
        assert series["zero_point_mean"].values[step] == 0.0
        np.testing.assert_array_equal(series["scale"].values[step], scale.reshape(-1).astype(np.float64))
        # the clipped fraction of the straight-through estimator: |w| / s rounding beyond [-8, 7]
        q = np.rint(w.reshape(-1, 32) * (F32(1) / scale.reshape(-1, 1)))
        assert series["clip_fraction"].values[step] == float(np.mean((q < -8) | (q > 7)))
        # dL/dx leaving the quantizer is the weight's gradient; dL/dy entering it is no smaller
        assert series["grad_norm_out"].values[step] == pytest.approx(np.linalg.norm(g.astype(np.float64)),
                                                                     rel=1e-12)
        assert series["grad_norm_in"].values[step] >= series["grad_norm_out"].values[step]
        if step:
            previous = fq.block_qparams(weights[step - 1])[2]
            assert series["flip_rate"].values[step - 1] == float(np.mean(previous != integers))
    assert series["flip_rate"].steps.tolist() == [1, 2]
    assert series["clip_fraction"].values.max() > 0
    activation = records["blocks.0.fc_1.input"]
    assert activation.kind == "activation" and "flip_rate" not in activation.series
    assert "scale" not in activation.series    # per-token scales are not "channels"
    for step, seen in enumerate(inputs):
        scale, zero_point, _ = layer.input_fake_quant.block_qparams(seen)
        assert scale.size == 4 * 16
        for key, value in (("scale_mean", np.mean(scale)), ("scale_min", np.min(scale)),
                           ("scale_max", np.max(scale)), ("zero_point_mean", np.mean(zero_point))):
            assert activation.series[key].values[step] == float(value), key
        assert activation.series["grad_norm_in"].values[step] > 0


@pytest.mark.parametrize("preset", ["ternary", "ternary_g32"])
def test_statistics_of_ternary_weights(preset):
    preparer = QATPreparer(statistics=StatisticsConfig(every=1))
    qat = preparer.prepare_for_qat(gpt(), PRESETS[preset]())
    layer = qat.get_submodule("head")
    optimizer = AdamW(qat.parameters(), lr=3e-3)
    weights, gradients = [], []
    for _ in range(2):
        weights.append(layer.weight.data.copy())
        optimizer.zero_grad()
        loss_of(qat, tokens()).backward()
        gradients.append(layer.weight.grad.copy())
        optimizer.step()
    series = preparer.get_qat_statistics(qat).quantizers["head.weight"].series
    size = layer.weight.data.size if preset == "ternary" else 32
    for step, (w, g) in enumerate(zip(weights, gradients)):
        blocks = w.reshape(-1, size)
        scale = absmean_scale(blocks)
        assert series["scale_mean"].values[step] == float(np.mean(scale))
        # "clipped": beyond {-1, 0, 1}; BitNet's estimator still passes their gradient: in == out
        assert series["clip_fraction"].values[step] == float(np.mean(np.abs(np.rint(blocks / scale[:, None])) > 1))
        assert series["grad_norm_in"].values[step] == series["grad_norm_out"].values[step]
        assert series["grad_norm_out"].values[step] == pytest.approx(np.linalg.norm(g.astype(np.float64)),
                                                                     rel=1e-12)
    assert len(series["flip_rate"]) == 1 and 0 <= series["flip_rate"].values[0] <= 1


def test_statistics_of_lsq_group_scales_record_the_learned_scales_and_their_gradient():
    preparer = QATPreparer(statistics=StatisticsConfig(every=1))
    qat = preparer.prepare_for_qat(gpt(), lsq_group_variant())
    layer = qat.get_submodule("blocks.1.fc_2")
    optimizer = AdamW(qat.parameters(), lr=3e-3)
    scales = []
    for _ in range(2):
        optimizer.zero_grad()
        loss_of(qat, tokens()).backward()
        scales.append((layer.weight_fake_quant.scale.data.copy(), layer.weight_fake_quant.scale.grad.copy()))
        optimizer.step()
    series = preparer.get_qat_statistics(qat).quantizers["blocks.1.fc_2.weight"].series
    for step, (scale, grad) in enumerate(scales):
        assert series["scale_mean"].values[step] == float(np.mean(scale))
        assert series["scale_grad"].values[step] == pytest.approx(float(np.mean(np.abs(grad))), rel=1e-6)


def test_eager_mode_refuses_the_attention_spec():
    """Only a traced graph shows the attention calls: eager preparation says so instead of leaving them float."""
    config = QuantizationConfig.int8_dynamic_activation_int4_weight().replace(
        attention=QuantizationConfig.int8_dynamic_activation_int4_weight().activation)
    with pytest.raises(ConfigError, match="attention spec .* eager mode"):
        QATPreparer(mode="eager").prepare_for_qat(TinyGPT(block_size=16, n_layer=1, n_embd=64, n_head=4), config)
