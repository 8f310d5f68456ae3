"""Batched matmul, linear on (B, T, C), scaled dot-product attention and MultiheadAttention:
gradient checks, PyTorch float64 parity, bad arguments, tracing."""

import numpy as np
import pytest

import qatcore.nn.functional as F
from qatcore import nn
from qatcore.autograd import gradcheck
from qatcore.errors import ConfigError, DTypeError, QATCoreError, ShapeError
from qatcore.graph import trace


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---- matmul and linear on batched inputs ----------------------------------------------------------
@pytest.mark.parametrize("a_shape, b_shape", [
    ((2, 3, 4), (4, 5)),            # (B, T, C) @ matrix: the linear case
    ((2, 3, 3, 4), (2, 3, 4, 2)),   # (B, H, M, K) @ (B, H, K, N)
    ((2, 1, 3, 4), (3, 4, 2)),      # batch axes broadcast
    ((3, 4), (2, 4, 5)),            # matrix @ batch
    ((4,), (2, 4, 5)),              # 1-D operands
])
def test_batched_matmul_gradients(a_shape, b_shape):
    rng = _rng(1)
    assert gradcheck(F.matmul, [rng.standard_normal(a_shape), rng.standard_normal(b_shape)])


def test_batched_matmul_broadcasts_like_numpy():
    rng = _rng(2)
    a, b = rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((5, 4, 6))
    np.testing.assert_allclose(F.matmul(a, b).numpy(), np.matmul(a, b), rtol=1e-12)
    assert F.matmul(a, b).shape == (2, 5, 3, 6)


def test_batch_axes_that_do_not_broadcast_are_a_shape_error():
    with pytest.raises(ShapeError, match=r"matmul: batch dimensions \(2,\) and \(3,\)"):
        F.matmul(np.zeros((2, 3, 4)), np.zeros((3, 4, 5)))


def test_linear_on_sequences_gradients_and_values():
    rng = _rng(3)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    assert gradcheck(F.linear, [x, w, b])
    np.testing.assert_allclose(F.linear(x, w, b).numpy(), x @ w.T + b, rtol=1e-12)
    layer = nn.Linear(4, 5, rng=_rng(4), dtype=np.float64)
    assert layer(x).shape == (2, 3, 5)


def test_weight_gradient_of_a_batched_input_equals_the_per_sample_sum():
    rng = _rng(5)
    x = F._tensor(rng.standard_normal((3, 7, 4)))
    w = nn.Parameter(rng.standard_normal((6, 4)))
    F.sum(F.mul(F.linear(x, w), 2.0)).backward()
    expected = sum(2.0 * np.ones((7, 6)).T @ x.data[i] for i in range(3))
    np.testing.assert_allclose(w.grad.data, expected, rtol=1e-12)


# ---- scaled dot-product attention ---------------------------------------------------------------------
def _qkv(rng, batch=(2, 3), length=4, source=5, embed=6, value_embed=3):
    return (rng.standard_normal((*batch, length, embed)), rng.standard_normal((*batch, source, embed)),
            rng.standard_normal((*batch, source, value_embed)))


@pytest.mark.parametrize("kwargs", [
    {}, {"is_causal": True}, {"scale": 0.3},
    {"attn_mask": np.array([[True, False, True, True, False]] * 4)},
    {"attn_mask": np.linspace(-1, 1, 20).reshape(4, 5)},
])
def test_sdpa_gradients(kwargs):
    q, k, v = _qkv(_rng(6))
    assert gradcheck(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kwargs), [q, k, v])


def test_sdpa_gradient_of_a_float_mask_that_requires_grad():
    q, k, v = _qkv(_rng(7), batch=(2,))
    mask = _rng(8).standard_normal((4, 5))
    assert gradcheck(lambda m, a: F.scaled_dot_product_attention(a, k, v, attn_mask=m), [mask, q])


def test_sdpa_formula_and_a_fully_masked_row():
    q, k, v = _qkv(_rng(9), batch=(2,))
    mask = np.ones((4, 5), bool)
    mask[2] = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).numpy()
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(6)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = p @ v
    expected[:, 2] = 0.0  # PyTorch's safe softmax: nothing to attend, nothing out
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-15)


