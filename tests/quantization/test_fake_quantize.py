"""The differentiable fake-quant op and the FakeQuantize module."""

import numpy as np
import pytest

import qatcore
from qatcore.autograd import gradcheck
from qatcore.errors import ConfigError, ObserverError, ShapeError
from qatcore.quantization import FakeQuantize, QScheme, QuantSpec, fake_quantize, fake_quantize_learnable


def oracle(x, s, z, qmin, qmax):
    inv = np.float32(1) / np.float32(s)
    q = np.rint(np.float32(x) * inv) + np.float32(z)
    return (np.clip(q, qmin, qmax) - np.float32(z)).astype(np.float32) * np.float32(s), (q >= qmin) & (q <= qmax)


def test_array_in_array_out_and_tie_vectors():
    x = np.array([0.25, -0.15, 0.273939937], dtype=np.float32)
    y = fake_quantize(x[:2], 0.1, 0, -128, 127)
    np.testing.assert_array_equal(y, np.float32([0.2, -0.2]) * np.float32(1))  # 2.5 -> 2, -1.5 -> -2
    s = np.float32(0.00214854861)
    assert fake_quantize(x[2:], s, 0, -32768, 32767)[0] == np.float32(128) * s


def test_ste_gradient_is_the_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, size=(5, 6)).astype(np.float32)
    t = qatcore.tensor(x, requires_grad=True)
    out = fake_quantize(t, 0.05, 3, -8, 7)
    expected, mask = oracle(x, 0.05, 3, -8, 7)
    np.testing.assert_array_equal(out.numpy(), expected)
    g = rng.normal(size=x.shape).astype(np.float32)
    out.backward(g)
    np.testing.assert_array_equal(t.grad, g * mask)


def test_per_channel_along_each_axis():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    for axis in range(3):
        scale = rng.uniform(0.01, 0.1, size=x.shape[axis]).astype(np.float32)
        zero = rng.integers(-3, 3, size=x.shape[axis])
        y = fake_quantize(x, scale, zero, -8, 7, axis=axis)
        shape = [1, 1, 1]
        shape[axis] = -1
        expected, _ = oracle(x, scale.reshape(shape), zero.reshape(shape), -8, 7)
        np.testing.assert_array_equal(y, expected)


def test_learnable_gradients_follow_the_lsq_table():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, size=200).astype(np.float32)
    s, z, qmin, qmax, g = np.float32(0.1), np.float32(2.0), -8, 7, 0.5
    t = qatcore.tensor(x, requires_grad=True)
    scale = qatcore.tensor(np.array([s]), requires_grad=True)
    zero = qatcore.tensor(np.array([z]), requires_grad=True)
    dy = rng.normal(size=x.shape).astype(np.float32)
    fake_quantize_learnable(t, scale, zero, qmin, qmax, grad_factor=g).backward(dy)
    inv = np.float32(1) / s
    q = np.rint(x * inv) + z
    low, high = q < qmin, q > qmax
    inside = ~(low | high)
    dscale = np.where(low, dy * (qmin - z) * g, np.where(high, dy * (qmax - z) * g,
                      dy * ((q - z) * s - x) * inv * g))
    dzero = np.where(inside, 0.0, -dy * s * g)
    np.testing.assert_allclose(scale.grad, [dscale.astype(np.float64).sum()], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(zero.grad, [dzero.astype(np.float64).sum()], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t.grad, dy * inside)
    assert low.any() and high.any()


def _lsq_scale_grad(x, w, s, qmin, qmax, z=0.0):
    scale = qatcore.tensor(np.array([s], dtype=np.float32), requires_grad=True)
    fake_quantize_learnable(qatcore.tensor(x.astype(np.float32)), scale,
                            qatcore.tensor(np.full(1, z, np.float32)), qmin, qmax, grad_factor=1.0
                            ).backward(w.astype(np.float32))
    return float(scale.grad[0])


def test_lsq_scale_gradient_matches_finite_differences_where_clipped():
    # every value clipped: y = (qclip - z) * s exactly, no straight-through estimate involved
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(2, 3, 20), rng.uniform(-3, -2, 20)])
    w = rng.normal(size=40)
    qmin, qmax, s = -8, 7, 0.1

    def f(scale):
        return np.sum(w * np.clip(np.rint(x / scale), qmin, qmax) * scale)

    numeric = (f(s + 1e-7) - f(s - 1e-7)) / 2e-7
    assert _lsq_scale_grad(x, w, s, qmin, qmax) == pytest.approx(numeric, rel=1e-5)


