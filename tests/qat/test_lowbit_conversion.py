"""Low-bit conversion (issue 20): a QAT model with per-group or ternary weights converts to
packed LowBitLinear / LowBitEmbedding layers whose outputs equal the QAT model's eval bit
for bit, in graph and eager mode, and whose files hold the packed bytes."""

from __future__ import annotations

import os

import numpy as np
import pytest

import qatcore
from qatcore.autograd.grad_mode import no_grad
from qatcore.errors import CheckpointError, ConfigError
from qatcore.models import TinyGPT
from qatcore.nn.container import Sequential
from qatcore.nn.conv import Conv2d
from qatcore.nn.flatten import Flatten
from qatcore.nn.linear import Linear
from qatcore.quantization.config import QScheme, QuantizationConfig, QuantSpec
from qatcore.quantization.lowbit import lowbit_linear, lowbit_weight
from qatcore.quantization.qat import QATPreparer
from qatcore.quantization.qat.checkpointing import load_int8_model, save_int8_model
from qatcore.quantization.qat.operators.lowbit import LowBitEmbedding, LowBitLinear
from qatcore.quantization.qat.qat_layers import QATLinear

SCHEMES = {
    "8da4w": QuantizationConfig.int8_dynamic_activation_int4_weight(),
    "4w": QuantizationConfig.int4_weight_only(32),
    "2w": QuantizationConfig.intx_weight_only(2, 32),
    "3w": QuantizationConfig.intx_weight_only(3, 16),
    "ternary": QuantizationConfig.ternary_weight(),
    "ternary-g32": QuantizationConfig.ternary_weight(group_size=32, activations=False),
}


def _group_spec(bits=4, group_size=16, scheme=QScheme.PER_GROUP_SYMMETRIC, **kw) -> QuantSpec:
    return QuantSpec(bits=bits, signed=True, scheme=scheme, group_size=group_size, **kw)


def _tokens(batch=3, length=32, seed=1):
    return np.random.default_rng(seed).integers(0, 65, (batch, length))