def test_sdpa_softmax_is_stable_for_huge_scores():
    q = np.full((1, 2, 3), 1e4)
    k = np.array([[[1e4, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    v = np.array([[[1.0], [2.0]]])
    out = F.scaled_dot_product_attention(q, k, v).numpy()
    np.testing.assert_allclose(out, 1.0)


@pytest.mark.parametrize("call, error, message", [
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((4, 5), bool), is_causal=True),
     ConfigError, "attn_mask or is_causal=True, not both"),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((4, 4), bool)),
     ShapeError, r"attn_mask of shape \(4, 4\) does not broadcast"),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=np.ones((4, 5), np.int64)),
     DTypeError, "attn_mask must be boolean"),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k[..., :3], v), ShapeError, "share the embedding size"),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v[..., :2, :]), ShapeError, "as many positions as key"),
    (lambda q, k, v: F.scaled_dot_product_attention(q[0, 0, 0], k, v), ShapeError, "query must be"),
    (lambda q, k, v: F.scaled_dot_product_attention(q.astype(np.int64), k, v), DTypeError, "query must be"),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=float("nan")), ConfigError, "scale must be"),
])
def test_sdpa_bad_arguments(call, error, message):
    q, k, v = _qkv(_rng(10))
    with pytest.raises(error, match=message) as info:
        call(q, k, v)
    assert isinstance(info.value, QATCoreError)


@pytest.mark.torch
@pytest.mark.parametrize("case", ["none", "causal", "bool", "float", "bool_dead_row", "three_dims"])
def test_sdpa_matches_pytorch_in_float64(case):
    import torch

    rng = _rng(11)
    q, k, v = _qkv(rng, batch=(2,) if case == "three_dims" else (2, 3), source=4 if case == "causal" else 5)
    kwargs = {}
    if case == "causal":
        kwargs = {"is_causal": True}
    elif case in ("bool", "bool_dead_row"):
        mask = rng.random((2, 1, 4, 5)) > 0.4
        mask[..., 0] = True
        if case == "bool_dead_row":
            mask[1, 0, 2] = False
        kwargs = {"attn_mask": mask}
    elif case == "float":
        kwargs = {"attn_mask": rng.standard_normal((4, 5))}
    ours = [F._tensor(a).requires_grad_() for a in (q, k, v)]
    theirs = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*ours, **kwargs)
    expected = torch.nn.functional.scaled_dot_product_attention(
        *theirs, **{name: torch.tensor(value) if name == "attn_mask" else value for name, value in kwargs.items()})
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=1e-12, atol=1e-13)
    upstream = rng.standard_normal(out.shape)
    F.sum(F.mul(out, upstream)).backward()
    expected.backward(torch.tensor(upstream))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a.grad), b.grad.numpy(), rtol=1e-10, atol=1e-12)


# ---- MultiheadAttention ---------------------------------------------------------------------------------
def test_multihead_attention_parameters_and_shapes():
    mha = nn.MultiheadAttention(8, 2, rng=_rng(12))
    assert list(mha.state_dict()) == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert mha.in_proj_weight.shape == (24, 8) and isinstance(mha.out_proj, nn.Linear)
    assert not np.any(mha.in_proj_bias.data) and not np.any(mha.out_proj.bias.data)
    x = _rng(13).standard_normal((3, 5, 8)).astype(np.float32)
    out, weights = mha(x, x, x)
    assert out.shape == (3, 5, 8) and weights is None
    _, weights = mha(x, x, x, need_weights=True)
    np.testing.assert_allclose(weights.numpy().sum(-1), 1.0, rtol=1e-6)
    _, per_head = mha(x, x, x, need_weights=True, average_attn_weights=False)
    assert per_head.shape == (3, 2, 5, 5)
    assert list(nn.MultiheadAttention(8, 2, bias=False, rng=_rng(0)).state_dict()) == ["in_proj_weight",
                                                                                         "out_proj.weight"]


