"""TinyGPT: shapes, parameter count, weight tying, tracing, QAT preparation and training,
and the errors it raises."""

import numpy as np
import pytest

from qatcore import nn
from qatcore.errors import ConfigError, ShapeError
from qatcore.graph import trace
from qatcore.models import TinyGPT
from qatcore.optim import Adam
from qatcore.quantization.qat import QATPreparer


def small(**changes):
    return TinyGPT(**{"vocabulary_size": 11, "block_size": 8, "n_layer": 2, "n_embd": 16, "n_head": 2, **changes})


def tokens(batch=3, time=8, seed=0):
    return np.random.default_rng(seed).integers(0, 11, size=(batch, time))


def test_the_default_size_and_tying():
    assert sum(p.data.size for p in TinyGPT().parameters()) == 818_176
    tied = TinyGPT(tie_weights=True)
    assert tied.head.weight is tied.tok.weight
    assert sum(p.data.size for p in {id(p): p for p in tied.parameters()}.values()) == 809_856


def test_logits_are_causal_and_shorter_sequences_use_the_first_positions():
    model = small()
    x = tokens()
    logits = model(x).numpy()
    assert logits.shape == (3, 8, 11)
    changed = x.copy()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11  # the future changes: the first 5 positions must not
    np.testing.assert_array_equal(model(changed).numpy()[:, :5], logits[:, :5])
    np.testing.assert_allclose(model(x[:, :5]).numpy(), logits[:, :5], rtol=1e-5, atol=1e-6)


def test_traced_equals_eager_and_a_qat_model_trains():
    model = small()
    x = tokens()
    np.testing.assert_allclose(trace(model)(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)
    def fit(model, steps):  # a copy task (each position predicts its own token)
        optimizer = Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x).reshape(-1, 11), x.reshape(-1))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.data))
        return losses

    float_losses = fit(model, 20)
    assert float_losses[-1] < 0.3 * float_losses[0], float_losses
    qat = QATPreparer().prepare_for_qat(model)  # QAT fine-tunes the trained float model
    qat_losses = fit(qat, 10)
    assert qat_losses[-1] < qat_losses[0] and qat_losses[-1] < 2 * float_losses[-1], (float_losses, qat_losses)
    assert any(type(m).__name__ == "QATLinear" for m in qat.modules())


def test_bad_arguments_and_inputs():
    with pytest.raises(ConfigError, match="n_embd \\(10\\) must be a multiple of n_head \\(4\\)"):
        TinyGPT(n_embd=10, n_head=4)
    with pytest.raises(ConfigError, match="n_layer must be a positive int"):
        TinyGPT(n_layer=0)
    with pytest.raises(ShapeError, match="longer than block_size 8"):
        small()(tokens(time=9))
    with pytest.raises(ShapeError, match="expected \\(batch, time\\) tokens"):
        small()(np.zeros(8, dtype=np.int64))


# ---------------------------------------------------------------- cached decoding (issue 20)

def test_cached_decoding_equals_the_full_forward():
    model = TinyGPT(vocabulary_size=65, block_size=16, n_layer=2, n_embd=32, n_head=4,
                    rng=np.random.default_rng(0))
    idx = np.random.default_rng(1).integers(0, 65, (2, 16))
    full = model(idx).numpy()
    logits, cache = model.decode(idx[:, :7])                 # a prompt, then one token at a time
    steps = [logits.numpy()]
    for t in range(7, 16):
        logits, cache = model.decode(idx[:, t:t + 1], cache)
        steps.append(logits.numpy())
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=2e-6)
    assert cache[0][0].shape == (2, 4, 16, 8)
    with pytest.raises(ShapeError, match="fit block_size 16 after the 16 cached positions"):
        model.decode(idx[:, :1], cache)


def test_a_converted_low_bit_model_decodes_one_token_at_a_time():
    from qatcore.autograd.grad_mode import no_grad
    from qatcore.quantization.config import QuantizationConfig
    from qatcore.quantization.qat.operators.lowbit import LowBitLinear

    model = TinyGPT(vocabulary_size=65, block_size=16, n_layer=2, n_embd=64, n_head=4, rng=np.random.default_rng(0))
    preparer = QATPreparer(mode="eager")
    qat = preparer.prepare_for_qat(model, QuantizationConfig.int4_weight_only(32))
    idx = np.random.default_rng(1).integers(0, 65, (1, 16))
    qat(idx)
    converted = preparer.convert_to_quantized(qat.eval())
    assert isinstance(converted.blocks[0].attn.qkv, LowBitLinear)
    with no_grad():
        full = converted(idx).numpy()
        logits, cache = converted.decode(idx[:, :1])
        steps = [logits.numpy()]
        for t in range(1, 16):
            logits, cache = converted.decode(idx[:, t:t + 1], cache)
            steps.append(logits.numpy())
    decoded = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(decoded, full, rtol=0, atol=1e-5)
    assert np.array_equal(decoded.argmax(-1), full.argmax(-1))
