"""qatcore.kernels.fake_quant against a NumPy oracle written from docs/numerics.md ("Fake
quantization", "LSQ and LSQ+"), against PyTorch when it is installed, and (LSQ gradients)
against float64 finite differences."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.kernels import fake_quant as kernels

forward, backward = kernels.fake_quantize_forward, kernels.fake_quantize_backward

# ----------------------------------------------------------------------------------------
# The oracle: docs/numerics.md in NumPy (float32; the LSQ terms in float64), one formula a line.


def broadcast_params(x, scale, zero_point, axis):
    """scale, zero point and inv = float32(1) / scale, shaped to broadcast against x."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = x.shape[axis]
    s = scale.reshape(shape if axis is not None else ())
    z = zero_point.reshape(shape if axis is not None else ())
    with np.errstate(divide="ignore", over="ignore"):
        return s, z, np.float32(1) / s


def oracle_forward(x, scale, zero_point, qmin, qmax, axis):
    s, z, inv = broadcast_params(x, scale, zero_point, axis)
    with np.errstate(all="ignore"):
        q = z + np.rint(x * inv)
        return (np.clip(q, np.float32(qmin), np.float32(qmax)) - z) * s


def oracle_terms(grad, x, scale, zero_point, qmin, qmax, axis, grad_factor):
    """Per element: dx (float32), the LSQ dscale and dzero_point terms (float64, evaluated
    from the float32 operands), the clipped mask."""
    s, z, inv = broadcast_params(x, scale, zero_point, axis)
    lo, hi = np.float32(qmin), np.float32(qmax)
    with np.errstate(all="ignore"):
        q = z + np.rint(x * inv)
        inside = (q >= lo) & (q <= hi)
        below, above = q < lo, q > hi
        dx = grad * inside.astype(np.float32)
        dy, x64, q64, s64, z64, inv64 = (np.asarray(a, np.float64) for a in (grad, x, q, s, z, inv))
        g = float(grad_factor)
        dscale = np.where(inside, dy * ((q64 - z64) * s64 - x64) * inv64 * g,
                          np.where(below | above, dy * (np.where(below, qmin, qmax) - z64) * g, np.nan))
        dzero_point = np.where(inside, 0.0, np.where(below | above, -dy * s64 * g, np.nan))
    return dx, dscale, dzero_point, below | above


def per_channel_sum(values, axis, dtype=np.float64):
    reduce = tuple(i for i in range(values.ndim) if i != axis)
    return values.astype(dtype).sum(axis=reduce).reshape(-1)


def assert_same_bits(actual, expected):
    """Equal as float32 bit patterns (so -0.0 != 0.0), NaN matching NaN at the same places."""
    actual, expected = np.asarray(actual), np.asarray(expected, dtype=np.float32)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(actual.view(np.int32)[~nan], expected.view(np.int32)[~nan])


