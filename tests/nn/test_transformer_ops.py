"""LayerNorm, RMSNorm, GELU (both forms), SiLU and Embedding: float64 gradient checks, the
forward formulas, the layers, and the argument errors; PyTorch float64 parity (forward and
gradients) for each, marked ``torch``."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qatcore.nn.functional as F
from qatcore import nn
from qatcore.autograd import gradcheck
from qatcore.errors import ConfigError, DTypeError, QATCoreError, ShapeError
from qatcore.tensor import Tensor


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---- gradient checks -----------------------------------------------------------------------------
@given(st.integers(1, 3), st.integers(0, 2**16))
def test_layer_norm_gradients(normalized_ndim, seed):
    rng = _rng(seed)
    shape = (2, 3, 4, 5)[: 1 + normalized_ndim] if normalized_ndim < 3 else (2, 3, 4, 5)
    normalized = shape[-normalized_ndim:]
    x, w, b = rng.normal(size=shape), rng.normal(size=normalized), rng.normal(size=normalized)
    assert gradcheck(lambda x, w, b: F.layer_norm(x, normalized, w, b, 1e-5), [x, w, b])
    assert gradcheck(lambda x: F.layer_norm(x, normalized), [x])


@given(st.integers(1, 2), st.integers(0, 2**16))
def test_rms_norm_gradients(normalized_ndim, seed):
    rng = _rng(seed)
    shape = (3, 4, 5)
    normalized = shape[-normalized_ndim:]
    x, w = rng.normal(size=shape), rng.normal(size=normalized)
    assert gradcheck(lambda x, w: F.rms_norm(x, normalized, w, 1e-6), [x, w])
    assert gradcheck(lambda x: F.rms_norm(x, normalized), [x])


@pytest.mark.parametrize("fn", [F.gelu, lambda t: F.gelu(t, approximate="tanh"), F.silu],
                         ids=["gelu", "gelu_tanh", "silu"])
def test_smooth_activation_gradients(fn):
    x = np.concatenate([np.linspace(-8, 8, 41), _rng().normal(size=20) * 3])
    assert gradcheck(fn, [x])


def test_embedding_gradient_scatter_adds_repeated_indices():
    indices = np.array([[1, 3, 1], [0, 1, 4]])
    weight = _rng().normal(size=(5, 3))
    assert gradcheck(lambda w: F.embedding(indices, w), [weight])
    w = Tensor(weight, requires_grad=True)
    F.sum(F.embedding(indices, w)).backward()
    np.testing.assert_array_equal(w.grad[:, 0], [1, 3, 0, 1, 1])  # row 1 looked up three times
    w.grad = None
    # with padding_idx the row is still looked up but, by definition, never gets a gradient
    F.sum(F.embedding(indices, w, padding_idx=-4)).backward()  # -4 is row 1
    np.testing.assert_array_equal(w.grad[:, 0], [1, 0, 0, 1, 1])


# ---- forward formulas ----------------------------------------------------------------------------
def test_layer_norm_is_the_biased_variance_formula():
    x = _rng().normal(size=(4, 6)) * 3 + 1
    w, b = _rng(1).normal(size=6), _rng(2).normal(size=6)
    mu = x.mean(axis=1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
    expected = (x - mu) / np.sqrt(var + 0.1) * w + b
    np.testing.assert_allclose(F.layer_norm(x, 6, w, b, eps=0.1).numpy(), expected, rtol=1e-12)


def test_rms_norm_default_eps_is_the_dtype_epsilon():
    x = np.array([[1e-5, -2e-5, 0.0]], np.float32)
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean() + np.finfo(np.float32).eps)
    np.testing.assert_allclose(F.rms_norm(x, (3,)).numpy(), expected, rtol=1e-5)
    assert F.rms_norm(x, (3,)).dtype == np.float32


def test_gelu_values_and_dtypes():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    phi = np.array([0.0013498980316301, 0.15865525393145707, 0.5, 0.6914624612740131, 0.9772498680518208])
    np.testing.assert_allclose(F.gelu(x).numpy(), x * phi, rtol=1e-13)
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(F.gelu(x, "tanh").numpy(), tanh_form, rtol=1e-13)
    for fn in (F.gelu, lambda t: F.gelu(t, "tanh"), F.silu):
        assert fn(x.astype(np.float32)).dtype == np.float32


def test_silu_does_not_overflow():
    y = F.silu(np.array([-1000.0, 1000.0], np.float32)).numpy()
    np.testing.assert_array_equal(y, [-0.0, 1000.0])


# ---- layers --------------------------------------------------------------------------------------
def test_layers_have_pytorch_parameters_and_defaults():
    ln = nn.LayerNorm((3, 4))
    assert ln.weight.shape == (3, 4) and np.all(ln.weight.data == 1) and np.all(ln.bias.data == 0)
    assert ln.eps == 1e-5
    assert nn.LayerNorm(4, bias=False).bias is None
    assert nn.LayerNorm(4, elementwise_affine=False).weight is None
    assert [name for name, _ in nn.RMSNorm(4).named_parameters()] == ["weight"]
    assert nn.RMSNorm(4, elementwise_affine=False).weight is None
    table = nn.Embedding(1000, 16, padding_idx=3, rng=_rng(7))
    assert table.weight.shape == (1000, 16) and np.all(table.weight.data[3] == 0)
    values = np.delete(table.weight.data, 3, axis=0)
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02  # N(0, 1), as PyTorch
    again = nn.Embedding(1000, 16, padding_idx=3, rng=_rng(7))
    np.testing.assert_array_equal(again.weight.data, table.weight.data)


def test_layers_compute_their_functional_op():
    x = _rng().normal(size=(2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(nn.LayerNorm(4)(x).numpy(), F.layer_norm(x, (4,), eps=1e-5).numpy())
    np.testing.assert_array_equal(nn.RMSNorm((3, 4), eps=1e-3)(x).numpy(), F.rms_norm(x, (3, 4), eps=1e-3).numpy())
    np.testing.assert_array_equal(nn.GELU("tanh")(x).numpy(), F.gelu(x, "tanh").numpy())
    np.testing.assert_array_equal(nn.SiLU()(x).numpy(), F.silu(x).numpy())
    table = nn.Embedding(5, 2, rng=_rng())
    np.testing.assert_array_equal(table(np.array([4, 0])).numpy(), table.weight.data[[4, 0]])


# ---- argument errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("call, error, message", [
    (lambda: F.layer_norm(np.zeros((2, 3)), (4,)), ShapeError, r"does not end with normalized_shape \(4,\)"),
    (lambda: F.layer_norm(np.zeros((2, 3)), ()), ConfigError, "normalized_shape must be a positive int"),
    (lambda: F.layer_norm(np.zeros((2, 3)), 3, np.ones(2)), ShapeError, "weight has shape"),
    (lambda: F.layer_norm(np.zeros((2, 3)), 3, None, np.ones(3, np.float32)), DTypeError, "bias dtype float32"),
    (lambda: F.layer_norm(np.zeros((2, 3)), 3, eps=-1.0), ConfigError, "eps must be a number >= 0"),
    (lambda: F.layer_norm(np.zeros((2, 3), np.int64), 3), DTypeError, "layer_norm: input must be a floating"),
    (lambda: F.rms_norm(np.zeros((2, 3)), (2, 3, 1)), ShapeError, "rms_norm: input of shape"),
    (lambda: F.rms_norm(np.zeros((2, 3)), 3, eps="small"), ConfigError, "rms_norm: eps"),
    (lambda: F.gelu(np.zeros(2), approximate="erf"), ConfigError, r"approximate must be one of \('none', 'tanh'\)"),
    (lambda: F.silu(np.zeros(2, np.int32)), DTypeError, "silu: input must be a floating"),
    (lambda: F.embedding(np.array([0.5]), np.zeros((3, 2))), DTypeError, "input must hold integer indices"),
    (lambda: F.embedding(np.array([3]), np.zeros((3, 2))), ShapeError, r"must lie in \[0, 2\]"),
    (lambda: F.embedding(np.array([0]), np.zeros(3)), ShapeError, "weight must be 2-D"),
    (lambda: F.embedding(np.array([0]), np.zeros((3, 2)), padding_idx=3), ConfigError, "padding_idx must be"),
    (lambda: nn.LayerNorm(0), ConfigError, "LayerNorm: normalized_shape"),
    (lambda: nn.RMSNorm(4, eps=-0.5), ConfigError, "RMSNorm: eps"),
    (lambda: nn.GELU("fast"), ConfigError, "GELU: approximate"),
    (lambda: nn.Embedding(0, 4), ConfigError, "Embedding: num_embeddings must be a positive int"),
    (lambda: nn.Embedding(4, 4, padding_idx=9), ConfigError, "Embedding: padding_idx"),
])
def test_bad_arguments_are_refused_by_name(call, error, message):
    with pytest.raises(error, match=message) as caught:
        call()
    assert isinstance(caught.value, QATCoreError)


# ---- PyTorch float64 parity ----------------------------------------------------------------------
def _grads(*tensors):
    return [t.grad for t in tensors]


@pytest.mark.torch
@pytest.mark.parametrize("normalized", [(6,), (4, 6)])
def test_layer_norm_matches_pytorch(normalized):
    import torch

    rng = _rng(3)
    x, w, b, g = (rng.normal(size=s) for s in ((2, 4, 6), normalized, normalized, (2, 4, 6)))
    ours = [Tensor(a, requires_grad=True) for a in (x, w, b)]
    out = F.layer_norm(*ours[:1], normalized, *ours[1:], eps=1e-3)
    F.sum(F.mul(out, g)).backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    ref = torch.nn.functional.layer_norm(theirs[0], normalized, theirs[1], theirs[2], eps=1e-3)
    (ref * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-12, atol=1e-13)
    for mine, reference in zip(_grads(*ours), _grads(*theirs)):
        np.testing.assert_allclose(mine, reference.numpy(), rtol=1e-11, atol=1e-12)


@pytest.mark.torch
@pytest.mark.parametrize("eps", [None, 1e-4])
def test_rms_norm_matches_pytorch(eps):
    import torch

    rng = _rng(4)
    x, w, g = rng.normal(size=(3, 5, 8)) * 1e-3, rng.normal(size=(5, 8)), rng.normal(size=(3, 5, 8))
    ours = [Tensor(a, requires_grad=True) for a in (x, w)]
    out = F.rms_norm(ours[0], (5, 8), ours[1], eps)
    F.sum(F.mul(out, g)).backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, w)]
    ref = torch.nn.functional.rms_norm(theirs[0], (5, 8), theirs[1], eps)
    (ref * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-12, atol=1e-13)
    for mine, reference in zip(_grads(*ours), _grads(*theirs)):
        np.testing.assert_allclose(mine, reference.numpy(), rtol=1e-11, atol=1e-12)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu"])
def test_activations_match_pytorch(name):
    import torch

    ours_fn, theirs_fn = {
        "gelu": (F.gelu, torch.nn.functional.gelu),
        "gelu_tanh": (lambda t: F.gelu(t, "tanh"), lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
        "silu": (F.silu, torch.nn.functional.silu),
    }[name]
    x = np.concatenate([np.linspace(-12, 12, 97), _rng(5).normal(size=200) * 4])
    g = _rng(6).normal(size=x.shape)
    mine = Tensor(x, requires_grad=True)
    out = ours_fn(mine)
    F.sum(F.mul(out, g)).backward()
    theirs = torch.tensor(x, requires_grad=True)
    ref = theirs_fn(theirs)
    (ref * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(mine.grad, theirs.grad.numpy(), rtol=1e-13, atol=1e-13)


@pytest.mark.torch
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_matches_pytorch(padding_idx):
    import torch

    rng = _rng(8)
    indices = rng.integers(0, 7, size=(4, 9))
    weight, g = rng.normal(size=(7, 5)), rng.normal(size=(4, 9, 5))
    mine = Tensor(weight, requires_grad=True)
    out = F.embedding(indices, mine, padding_idx)
    F.sum(F.mul(out, g)).backward()
    theirs = torch.tensor(weight, requires_grad=True)
    ref = torch.nn.functional.embedding(torch.from_numpy(indices), theirs, padding_idx)
    (ref * torch.from_numpy(g)).sum().backward()
    np.testing.assert_array_equal(out.numpy(), ref.detach().numpy())
    np.testing.assert_allclose(mine.grad, theirs.grad.numpy(), rtol=1e-14, atol=1e-15)


@pytest.mark.torch
def test_layers_match_pytorch_layers():
    import torch

    x = _rng(9).normal(size=(2, 3, 8))
    pairs = [(nn.LayerNorm(8, eps=1e-6, dtype=np.float64), torch.nn.LayerNorm(8, eps=1e-6, dtype=torch.float64)),
             (nn.RMSNorm(8, dtype=np.float64), torch.nn.RMSNorm(8, dtype=torch.float64)),
             (nn.GELU("tanh"), torch.nn.GELU("tanh")), (nn.SiLU(), torch.nn.SiLU())]
    for ours, theirs in pairs:
        if getattr(ours, "weight", None) is not None:
            ours.weight.data[...] = _rng(10).normal(size=8)
            theirs.weight.data.copy_(torch.from_numpy(ours.weight.data))
        np.testing.assert_allclose(ours(x).numpy(), theirs(torch.from_numpy(x)).detach().numpy(), rtol=1e-12,
                                   atol=1e-13)
