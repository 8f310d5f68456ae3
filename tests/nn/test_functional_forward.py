"""Forward values of the functional ops against NumPy formulas (and against
PyTorch where it is installed), including non-contiguous inputs."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qatcore
import qatcore.nn.functional as F
from qatcore.errors import ConfigError, DTypeError, ShapeError


def conv2d_oracle(x, w, b, stride, padding, dilation, groups):
    n, c, h, wd = x.shape
    k, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, k, oh, ow), dtype=np.float64)
    kpg = k // groups
    for o in range(k):
        g = o // kpg
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg,
                           i * dilation: i * dilation + stride * (oh - 1) + 1: stride,
                           j * dilation: j * dilation + stride * (ow - 1) + 1: stride]
                out[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, i, j])
        if b is not None:
            out[:, o] += b[o]
    return out


@given(st.integers(1, 2), st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 2),
       st.integers(0, 2), st.integers(1, 2), st.booleans(), st.integers(0, 2**16))
def test_conv2d_matches_oracle(n, groups, k, stride, padding, dilation, bias, seed):
    rng = np.random.default_rng(seed)
    c, kout = 2 * groups, 2 * groups
    h = w = 7
    if padding > (dilation * (k - 1)) // 2 + 1:
        padding = 0
    x_full = rng.normal(size=(n, c, 2 * h, w)).astype(np.float32)
    x = x_full[:, :, ::2, :]  # non-contiguous view
    weight = rng.normal(size=(kout, c // groups, k, k)).astype(np.float32)
    b = rng.normal(size=kout).astype(np.float32) if bias else None
    out = F.conv2d(x, weight, b, stride, padding, dilation, groups).numpy()
    expected = conv2d_oracle(x.astype(np.float64), weight.astype(np.float64),
                             None if b is None else b.astype(np.float64), stride, padding, dilation, groups)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_conv2d_validation_messages():
    x = np.zeros((1, 3, 5, 5), dtype=np.float32)
    with pytest.raises(ShapeError, match="3 channels"):
        F.conv2d(x, np.zeros((4, 2, 3, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="groups"):
        F.conv2d(x, np.zeros((4, 1, 3, 3), dtype=np.float32), groups=3)
    with pytest.raises(ShapeError, match="does not fit"):
        F.conv2d(x, np.zeros((4, 3, 7, 7), dtype=np.float32))
    with pytest.raises(ShapeError, match="bias"):
        F.conv2d(x, np.zeros((4, 3, 3, 3), dtype=np.float32), np.zeros(3, dtype=np.float32))
    with pytest.raises(ConfigError, match="stride"):
        F.conv2d(x, np.zeros((4, 3, 3, 3), dtype=np.float32), stride=0)
    with pytest.raises(DTypeError):
        F.conv2d(x.astype(np.int32), np.zeros((4, 3, 3, 3), dtype=np.float32))


def test_pools_match_oracle():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    mp = F.max_pool2d(x, 2).numpy()
    np.testing.assert_array_equal(mp, x.reshape(2, 3, 3, 2, 3, 2).max(axis=(3, 5)))
    ap = F.avg_pool2d(x, 3).numpy()
    np.testing.assert_allclose(ap, x.reshape(2, 3, 2, 3, 2, 3).mean(axis=(3, 5)), rtol=1e-5, atol=1e-7)
    gp = F.adaptive_avg_pool2d(x, 1).numpy()
    np.testing.assert_allclose(gp, x.mean(axis=(2, 3), keepdims=True), rtol=1e-6)
    with pytest.raises(ConfigError, match="padding"):
        F.max_pool2d(x, 2, padding=2)


def test_softmax_cross_entropy_values():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    p = F.softmax(qatcore.tensor(logits), 1).numpy()
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    target = np.array([2, 0])
    ce = F.cross_entropy(logits, target, reduction="none").numpy()
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(ce, -logp[[0, 1], target], rtol=1e-6, atol=1e-6)
    smooth = F.cross_entropy(logits, target, reduction="mean", label_smoothing=0.2).item()
    expected = np.mean(0.8 * -logp[[0, 1], target] + 0.2 * -logp.mean(axis=1))
    assert smooth == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_target_errors():
    logits = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ShapeError, match=r"\[0, 2\]"):
        F.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(DTypeError, match="integer"):
        F.cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(ShapeError, match="shape"):
        F.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match="reduction"):
        F.cross_entropy(logits, np.array([0, 1]), reduction="avg")


def test_elementwise_values():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 7.0], dtype=np.float32)
    t = qatcore.tensor(x)
    np.testing.assert_array_equal(F.relu(t).numpy(), np.maximum(x, 0))
    np.testing.assert_array_equal(F.relu6(t).numpy(), np.clip(x, 0, 6))
    np.testing.assert_allclose(F.leaky_relu(t, 0.1).numpy(), np.where(x > 0, x, 0.1 * x))
    np.testing.assert_allclose(F.sigmoid(t).numpy(), 1 / (1 + np.exp(-x)), rtol=1e-6)
    big = F.sigmoid(qatcore.tensor([-1000.0, 1000.0])).numpy()
    np.testing.assert_array_equal(big, [0.0, 1.0])
    np.testing.assert_allclose(F.tanh(t).numpy(), np.tanh(x))
    np.testing.assert_array_equal(F.hardswish(t).numpy(), x * np.clip(x + np.float32(3), 0, 6) / np.float32(6))
    np.testing.assert_array_equal(F.hardsigmoid(t).numpy(), np.clip(x + np.float32(3), 0, 6) / np.float32(6))
    np.testing.assert_array_equal(F.clamp(t, -1, 1).numpy(), np.clip(x, -1, 1))


def test_var_matches_numpy():
    x = np.random.default_rng(1).normal(size=(3, 4, 5))
    np.testing.assert_allclose(F.var(x, (0, 2)).numpy(), x.var(axis=(0, 2), ddof=1))
    np.testing.assert_allclose(F.var(x, 1, True, correction=0).numpy(), x.var(axis=1, ddof=0, keepdims=True))


def test_reshape_errors():
    t = qatcore.tensor(np.zeros((2, 3)))
    assert F.reshape(t, (3, -1)).shape == (3, 2)
    with pytest.raises(ShapeError):
        F.reshape(t, (4, -1))
    with pytest.raises(ShapeError):
        F.reshape(t, (-1, -1))


@pytest.mark.torch
@pytest.mark.parametrize("case", ["conv", "depthwise", "pool", "bn", "ce"])
def test_against_pytorch(case):
    import torch
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6, 9, 9)).astype(np.float32)
    if case in ("conv", "depthwise"):
        groups = 2 if case == "conv" else 6
        w = rng.normal(size=(6, 6 // groups, 3, 3)).astype(np.float32)
        b = rng.normal(size=6).astype(np.float32)
        ours = F.conv2d(x, w, b, stride=2, padding=1, dilation=1, groups=groups).numpy()
        ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                         stride=2, padding=1, groups=groups).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    elif case == "pool":
        np.testing.assert_array_equal(
            F.max_pool2d(x, 3, 2, 1).numpy(),
            torch.nn.functional.max_pool2d(torch.from_numpy(x), 3, 2, 1).numpy())
        np.testing.assert_allclose(
            F.avg_pool2d(x, 3, 2, 1, count_include_pad=False).numpy(),
            torch.nn.functional.avg_pool2d(torch.from_numpy(x), 3, 2, 1, count_include_pad=False).numpy(),
            rtol=1e-6)
    elif case == "bn":
        rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
        trm, trv = torch.zeros(6), torch.ones(6)
        ours = F.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5).numpy()
        ref = torch.nn.functional.batch_norm(
            torch.from_numpy(x), trm, trv, None, None, True, 0.1, 1e-5).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-5)
    else:
        logits = rng.normal(size=(8, 5)).astype(np.float32)
        target = rng.integers(0, 5, size=8)
        ours = F.cross_entropy(logits, target, label_smoothing=0.1).item()
        ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target),
                                                label_smoothing=0.1).item()
        assert ours == pytest.approx(ref, rel=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["hardswish", "hardsigmoid"])
def test_hard_activations_equal_pytorch(name, dtype):
    import torch

    x = np.concatenate([np.linspace(-5, 5, 1001), [-3.0, 3.0, 0.0]]).astype(dtype)
    expected = getattr(torch.nn.functional, name)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(getattr(F, name)(qatcore.tensor(x)).numpy(), expected)


@pytest.mark.torch
@pytest.mark.parametrize("shape, stride, padding, dilation", [
    ((2, 96, 32, 32), 1, 1, 1),   # MobileNetV2's depthwise layers: 3x3, padding 1
    ((2, 144, 32, 32), 2, 1, 1),
    ((2, 960, 4, 4), 1, 1, 1),
    ((3, 5, 1, 1), 1, 1, 1),      # 1x1 input
    ((2, 4, 2, 3), 1, 2, 1),      # 5x5 kernel larger than the input
    ((2, 3, 9, 8), (2, 1), (2, 1), 2),
])
def test_depthwise_conv2d_against_pytorch_float64(shape, stride, padding, dilation):
    """Output and the x, weight and bias gradients of a depthwise conv2d (groups == C == K)
    against torch in float64."""
    import torch
    rng = np.random.default_rng(21)
    channels = shape[1]
    kernel = 5 if shape[2] == 2 else 3
    x = rng.normal(size=shape)
    w = rng.normal(size=(channels, 1, kernel, kernel))
    b = rng.normal(size=channels)
    ours_x, ours_w, ours_b = (qatcore.tensor(a, requires_grad=True) for a in (x, w, b))
    out = F.conv2d(ours_x, ours_w, ours_b, stride, padding, dilation, channels)
    g = rng.normal(size=out.shape)
    (out * qatcore.tensor(g)).sum().backward()
    ref_x, ref_w, ref_b = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ref = torch.nn.functional.conv2d(ref_x, ref_w, ref_b, stride, padding, dilation, channels)
    ref.backward(torch.from_numpy(g))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    for ours, theirs in ((ours_x, ref_x), (ours_w, ref_w), (ours_b, ref_b)):
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-11, atol=1e-11)
