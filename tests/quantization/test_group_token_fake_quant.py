"""fake_quantize_per_group and fake_quantize_per_token: the formulas on hand-made cases and
against a per-element restatement (numpy only), the straight-through gradient, the refusals,
and, marked torch, torchao 0.18's IntxFakeQuantizer bit for bit (forward and gradient).

A float64 gradcheck is not meaningful here: the forward is piecewise constant in x (its true
derivative is 0 almost everywhere), and the backward is the straight-through estimator by
definition, so the tests check that estimator explicitly."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qatcore
from qatcore.errors import ConfigError
from qatcore.quantization import fake_quantize_per_group, fake_quantize_per_token
from qatcore.quantization.group_token_fake_quantize import group_qparams, token_qparams

F = np.float32
TORCHAO_MISSING = ("torchao is not installed; it is the reference for per-group and per-token fake "
                   "quantization (pip install torchao==0.18.0)")


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def make_input(seed: int, rows: int, columns: int, kind: str, exponent: int) -> np.ndarray:
    """Random rows scaled by 10**exponent, with row 0 (and, for "inf_row", the last) replaced
    by a special case: all zeros, a constant, +-1e30 alternating, 1e30, or a -1e30 first group."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, columns)) * 10.0**exponent).astype(F)
    if kind == "zeros":
        x[0] = 0
    elif kind == "constant":
        x[0] = F(rng.standard_normal() * 10.0**exponent)
    elif kind == "plus_minus_1e30":
        x[0, ::2], x[0, 1::2] = 1e30, -1e30
    elif kind == "inf_row":
        x[-1] = 1e30
    elif kind == "shifted":
        x[0] += F(1000)
        x[0, :16] = -1e30
    return x


KINDS = st.sampled_from(["random", "zeros", "constant", "plus_minus_1e30", "inf_row", "shifted"])
GROUP_SIZES = st.sampled_from([16, 32, 64, 128, 256])


# ---------------------------------------------------------------- the formulas, by hand (numpy)

def test_symmetric_group_scale_and_grid_by_hand():
    # int4 grid -8..7; s = max|x| / 7.5: group 1 s = 0.2 (inv 5), group 2 s = 0.4 (inv 2.5)
    x = np.array([[1.5, -0.3, 0.0, 0.7, -3.0, 0.9, 0.1, 0.2]], F)
    scale, zero_point = group_qparams(x.reshape(1, 2, 4), 4, True)
    assert scale.tolist() == [[F(1.5) / F(7.5), F(3.0) / F(7.5)]] and zero_point.tolist() == [[0.0, 0.0]]
    # 1.5 * 5 = 7.5 -> 8 -> clamped to 7; -0.3 * 5 = -1.5 -> -2 and 0.7 * 5 = 3.5 -> 4 (ties to even);
    # -3 * 2.5 = -7.5 -> -8; 0.9 * 2.5 = 2.25 -> 2; 0.25 -> 0; 0.5 -> 0
    q = np.array([[7, -2, 0, 4, -8, 2, 0, 0]], F)
    y = fake_quantize_per_group(x, group_size=4, bits=4)
    assert bits_equal(y, q * np.repeat(scale, 4, axis=1))


def test_symmetric_ties_round_to_even_and_multiply_by_the_inverse():
    # s = 1 / 7.5 (max 1.0, int4); 0.2 * inv = 1.5 -> 2 and 0.3333 * inv = 2.5 -> 2 (ties to even)
    x = np.array([[1.0, F(0.2), F(1 / 3), 0.0]], F)
    s = F(1.0) / F(7.5)
    inv = F(1) / s
    q = np.rint(x * inv)
    assert q[0, 1:3].tolist() == [np.rint(F(0.2) * inv), np.rint(F(1 / 3) * inv)]
    assert bits_equal(fake_quantize_per_group(x, 4, 4), np.clip(q, -8, 7) * s)


def test_all_zero_and_constant_groups():
    x = np.zeros((2, 32), F)
    x[1] = F(0.37)
    for symmetric in (True, False):
        y = fake_quantize_per_group(x, 16, 4, symmetric)
        assert bits_equal(y[0], np.zeros(32, F))
    # symmetric: a zero group has the smallest normal scale; a constant group reaches +c as 7.5 -> 7
    scale, _ = group_qparams(x.reshape(2, 2, 16), 4, True)
    assert scale[0].tolist() == [np.finfo(F).tiny] * 2
    assert bits_equal(fake_quantize_per_group(x, 16, 4)[1], np.full(32, F(7) * (F(0.37) / F(7.5))))
    # asymmetric groups (torchao's tinygemm rule): max - min = 0 gives s = 1e-6, z = int32(0.37 + 8e-6) = 0,
    # and 0.37 * 1e6 is far past qmax: the constant comes back as 7 * 1e-6
    scale, zero_point = group_qparams(x.reshape(2, 2, 16), 4, False)
    assert scale[1].tolist() == [F(1e-6)] * 2 and zero_point[1].tolist() == [0.0, 0.0]
    assert bits_equal(fake_quantize_per_group(x, 16, 4, False)[1], np.full(32, F(7) * F(1e-6)))