def assert_sum_close(actual, terms, axis):
    """A float32 gradient against the float64 sum of the oracle's terms.

    The kernel computes the same float64 terms, bit for bit, but sums them in its own order
    (runs, tasks, vector lanes), so the two float64 sums may differ by the rounding of the
    additions, at most count * 2^-52 * sum |term|; rounded to float32, that can flip the
    last bit. The slack is one float32 spacing of the result plus that bound: far below any
    single term.
    """
    expected, magnitude = per_channel_sum(terms, axis), per_channel_sum(np.abs(terms), axis)
    count = max(1, terms.size // max(1, expected.size))
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    slack = np.spacing(np.abs(expected[~nan]).astype(np.float32)) + count * 2.0**-52 * magnitude[~nan]
    assert np.all(np.abs(actual[~nan] - expected[~nan]) <= slack), (actual, expected)


def check_against_oracle(x, grad, scale, zero_point, qmin, qmax, axis, grad_factor):
    y = forward(x, scale, zero_point, qmin, qmax, axis)
    assert y.shape == x.shape
    assert_same_bits(y, oracle_forward(x, scale, zero_point, qmin, qmax, axis))
    e_dx, e_dscale, e_dzero, e_clipped = oracle_terms(grad, x, scale, zero_point, qmin, qmax, axis,
                                                      grad_factor)
    e_clipped = per_channel_sum(e_clipped, axis, np.int64)
    for mode in kernels.MODES:
        dx, dscale, dzero, clipped = backward(grad, x, scale, zero_point, qmin, qmax, axis, mode, grad_factor)
        assert_same_bits(dx, e_dx)
        assert clipped.dtype == np.int64
        np.testing.assert_array_equal(clipped, e_clipped)
        if mode == "ste":
            assert dscale is None and dzero is None
        else:
            assert_sum_close(dscale, e_dscale, axis)
        if mode == "lsq+":
            assert_sum_close(dzero, e_dzero, axis)
        elif mode == "lsq":
            assert dzero is None


# ----------------------------------------------------------------------------------------
# Generated cases


def quant_range(bits, kind):
    if kind == "unsigned":
        return 0, 2**bits - 1
    if kind == "narrow":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def make_case(rng, shape, axis, qmin, qmax, log10_scales, specials=False):
    """Scales 10^log10_scales per channel, zero points across the range, x spread from well
    inside the grid to well beyond it (and exact grid points and ties), grad ~ N(0, 1)."""
    channels = 1 if axis is None else shape[axis]
    scale = (10.0 ** np.asarray(log10_scales, np.float64)).astype(np.float32)[:channels]
    zero_point = rng.integers(qmin, qmax, endpoint=True, size=channels).astype(np.float32)
    s, z, _ = broadcast_params(np.empty(shape), scale, zero_point, axis)
    steps = rng.normal(size=shape) * (qmax - qmin) * rng.choice([0.05, 0.5, 1.0], size=shape)
    steps = np.where(rng.random(shape) < 0.2, np.round(steps) + rng.choice([0, 0.5], size=shape), steps)
    x = np.asarray((steps + (qmin + qmax) / 2 - z) * s, np.float32)  # 0-d stays an array
    if specials and x.size:
        flat = x.reshape(-1)
        picks = rng.integers(0, flat.size, size=max(1, flat.size // 8))
        specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38], np.float32)
        flat[picks] = rng.choice(specials, size=picks.size)
    grad = np.asarray(rng.normal(size=shape), np.float32)
    return x, grad, scale, zero_point


@st.composite
def cases(draw, max_ndim=4):
    ndim = draw(st.integers(0, max_ndim))
    shape = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    if ndim and draw(st.booleans()):  # one long axis: runs either side of _MIN_RUN, or many
        shape[draw(st.integers(0, ndim - 1))] = draw(st.sampled_from([31, 32, 33, 70, 1100]))
    shape = tuple(shape)
    axis = draw(st.none() | st.integers(0, ndim - 1)) if ndim else None
    bits = draw(st.integers(2, 16))
    qmin, qmax = quant_range(bits, draw(st.sampled_from(["signed", "narrow", "unsigned"])))
    channels = 1 if axis is None else shape[axis]
    log10_scales = draw(st.lists(st.floats(-30, 30), min_size=channels, max_size=channels))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    specials = draw(st.booleans())
    grad_factor = draw(st.sampled_from([1.0, 0.37, 1 / math.sqrt(1000 * 127)]))
    return make_case(rng, shape, axis, qmin, qmax, log10_scales, specials), qmin, qmax, axis, grad_factor


@settings(max_examples=200)
@given(cases())
def test_matches_oracle(case):
    (x, grad, scale, zero_point), qmin, qmax, axis, grad_factor = case
    check_against_oracle(x, grad, scale, zero_point, qmin, qmax, axis, grad_factor)


@pytest.mark.parametrize("shape, axis", [
    ((3, 150000), None),          # per tensor: runs cut into chunks
    ((2, 4, 70000), 1),           # long runs per channel
    ((600, 40, 40), 2),           # interleaved, expanded parameters
    ((7, 300, 200), 1),           # many short runs, several channels to a task
])
def test_parallel_and_serial_drivers_agree(shape, axis, monkeypatch):
    rng = np.random.default_rng(1)
    channels = 1 if axis is None else shape[axis]
    x, grad, scale, zero_point = make_case(rng, shape, axis, -128, 127, rng.uniform(-3, 1, channels), True)
    results = []
    for threshold in (0, 2**62):
        monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", threshold)
        y = forward(x, scale, zero_point, -128, 127, axis)
        results.append((y,) + backward(grad, x, scale, zero_point, -128, 127, axis, "lsq+", 0.01))
    for parallel, serial in zip(*results):
        np.testing.assert_array_equal(parallel.view(np.int32 if parallel.dtype == np.float32 else np.int64),
                                      serial.view(np.int32 if serial.dtype == np.float32 else np.int64))
    check_against_oracle(x, grad, scale, zero_point, -128, 127, axis, 0.01)


# ----------------------------------------------------------------------------------------
# Known values


def forward_one(x, scale, zero_point=0, qmin=-128, qmax=127):
    return forward(np.array([x], np.float32), np.array([scale], np.float32),
                   np.array([zero_point], np.float32), qmin, qmax, None)[0]


def test_ties_round_half_to_even():
    assert forward_one(2.5, 1.0) == 2 and forward_one(-1.5, 1.0) == -2
    assert forward_one(3.5, 1.0) == 4 and forward_one(-0.5, 1.0) == 0
    # the zero point is added after rounding: 1 + rne(2.5) = 3, not rne(1 + 2.5) = 4
    assert forward_one(2.5, 1.0, zero_point=1) == 2


def test_multiplies_by_the_inverse_scale():
    s, x = np.float32(0.00214854861), np.float32(0.273939937)
    assert x * (np.float32(1) / s) == 127.5 and x / s < 127.5  # the order matters here
    assert forward_one(x, s, qmin=0, qmax=255) == np.float32(128) * s


def test_nan_and_infinities():
    x = np.array([np.nan, np.inf, -np.inf, 0.3, -0.3, 100.0], np.float32)
    grad = np.array([-1, -1, 2, -1, -1, -1], np.float32)
    scale, zero_point = np.array([0.1], np.float32), np.array([2], np.float32)
    y = forward(x, scale, zero_point, -8, 7, None)
    assert np.isnan(y[0])  # torch would give qmin
    assert_same_bits(y[1:], (np.array([7, -8, 5, -1, 7], np.float32) - 2) * np.float32(0.1))
    dx, dscale, dzero, clipped = backward(grad, x, scale, zero_point, -8, 7, None, "lsq+", 1.0)
    # NaN and clipped elements get dy * 0: signed zeros, as torch's STE gives
    assert_same_bits(dx, np.array([-0.0, -0.0, 0.0, -1.0, -1.0, -0.0], np.float32))
    assert clipped.tolist() == [3]  # inf, -inf, 100; NaN is not clipped
    assert np.isnan(dscale[0]) and np.isnan(dzero[0])  # a NaN x poisons the parameter gradients
    finite = backward(grad[1:], x[1:], scale, zero_point, -8, 7, None, "lsq+", 1.0)
    assert np.isfinite(finite[1][0]) and np.isfinite(finite[2][0])


def test_clipped_counts_per_channel():
    # 8-bit unsigned; channel 0 (scale 0.5, zero point 10) represents [-5, 122.5]
    x = np.array([[-6.0, -5.0, -5.25, 0.0, 122.5, 123.0],      # q = -2, 0, 10 + rne(-10.5) = 0, 10, 255, 256
                  [-1.0, 200.0, 300.0, np.nan, 0.1, -0.76]], np.float32)  # q = -1, 200, 300, NaN, 0, -1
    scale, zero_point = np.array([0.5, 1.0], np.float32), np.array([10, 0], np.float32)
    _, _, _, clipped = backward(np.ones_like(x), x, scale, zero_point, 0, 255, 0, "ste", 1.0)
    assert clipped.tolist() == [2, 3]  # NaN is not counted
    _, _, _, clipped = backward(np.ones_like(x), x.T.copy(), scale, zero_point, 0, 255, 1, "ste", 1.0)
    assert clipped.tolist() == [2, 3]


@pytest.mark.parametrize("shape, axis", [((0,), None), ((3, 0, 2), 0), ((3, 0, 2), 1), ((2, 3, 0), 2)])
def test_empty_arrays(shape, axis):
    x = np.zeros(shape, np.float32)
    channels = 1 if axis is None else shape[axis]
    scale, zero_point = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    assert forward(x, scale, zero_point, -8, 7, axis).shape == shape
    dx, dscale, dzero, clipped = backward(x, x, scale, zero_point, -8, 7, axis, "lsq+", 1.0)
    assert dx.shape == shape and dx.dtype == np.float32
    assert dscale.tolist() == dzero.tolist() == [0.0] * channels and clipped.tolist() == [0] * channels
    assert dscale.dtype == dzero.dtype == np.float32 and clipped.dtype == np.int64


def test_zero_dimensional():
    x, grad = np.array(0.74, np.float32), np.array(2.0, np.float32)
    scale, zero_point = np.array([0.25], np.float32), np.array([1], np.float32)
    y = forward(x, scale, zero_point, 0, 3, None)
    assert y.shape == () and y == np.float32(0.5)  # q = 1 + rne(2.96) = 4 -> 3
    dx, dscale, _, clipped = backward(grad, x, scale, zero_point, 0, 3, None, "lsq", 1.0)
    assert dx.shape == () and dx == 0 and clipped.tolist() == [1]
    assert dscale.tolist() == [2.0 * (3 - 1)]


def test_inputs_left_alone_and_mode_checked():
    rng = np.random.default_rng(3)
    x, grad, scale, zero_point = make_case(rng, (4, 50), 0, -128, 127, rng.uniform(-2, 0, 4))
    before = [a.copy() for a in (x, grad, scale, zero_point)]
    forward(x, scale, zero_point, -128, 127, 0)
    backward(grad, x, scale, zero_point, -128, 127, 0, "lsq+", 1.0)
    for a, b in zip((x, grad, scale, zero_point), before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="mode"):
        backward(grad, x, scale, zero_point, -128, 127, 0, "lsq++", 1.0)


# ----------------------------------------------------------------------------------------
# LSQ gradients are the exact derivative of the straight-through surrogate


def surrogate_losses(w, x, s, z, offset, qmin, qmax, axis):
    """Per channel, sum(w * y) in float64 with rne(x / s) replaced by x / s + offset, the offset
    frozen at the evaluation point: the function LSQ differentiates, piecewise linear in s and
    z. Written with t = q - z, so that a large z costs no precision, and summed per channel,
    so that other channels' rounding does not enter a difference quotient."""
    t = x / s + offset
    return per_channel_sum(w * np.clip(t, qmin - z, qmax - z) * s, axis)


@settings(max_examples=100)
@given(cases(max_ndim=3), st.integers(0, 2**32 - 1))
def test_lsq_gradients_match_finite_differences(case, seed):
    (x_drawn, _, scale, zero_point), qmin, qmax, axis, grad_factor = case
    shape = x_drawn.shape
    rng = np.random.default_rng(seed)
    # x at most 0.4 steps from a grid point that is never qmin or qmax: no element is near a
    # rounding boundary, nor at a kink of the clamp (a step of s moves x / s by < 0.01)
    s, z, inv = broadcast_params(np.empty(shape), scale, zero_point, axis)
    grid = rng.integers(qmin - 3, qmax + 3, endpoint=True, size=shape)
    grid = grid + (grid == qmax) - (grid == qmin)
    x = ((grid - z + rng.uniform(-0.4, 0.4, size=shape)) * s).astype(np.float32)
    with np.errstate(all="ignore"):
        q = z + np.rint(x * inv)
        usable = (np.isfinite(x * inv) & (np.abs(np.abs(x * inv - np.rint(x * inv)) - 0.5) > 1e-3)
                  & (q != qmin) & (q != qmax))
    if not np.all(usable):
        return  # float32 underflow or overflow at an extreme scale: not what this test is about
    w = rng.normal(size=shape).astype(np.float32)
    _, dscale, dzero, _ = backward(w, x, scale, zero_point, qmin, qmax, axis, "lsq+", grad_factor)
    w64, x64, s64, z64, q64 = (np.asarray(a, np.float64) for a in (w, x, s, z, q))
    offset = q64 - z64 - x64 / s64
    # The kernel's terms are float64 but use the float32 inv (relative error 2^-24 on an inside
    # term, which is at most |w| / 2), and the sums end rounded to float32; the difference
    # quotients of this piecewise linear loss are exact up to float64 rounding.
    magnitude = per_channel_sum(np.abs(w64) * (np.abs(q64 - z64) + 1), axis)
    scale_bound = grad_factor * (2.0**-24 * per_channel_sum(np.abs(w64), axis) + 1e-8 * magnitude)
    scale_bound += np.spacing(np.abs(dscale))
    zero_bound = grad_factor * scale * 1e-12 * magnitude + np.spacing(np.abs(dzero))
    for c in range(scale.size):
        unit = np.zeros(scale.size)
        unit[c] = 1.0
        unit = unit.reshape(s.shape)
        h = 1e-7 * float(scale[c])
        d_scale = (surrogate_losses(w64, x64, s64 + h * unit, z64, offset, qmin, qmax, axis)[c]
                   - surrogate_losses(w64, x64, s64 - h * unit, z64, offset, qmin, qmax, axis)[c]) / (2 * h)
        d_zero = (surrogate_losses(w64, x64, s64, z64 + 0.25 * unit, offset, qmin, qmax, axis)[c]
                  - surrogate_losses(w64, x64, s64, z64 - 0.25 * unit, offset, qmin, qmax, axis)[c]) / 0.5
        assert abs(dscale[c] - grad_factor * d_scale) <= scale_bound[c], (c, dscale, d_scale)
        assert abs(dzero[c] - grad_factor * d_zero) <= zero_bound[c], (c, dzero, d_zero)


# ----------------------------------------------------------------------------------------
# PyTorch, when installed


def torch_case(rng, shape, axis, qmin, qmax):
    """Data for torch's learnable kernels, avoiding two of their quirks: x is at most 0.4 steps
    off the grid (they round z + x * inv, which differs from z + rne(x * inv) at ties), and
    zero points are >= 0 (their backward takes int(z + 0.5), which is z + 1 for z < 0)."""
    channels = 1 if axis is None else shape[axis]
    _, grad, scale, zero_point = make_case(rng, shape, axis, qmin, qmax, rng.uniform(-4, 2, channels))
    zero_point = np.maximum(zero_point, 0)
    s, z, _ = broadcast_params(grad, scale, zero_point, axis)
    grid = rng.integers(qmin - 40, qmax + 40, endpoint=True, size=shape)
    x = ((grid - z + rng.uniform(-0.4, 0.4, size=shape)) * s).astype(np.float32)
    return x, grad, scale, zero_point


torch_shapes = st.sampled_from([((5, 7), 0), ((5, 7), 1), ((5, 7), None), ((2, 3, 4, 5), 0),
                                ((2, 3, 4, 5), 1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 3), ((3, 64, 40), 1),
                                ((1000,), None)])
ranges = st.builds(quant_range, st.integers(2, 16), st.sampled_from(["signed", "narrow", "unsigned"]))
seeds = st.integers(0, 2**32 - 1)


@pytest.mark.torch
@given(torch_shapes, ranges, seeds)
def test_matches_torch_fake_quantize(shape_axis, grid_range, seed):
    import torch
    (shape, axis), (qmin, qmax) = shape_axis, grid_range
    rng = np.random.default_rng(seed)
    x, grad, scale, zero_point = make_case(rng, shape, axis, qmin, qmax,
                                           rng.uniform(-8, 3, 1 if axis is None else shape[axis]))
    tx = torch.from_numpy(x.copy()).requires_grad_()
    if axis is None:
        ty = torch.fake_quantize_per_tensor_affine(tx, float(scale[0]), int(zero_point[0]), qmin, qmax)
    else:
        ty = torch.fake_quantize_per_channel_affine(
            tx, torch.from_numpy(scale), torch.from_numpy(zero_point).int(), axis, qmin, qmax)
    ty.backward(torch.from_numpy(grad))
    assert_same_bits(forward(x, scale, zero_point, qmin, qmax, axis), ty.detach().numpy())
    dx = backward(grad, x, scale, zero_point, qmin, qmax, axis, "ste", 1.0)[0]
    assert_same_bits(dx, tx.grad.numpy())


@pytest.mark.torch
@settings(max_examples=50)
@given(torch_shapes, ranges, seeds, st.floats(1e-3, 2.0))
def test_lsq_matches_torch_learnable(shape_axis, grid_range, seed, grad_factor):
    import torch
    (shape, axis), (qmin, qmax) = shape_axis, grid_range
    x, grad, scale, zero_point = torch_case(np.random.default_rng(seed), shape, axis, qmin, qmax)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    ts = torch.from_numpy(scale.copy()).requires_grad_()
    tz = torch.from_numpy(zero_point.copy()).requires_grad_()
    if axis is None:
        ty = torch._fake_quantize_learnable_per_tensor_affine(tx, ts, tz, qmin, qmax, grad_factor)
    else:
        ty = torch._fake_quantize_learnable_per_channel_affine(tx, ts, tz, axis, qmin, qmax, grad_factor)
    ty.backward(torch.from_numpy(grad))
    assert_same_bits(forward(x, scale, zero_point, qmin, qmax, axis), ty.detach().numpy())
    dx, dscale, dzero, _ = backward(grad, x, scale, zero_point, qmin, qmax, axis, "lsq+", grad_factor)
    assert_same_bits(dx, tx.grad.numpy())
    # torch rounds the same float64 terms to float32 and sums those in float32, in its own
    # (cascade) order: a few float32 roundings of sum |term| apart
    _, e_dscale, e_dzero, _ = oracle_terms(grad, x, scale, zero_point, qmin, qmax, axis, grad_factor)
    for ours, theirs, terms in ((dscale, ts.grad.numpy(), e_dscale), (dzero, tz.grad.numpy(), e_dzero)):
        slack = 1e-5 * per_channel_sum(np.abs(terms), axis) + 1e-30
        assert np.all(np.abs(ours - theirs) <= slack), (ours, theirs)


# ----------------------------------------------------------------------------------------
# The same kernels as plain Python


def test_runs_as_plain_python(run_without_jit):
    run_without_jit(__file__, """
        rng = np.random.default_rng(5)
        for shape, axis, qmin, qmax in [((3, 40), None, -128, 127), ((2, 3, 4), 1, 0, 15),
                                         ((3, 70), 0, -127, 127), ((), None, 0, 3)]:
            channels = 1 if axis is None else shape[axis]
            x, grad, scale, zero_point = tests.make_case(rng, shape, axis, qmin, qmax,
                                                         rng.uniform(-3, 1, channels), True)
            tests.check_against_oracle(x, grad, scale, zero_point, qmin, qmax, axis, 0.3)
    """)