def test_multihead_attention_input_gradients():
    mha = nn.MultiheadAttention(4, 2, rng=_rng(14), dtype=np.float64)
    x, memory = _rng(15).standard_normal((2, 3, 4)), _rng(16).standard_normal((2, 5, 4))
    mask = np.triu(np.ones((3, 3), bool), 1)
    assert gradcheck(lambda a: mha(a, a, a, attn_mask=mask)[0], [x])
    assert gradcheck(lambda a, m: mha(a, m, m, need_weights=True)[1], [x, memory])


@pytest.mark.parametrize("build, message", [
    (lambda: nn.MultiheadAttention(6, 4), "embed_dim \\(6\\) must be divisible by num_heads \\(4\\)"),
    (lambda: nn.MultiheadAttention(0, 1), "embed_dim must be a positive int"),
    (lambda: nn.MultiheadAttention(4, 2, batch_first=False), "only batch_first=True"),
])
def test_multihead_attention_bad_settings(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_multihead_attention_bad_inputs():
    mha = nn.MultiheadAttention(4, 2, rng=_rng(16))
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ShapeError, match=r"query must be \(batch, length, 4\)"):
        mha(x[0], x, x)
    with pytest.raises(ShapeError, match="attn_mask must be"):
        mha(x, x, x, attn_mask=np.zeros((2, 3), bool))
    with pytest.raises(DTypeError, match="key must be floating point"):
        mha(x, x.astype(np.int32), x)


@pytest.mark.torch
@pytest.mark.parametrize("case", ["self", "cross", "bool_mask", "float_mask_per_head", "causal", "no_bias"])
def test_multihead_attention_matches_pytorch_with_copied_weights(case):
    import torch

    rng = _rng(17)
    bias = case != "no_bias"
    theirs = torch.nn.MultiheadAttention(8, 2, bias=bias, batch_first=True, dtype=torch.float64)
    ours = nn.MultiheadAttention(8, 2, bias=bias, rng=_rng(0), dtype=np.float64)
    ours.load_state_dict({name: value.detach().numpy() for name, value in theirs.state_dict().items()})
    x = rng.standard_normal((3, 5, 8))
    memory = rng.standard_normal((3, 4, 8)) if case == "cross" else x
    source = memory.shape[1]
    kwargs, their_kwargs = {}, {}
    if case == "bool_mask":
        mask = rng.random((5, source)) > 0.6
        mask[:, 0] = False
        kwargs = {"attn_mask": mask}
    elif case == "float_mask_per_head":
        kwargs = {"attn_mask": rng.standard_normal((6, 5, source))}
    elif case == "causal":
        kwargs = {"is_causal": True}
        their_kwargs = {"is_causal": True, "attn_mask": torch.tensor(np.triu(np.ones((5, 5), bool), 1))}
    their_kwargs = their_kwargs or {name: torch.tensor(value) for name, value in kwargs.items()}
    out, weights = ours(x, memory, memory, need_weights=True, **kwargs)
    expected, expected_weights = theirs(torch.tensor(x), torch.tensor(memory), torch.tensor(memory),
                                        need_weights=True, **their_kwargs)
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(weights.numpy(), expected_weights.detach().numpy(), rtol=1e-12, atol=1e-13)
    upstream = rng.standard_normal(out.shape)
    F.sum(F.mul(out, upstream)).backward()
    expected.backward(torch.tensor(upstream))
    their_parameters = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        np.testing.assert_allclose(np.asarray(parameter.grad), their_parameters[name].grad.numpy(), rtol=1e-10,
                                   atol=1e-12, err_msg=name)


# ---- tracing ------------------------------------------------------------------------------------------
class _TinyAttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, rng=_rng(18))
        self.head = nn.Linear(6, 3, rng=_rng(19))

    def forward(self, x):
        attended = self.attention(x, x, x, None, False, True)[0]
        mixed = F.scaled_dot_product_attention(attended, attended, F.matmul(attended, np.eye(6, dtype=np.float32)),
                                               None, True)
        return self.head(mixed)


def test_a_small_attention_model_traces_and_runs_as_eager():
    model = _TinyAttentionModel()
    gm = trace(model)
    targets = [n.target for n in gm.graph.nodes]
    assert "attention" in targets and F.scaled_dot_product_attention in targets and F.matmul in targets
    x = _rng(20).standard_normal((2, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(gm(x).numpy(), model(x).numpy())