def test_asymmetric_group_zero_point_is_truncated_and_saturates_like_pytorch():
    # [1, 2, 3, 4], int4: s = 3 / 15 = 0.2, z = int32(1 + 0.2 * 8) = int32(2.6) = 2 (toward zero)
    x = np.array([[1.0, 2.0, 3.0, 4.0, -4.0, -3.0, -2.0, -1.0]], F)
    scale, zero_point = group_qparams(x.reshape(1, 2, 4), 4, False)
    s = F(3.0) / F(15)
    assert scale.tolist() == [[s, s]]
    assert zero_point.tolist() == [[float(np.trunc(F(1) + s * F(8))), float(np.trunc(F(-4) + s * F(8)))]]
    assert zero_point.tolist() == [[2.0, -2.0]]
    y = fake_quantize_per_group(x, 4, 4, symmetric=False)
    inv = F(1) / s
    expected = (np.clip(np.rint(x * inv) + zero_point.repeat(4, axis=1), -8, 7) - zero_point.repeat(4, axis=1)) * s
    assert bits_equal(y, expected)
    # a zero point outside int32 becomes -2^31, as PyTorch's float -> int32 conversion gives on x86
    big = np.array([[1e30, -1e30, 1e30, -1e30]], F)
    assert group_qparams(big.reshape(1, 1, 4), 4, False)[1].tolist() == [[-(2.0**31)]]


def test_per_token_asymmetric_by_hand():
    # [0, 1, 2.55], int8 (-128..127): s = 2.55 / 255 = 0.01, z = -128 - rne(0 / s) = -128
    x = np.array([[0.0, 1.0, 2.55], [-1.0, -1.0, -1.0]], F)
    scale, zero_point = token_qparams(x.reshape(2, 1, 3), 8, False)
    assert scale[:, 0].tolist() == [F(2.55) / F(255), F(1.0) / F(255)]
    # the second row's range widens to [-1, 0]: z = -128 - rne(-1 / s) = -128 + 255 = 127
    assert zero_point[:, 0].tolist() == [-128.0, 127.0]
    y = fake_quantize_per_token(x)
    assert bits_equal(y[1], np.full(3, (F(-128) - F(127)) * scale[1, 0]))
    s0 = scale[0, 0]
    assert bits_equal(y[0], (np.clip(np.rint(x[0] * (F(1) / s0)) - 128, -128, 127) + 128) * s0)
    # 4 bits: grid -8..7, qmax - qmin = 15
    assert token_qparams(x.reshape(2, 1, 3), 4, False)[0][0, 0] == F(2.55) / F(15)


def test_per_token_symmetric_is_the_symmetric_group_rule_over_the_row():
    x = make_input(3, 5, 48, "random", 0)
    assert bits_equal(fake_quantize_per_token(x, 6, symmetric=True), fake_quantize_per_group(x, 48, 6, True))


def test_any_leading_axes_quantize_like_the_flattened_rows():
    x = make_input(4, 6, 64, "random", 1).reshape(2, 3, 64)
    flat = x.reshape(6, 64)
    assert bits_equal(fake_quantize_per_group(x, 32, 3, False).reshape(6, 64),
                      fake_quantize_per_group(flat, 32, 3, False))
    assert bits_equal(fake_quantize_per_token(x).reshape(6, 64), fake_quantize_per_token(flat))