def _trained(config, mode="graph", steps=2, **model_kwargs):
    """A small TinyGPT prepared under ``config`` after a few AdamW steps (scales moved)."""
    model = TinyGPT(n_layer=2, n_embd=64, n_head=2, block_size=32, rng=np.random.default_rng(0), **model_kwargs)
    preparer = QATPreparer(mode=mode)
    qat = preparer.prepare_for_qat(model, config)
    optimizer = qatcore.optim.AdamW(qat.parameters(), lr=1e-2)
    rng = np.random.default_rng(5)
    qat.train()
    for _ in range(steps):
        idx = rng.integers(0, 65, (4, 32))
        loss = qatcore.nn.functional.cross_entropy(qat(idx).reshape(-1, 65), idx.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return preparer, qat.eval()


def _eval(model, idx):
    with no_grad():
        out = model(idx)
    return out.data if hasattr(out, "data") else np.asarray(out)


@pytest.mark.parametrize("mode", ["graph", "eager"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_converted_equals_qat_eval_bit_for_bit(scheme, mode):
    preparer, qat = _trained(SCHEMES[scheme], mode)
    converted = preparer.convert_to_quantized(qat)
    layers = [m for m in converted.modules() if isinstance(m, LowBitLinear)]
    assert len(layers) == 2 * 4 + 1  # qkv, proj, fc, fc2 per block, and the head
    idx = _tokens()
    expected, got = _eval(qat, idx), _eval(converted, idx)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    # a row of the batch alone gives the same bits (the kernels' rows are independent)
    assert np.array_equal(_eval(converted, idx[1:2]), expected[1:2])


def test_quantized_embedding_and_attention_convert_exactly():
    ternary = QuantizationConfig.ternary_weight(group_size=32)
    config = ternary.replace(embedding=_group_spec(4, 16),
                             attention=QuantizationConfig.int8_dynamic_activation_int4_weight().activation)
    preparer, qat = _trained(config)
    converted = preparer.convert_to_quantized(qat)
    # the token table (the positions' lookup has constant indices: the trace computes it once)
    assert sum(isinstance(m, LowBitEmbedding) for m in converted.modules()) == 1
    idx = _tokens()
    assert np.array_equal(_eval(converted, idx), _eval(qat, idx))


def test_lsq_group_scales_convert_exactly():
    config = QuantizationConfig.int8_dynamic_activation_int4_weight(group_size=16)
    config = config.replace(weight=_group_spec(4, 16, learnable="lsq"))
    preparer, qat = _trained(config, steps=3)
    converted = preparer.convert_to_quantized(qat)
    idx = _tokens()
    assert np.array_equal(_eval(converted, idx), _eval(qat, idx))


def test_affine_group_weights_convert_weight_only():
    config = QuantizationConfig.intx_weight_only(4, 16).replace(weight=_group_spec(4, 16, QScheme.PER_GROUP_AFFINE))
    preparer, qat = _trained(config)
    converted = preparer.convert_to_quantized(qat)
    layer = next(m for m in converted.modules() if isinstance(m, LowBitLinear))
    assert layer.zero_point.data.shape == layer.scale.data.shape
    idx = _tokens()
    assert np.array_equal(_eval(converted, idx), _eval(qat, idx))


def test_eval_with_gradients_or_in_training_is_the_simulation():
    preparer, qat = _trained(SCHEMES["8da4w"])
    layer = next(m for m in qat.modules() if isinstance(m, QATLinear))
    assert not layer.lowbit_eval()  # gradients on
    with no_grad():
        assert layer.lowbit_eval()
        qat.train()
        assert not layer.lowbit_eval()


def test_the_packed_weight_is_the_fake_quantized_weight():
    _, qat = _trained(SCHEMES["2w"])
    layer = next(m for m in qat.modules() if isinstance(m, QATLinear))
    weight = lowbit_weight(layer.weight_fake_quant, layer.weight.data, "fc")
    assert weight.packed.dtype == np.uint8 and weight.packed.shape == (layer.out_features, layer.in_features // 4)
    assert np.array_equal(weight.dequantize(), layer.weight_fake_quant(layer.weight.data))


def test_file_round_trip_holds_packed_weights(tmp_path):
    model = TinyGPT(rng=np.random.default_rng(0))
    float_path = tmp_path / "float.qat"
    qatcore.save(model.state_dict(), float_path)
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model, SCHEMES["4w"])
    idx = np.random.default_rng(2).integers(0, 65, (2, 64))
    qat.train()
    qat(idx)
    qat.eval()
    converted = preparer.convert_to_quantized(qat)
    path = tmp_path / "gpt.int8"
    save_int8_model(path, converted)
    again = load_int8_model(path)
    assert np.array_equal(_eval(again, idx), _eval(qat, idx))
    for name, module in converted.named_modules():
        if isinstance(module, LowBitLinear):
            loaded = again.get_submodule(name)
            assert loaded.packed.data.dtype == np.uint8
            assert np.array_equal(loaded.packed.data, module.packed.data)
    # a TinyGPT int4 file is at most 20% of the float file (the bound)
    assert os.path.getsize(path) <= 0.2 * os.path.getsize(float_path)


def test_a_corrupted_low_bit_file_is_refused(tmp_path):
    preparer, qat = _trained(SCHEMES["4w"])
    path = tmp_path / "gpt.int8"
    save_int8_model(path, preparer.convert_to_quantized(qat))
    data = qatcore.load(path)
    record = next(r for r in data["nodes"] if len(r) >= 4 and isinstance(r[3], list) and r[3][0] == "LowBitLinear")
    record[3][1] = {k: v for k, v in record[3][1].items() if k != "group_size"}
    qatcore.save(data, path)
    with pytest.raises(CheckpointError, match="LowBitLinear config needs exactly the keys"):
        load_int8_model(path)


def test_conversion_refuses_what_the_low_bit_runtime_cannot_hold():
    # a per-group weight beside observed int8 activations
    static = QuantizationConfig().replace(weight=_group_spec(4, 4))
    model = Sequential(Linear(8, 8, rng=np.random.default_rng(0)), Linear(8, 4, rng=np.random.default_rng(1)))
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model, static)
    qat(np.ones((2, 8), np.float32))
    with pytest.raises(ConfigError, match="observed"):
        preparer.convert_to_quantized(qat.eval())
    # 8-bit groups: the int8 runtime's per-channel weights are the way
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(Sequential(Linear(8, 4, rng=np.random.default_rng(0))),
                                   QuantizationConfig.intx_weight_only(8, 4))
    qat(np.ones((2, 8), np.float32))
    with pytest.raises(ConfigError, match="packs 2-, 3- and 4-bit"):
        preparer.convert_to_quantized(qat.eval())
    # a per-group conv weight
    conv_model = Sequential(Conv2d(2, 4, 3, rng=np.random.default_rng(0)), Flatten())
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(conv_model, QuantizationConfig.intx_weight_only(4, 3))
    qat(np.ones((1, 2, 5, 5), np.float32))
    with pytest.raises(ConfigError, match="Linear and Embedding layers only"):
        preparer.convert_to_quantized(qat.eval())


def test_lowbit_linear_refuses_a_wrong_input_width():
    _, qat = _trained(SCHEMES["4w"])
    layer = next(m for m in qat.modules() if isinstance(m, QATLinear))
    weight = lowbit_weight(layer.weight_fake_quant, layer.weight.data, "fc")
    with pytest.raises(qatcore.errors.ShapeError, match="expected inputs"):
        lowbit_linear(np.ones((2, layer.in_features + 1), np.float32), weight, None, None, "fc")


@pytest.mark.parametrize("scheme", ["8da4w", "4w", "2w", "ternary"])
def test_validation_perplexity_of_the_converted_model_is_the_qat_models(scheme):
    from qatcore.data.text import load_text
    from qatcore.pipeline.gpt_experiment import validation_loss

    preparer, qat = _trained(SCHEMES[scheme], steps=3)
    converted = preparer.convert_to_quantized(qat)
    validation = load_text().validation
    qat_loss, count = validation_loss(qat, validation, 32, windows=24)
    converted_loss, _ = validation_loss(converted, validation, 32, windows=24)
    assert count == 24 * 32 and converted_loss == qat_loss