def test_lsq_scale_gradient_matches_finite_differences_of_the_ste_surrogate():
    # inside the range LSQ differentiates round() as the identity: the surrogate
    # y(s) = s * (round(x/s0) - x/s0) + x has exactly the LSQ derivative at s0
    rng = np.random.default_rng(4)
    x = rng.uniform(-0.5, 0.5, 60)
    w = rng.normal(size=60)
    s0, qmin, qmax = 0.0937, -8, 7
    frozen = np.rint(x / s0) - x / s0

    def surrogate(scale):
        return np.sum(w * (scale * frozen + x))

    numeric = (surrogate(s0 + 1e-6) - surrogate(s0 - 1e-6)) / 2e-6
    assert np.all(np.abs(np.rint(x / s0)) <= 7)  # all inside
    assert _lsq_scale_grad(x, w, s0, qmin, qmax) == pytest.approx(numeric, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("kwargs, error", [
    (dict(scale=[0.1, 0.2], zero_point=[0, 0]), ShapeError),
    (dict(scale=0.0, zero_point=0), ConfigError),
    (dict(scale=0.1, zero_point=0, qmin=5, qmax=5), ConfigError),
    (dict(scale=0.1, zero_point=0, axis=3), ShapeError),
])
def test_bad_arguments(kwargs, error):
    args = dict(qmin=-8, qmax=7) | kwargs
    with pytest.raises(error):
        fake_quantize(np.zeros((2, 3), np.float32), **args)


def spec(**kwargs):
    return QuantSpec(**({"bits": 8, "signed": False} | kwargs))


def test_fixed_mode_follows_observer_and_eval_freezes_it():
    fq = FakeQuantize(spec(), name="act")
    fq(np.array([0.0, 1.0], np.float32))
    first = fq.calculate_qparams()
    fq.eval()
    fq(np.array([0.0, 100.0], np.float32))
    assert fq.calculate_qparams().scale[0] == first.scale[0]  # eval never moves the range
    fq.train()
    fq(np.array([0.0, 100.0], np.float32))
    assert fq.calculate_qparams().scale[0] > first.scale[0]


def test_switches():
    fq = FakeQuantize(spec(), name="act")
    x = np.array([0.0, 0.33, 1.0], np.float32)
    fq.disable_fake_quant()
    assert fq(x) is x
    fq.enable_fake_quant()
    assert not np.array_equal(fq(x), x)
    fq.disable_observer()
    before = fq.calculate_qparams().scale[0]
    fq(np.array([0.0, 50.0], np.float32))
    assert fq.calculate_qparams().scale[0] == before


def test_fake_quant_before_any_observation_raises():
    fq = FakeQuantize(spec(), name="act").eval()
    with pytest.raises(ObserverError, match="'act'"):
        fq(np.ones(3, np.float32))


def test_fixed_qparams_mode():
    fq = FakeQuantize.with_fixed_qparams(spec(), 1 / 256, 0, name="sigmoid")
    y = fq(np.array([0.5, 2.0], np.float32))
    np.testing.assert_array_equal(y, np.float32([0.5, 255 / 256]))
    assert fq.calculate_qparams().scale[0] == np.float32(1 / 256)
    with pytest.raises(ConfigError, match="fixed qparams"):
        fq.enable_observer()


def test_lsq_initialises_scale_and_learns_it():
    w_spec = QuantSpec(bits=4, signed=True, narrow_range=True, scheme=QScheme.PER_CHANNEL_SYMMETRIC,
                       observer="minmax", learnable="lsq")
    fq = FakeQuantize(w_spec, name="w")
    weight = qatcore.nn.Parameter(np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32))
    out = fq(weight)
    expected = 2 * np.abs(weight.data).mean(axis=1) / np.sqrt(7)
    np.testing.assert_allclose(fq.scale.data, expected, rtol=1e-6)
    out.sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.shape == (3,)
    assert isinstance(fq.scale, qatcore.nn.Parameter)
    assert not isinstance(fq.zero_point, qatcore.nn.Parameter)  # LSQ learns the scale only


def test_lsq_plus_learns_zero_point():
    fq = FakeQuantize(spec(learnable="lsq+"), name="act")
    out = fq(qatcore.tensor(np.linspace(-1, 3, 50).astype(np.float32)))
    out.sum().backward()
    assert isinstance(fq.zero_point, qatcore.nn.Parameter) and fq.zero_point.grad is not None


def test_state_dict_round_trip():
    a = FakeQuantize(spec(), name="a")
    a(np.linspace(-1, 2, 10).astype(np.float32))
    b = FakeQuantize(spec(), name="b")
    b(np.zeros(3, np.float32))
    b.load_state_dict(qatcore.loads(qatcore.dumps(a.state_dict())))
    assert b.calculate_qparams().scale[0] == a.calculate_qparams().scale[0]
    x = np.linspace(-3, 3, 7).astype(np.float32)
    np.testing.assert_array_equal(a.eval()(x), b.eval()(x))


def test_function_gradcheck_in_float64_is_refused_by_kernel_contract():
    # fake quantization is float32 by contract; a float64 input is converted, not differentiated in float64
    t = qatcore.tensor(np.array([0.5], dtype=np.float64), requires_grad=True)
    y = fake_quantize(t, 0.1, 0, -8, 7)
    assert y.dtype == np.float32
    y.backward(np.ones(1, np.float32))
    assert t.grad.dtype == np.float64 and t.grad[0] == 1.0
    assert gradcheck  # the op is piecewise constant: its gradient is the STE, checked against the mask above