def _oracle(x: np.ndarray, group_size: int, bits: int, symmetric: bool, per_token: bool) -> np.ndarray:
    """The module docstring's formulas, one block and one element at a time in float32 scalars."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for start in range(0, x.shape[1], group_size):
            block = x[r, start:start + group_size]
            lo, hi = F(min(block)), F(max(block))
            if symmetric:
                amax = max(-min(lo, F(0)), max(hi, F(0)))
                s, z = max(F(amax / F((qmax - qmin) / 2)), np.finfo(F).tiny), F(0)
            elif per_token:
                mn, mx = min(lo, F(0)), max(hi, F(0))
                s = max(F((mx - mn) / F(qmax - qmin)), np.finfo(F).tiny)
                z = F(min(max(F(qmin) - np.rint(F(mn / s)), qmin), qmax))
            else:
                s = max(F((hi - lo) / F(2**bits - 1)), F(1e-6))
                v = F(lo + F(s * F(2 ** (bits - 1))))
                z = F(np.trunc(v)) if -(2.0**31) <= v < 2.0**31 else F(-(2.0**31))
            inv = F(F(1) / s)
            for i, value in enumerate(block):
                q = F(np.rint(F(value * inv)) + z)
                out[r, start + i] = F(F(min(max(q, F(qmin)), F(qmax)) - z) * s)
    return out


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 3), groups=st.integers(1, 2), group_size=GROUP_SIZES,
       bits=st.integers(2, 8), symmetric=st.booleans(), kind=KINDS, exponent=st.integers(-5, 5))
def test_matches_the_per_element_formulas(seed, rows, groups, group_size, bits, symmetric, kind, exponent):
    x = make_input(seed, rows, groups * group_size, kind, exponent)
    with np.errstate(over="ignore", invalid="ignore"):
        assert bits_equal(fake_quantize_per_group(x, group_size, bits, symmetric),
                          _oracle(x, group_size, bits, symmetric, per_token=False))
        assert bits_equal(fake_quantize_per_token(x, bits, symmetric),
                          _oracle(x, x.shape[1], bits, symmetric, per_token=True))


# ---------------------------------------------------------------- the straight-through gradient

def _straight_through(x, g, group_size, bits, symmetric, per_token):
    """torchao's STE restated: dx = where(qmin <= q <= qmax, g * s, 0) * inv, q unclamped."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    size = x.shape[-1] if per_token else group_size
    blocks = x.reshape(x.shape[0], -1, size)
    scale, zero_point = (token_qparams if per_token else group_qparams)(blocks, bits, symmetric)
    s, z = scale[..., None], zero_point[..., None]
    inv = F(1) / s
    q = np.rint(blocks * inv) + z
    dx = np.where((q >= qmin) & (q <= qmax), g.reshape(blocks.shape) * s, F(0)) * inv
    return dx.reshape(x.shape), np.broadcast_to(s, blocks.shape).reshape(x.shape)


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 3), group_size=GROUP_SIZES, bits=st.integers(2, 8),
       symmetric=st.booleans(), kind=KINDS)
def test_gradient_is_the_straight_through_one(seed, rows, group_size, bits, symmetric, kind):
    x = make_input(seed, rows, 2 * group_size, kind, 0)
    g = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(F)
    for per_token in (False, True):
        t = qatcore.tensor(x, requires_grad=True)
        y = fake_quantize_per_token(t, bits, symmetric) if per_token else fake_quantize_per_group(
            t, group_size, bits, symmetric)
        assert bits_equal(y.data, fake_quantize_per_token(x, bits, symmetric) if per_token
                          else fake_quantize_per_group(x, group_size, bits, symmetric))
        y.backward(g)
        with np.errstate(over="ignore", invalid="ignore"):
            expected, scale = _straight_through(x, g, group_size, bits, symmetric, per_token)
        assert bits_equal(t.grad, expected)
        # inside the grid the gradient is g up to float32 rounding ((g * s) * inv rounds twice), except in
        # an all-zero block, whose scale is the smallest normal float32 and g * s a less precise subnormal
        passed = (expected != 0) & (scale > np.finfo(F).tiny)
        assert np.allclose(t.grad[passed], g[passed], rtol=1e-6, atol=0)


def test_gradient_by_hand_clipped_elements_get_zero():
    # int2 symmetric, group [1.0, -0.5, 0.2, 0.0]: s = 1 / 1.5, 1.0 * inv = 1.5 -> 2 > qmax = 1 is clipped
    t = qatcore.tensor([[1.0, -0.5, 0.2, 0.0]], requires_grad=True)
    fake_quantize_per_group(t, 4, 2).sum().backward()
    assert t.grad.tolist() == [[0.0, 1.0, 1.0, 1.0]]
    # per token int8 asymmetric: every element lies inside its own row's range, so all pass
    t = qatcore.tensor([[0.3, -2.0, 5.0]], requires_grad=True)
    fake_quantize_per_token(t).backward(np.array([[2.0, 3.0, 4.0]], F))
    assert np.allclose(t.grad, [[2.0, 3.0, 4.0]], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("call, match", [
    (lambda x: fake_quantize_per_group(x, 24, 4), r"last axis \(64, shape \(2, 64\)\) is not divisible by "
                                                  "group_size=24"),
    (lambda x: fake_quantize_per_group(x, 0, 4), "group_size must be a positive int, got 0"),
    (lambda x: fake_quantize_per_group(x, -16, 4), "group_size must be a positive int, got -16"),
    (lambda x: fake_quantize_per_group(x, 16.0, 4), "group_size must be a positive int"),
    (lambda x: fake_quantize_per_group(x, 16, 1), "bits must be an int from 2 to 8, got 1"),
    (lambda x: fake_quantize_per_group(x, 16, 9), "bits must be an int from 2 to 8, got 9"),
    (lambda x: fake_quantize_per_token(x, bits=16), "fake_quantize_per_token: bits must be an int from 2 to 8"),
    (lambda x: fake_quantize_per_token(x, bits=True), "bits must be an int from 2 to 8, got True"),
    (lambda x: fake_quantize_per_token(x, symmetric="yes"), "symmetric must be True or False"),
    (lambda x: fake_quantize_per_token(x.astype(np.int32)), "x must be a float32 or float64.*int32"),
    (lambda x: fake_quantize_per_group(qatcore.tensor(x.astype(np.int64)), 16, 4), "x must be a float.*int64"),
    (lambda x: fake_quantize_per_token(x[:, :0]), "non-empty last axis"),
    (lambda x: fake_quantize_per_token(np.float32(1.0)), "non-empty last axis"),
])
def test_refusals_name_the_argument_and_what_was_expected(call, match):
    with pytest.raises(ConfigError, match=match):
        call(np.ones((2, 64), F))


# ---------------------------------------------------------------- torchao 0.18, bit for bit

def _torchao_quantizer(bits: int, granularity: str, group_size: int = 0, symmetric: bool = True):
    """torchao's IntxFakeQuantizer for torch.int{bits}; under --require-torch a missing torchao
    fails the test (the skip becomes a failure in tests/conftest.py)."""
    import torch

    pytest.importorskip("torchao", reason=TORCHAO_MISSING)
    from torchao.quantization.granularity import PerAxis, PerGroup, PerToken
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    kind = {"group": lambda: PerGroup(group_size), "token": PerToken, "channel": lambda: PerAxis(0)}[granularity]()
    return IntxFakeQuantizer(IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), kind, is_symmetric=symmetric))


def _reference(quantizer, x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    tx = torch.tensor(x, requires_grad=True)
    y = quantizer(tx)
    y.backward(torch.tensor(g))
    return y.detach().numpy(), tx.grad.numpy()


def _ours(function, x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = qatcore.tensor(x, requires_grad=True)
    y = function(t)
    y.backward(g)
    return y.data, t.grad


@pytest.mark.torch
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 4), groups=st.integers(1, 3), group_size=GROUP_SIZES,
       bits=st.integers(2, 8), symmetric=st.booleans(), kind=KINDS, exponent=st.integers(-6, 6))
def test_per_group_equals_torchao_bit_for_bit(seed, rows, groups, group_size, bits, symmetric, kind, exponent):
    import torch  # noqa: F401  (the reference; torchao is imported by _torchao_quantizer)

    x = make_input(seed, rows, groups * group_size, kind, exponent)
    g = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(F)
    quantizer = _torchao_quantizer(bits, "group", group_size, symmetric)
    y_ref, dx_ref = _reference(quantizer, x, g)
    y, dx = _ours(lambda t: fake_quantize_per_group(t, group_size, bits, symmetric), x, g)
    assert bits_equal(y, y_ref)
    assert bits_equal(dx, dx_ref)


@pytest.mark.torch
@given(seed=st.integers(0, 2**16), leading=st.sampled_from([(1,), (3,), (2, 3)]), columns=st.integers(2, 300),
       bits=st.integers(2, 8), kind=KINDS, exponent=st.integers(-6, 6))
def test_per_token_equals_torchao_bit_for_bit(seed, leading, columns, bits, kind, exponent):
    import torch  # noqa: F401  (the reference; torchao is imported by _torchao_quantizer)

    rows = int(np.prod(leading))
    x = make_input(seed, rows, max(columns, 16) if kind == "shifted" else columns, kind, exponent)
    x = x.reshape(*leading, x.shape[-1])
    g = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(F)
    y_ref, dx_ref = _reference(_torchao_quantizer(bits, "token", symmetric=False), x, g)
    y, dx = _ours(lambda t: fake_quantize_per_token(t, bits), x, g)
    assert bits_equal(y, y_ref)
    assert bits_equal(dx, dx_ref)


@pytest.mark.torch
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 4), columns=st.integers(2, 300), bits=st.integers(2, 8),
       kind=KINDS)
def test_symmetric_per_token_equals_torchao_per_channel(seed, rows, columns, bits, kind):
    # torchao raises NotImplementedError for symmetric PerToken; PerAxis(0) is the same rule over each row
    import torch  # noqa: F401  (the reference; torchao is imported by _torchao_quantizer)

    x = make_input(seed, rows, max(columns, 16) if kind == "shifted" else columns, kind, 0)
    g = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(F)
    y_ref, dx_ref = _reference(_torchao_quantizer(bits, "channel", symmetric=True), x, g)
    y, dx = _ours(lambda t: fake_quantize_per_token(t, bits, symmetric=True), x, g)
    assert bits_equal(y, y_ref)
    assert bits_equal(dx, dx_ref)
