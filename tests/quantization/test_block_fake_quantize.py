"""BlockFakeQuantize, the quantizer of the dynamic schemes (per group, per token, absmean):
its forward is the functions of ``group_token_fake_quantize`` bit for bit; its gradients
are the straight-through ones (per group and per token: masked, torchao's; ternary: the
identity, BitNet's); its LSQ group scales start at the dynamic scales and learn by the LSQ
rule of ``fake_quantize_learnable`` on the (numel / group_size, group_size) view; and its
switches, refusals, ``block_qparams`` and state. Marked torch: the ternary forward against
PyTorch restatements of the paper's formula (bit for bit) and of BitNet's released
``weight_quant`` (how far apart the two are).

A float64 gradcheck of a quantizer with respect to its input is not meaningful: the output
is piecewise constant in x away from the scale's dependence on the block's extremes or
mean, and the backward is a straight-through *estimator*, by definition not that
derivative. So the tests check the estimator against its formula, and use finite
differences only where a derivative is exact: the LSQ scale gradient of fully clipped
groups (y = qmax * s there), and a disabled quantizer (the identity)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qatcore
from qatcore.autograd import gradcheck
from qatcore.errors import ConfigError
from qatcore.nn import Module, Parameter
from qatcore.quantization import QuantizationConfig, QuantSpec
from qatcore.quantization.block_fake_quantize import BlockFakeQuantize, make_fake_quantize, refuse_dynamic_quantizers
from qatcore.quantization.fake_quantize import default_grad_factor, fake_quantize, fake_quantize_learnable
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.group_token_fake_quantize import (
    absmean_scale,
    fake_quantize_per_group,
    fake_quantize_per_token,
    fake_quantize_ternary,
    group_qparams,
    token_qparams,
)
from qatcore.quantization.qparams import FLOAT32_EPS

F32 = np.float32
SCHEMES = ("per_group_symmetric", "per_group_affine", "per_token_affine", "per_token_symmetric",
           "per_tensor_absmean", "per_group_absmean")


def make_spec(scheme: str, bits: int = 4, group_size: int | None = 32, learnable: str = "fixed") -> QuantSpec:
    if "absmean" in scheme:
        return QuantSpec(bits=2, signed=True, narrow_range=True, scheme=scheme, observer="minmax",
                         group_size=group_size if scheme == "per_group_absmean" else None)
    return QuantSpec(bits=bits, signed=True, scheme=scheme, observer="minmax", learnable=learnable,
                     group_size=group_size if "group" in scheme else None)


def reference(scheme: str, x, bits: int, group_size: int):
    """The function the quantizer of ``scheme`` must equal."""
    if scheme.startswith("per_group") and "absmean" not in scheme:
        return fake_quantize_per_group(x, group_size, bits, symmetric=scheme.endswith("symmetric"))
    if scheme.startswith("per_token"):
        return fake_quantize_per_token(x, bits, symmetric=scheme.endswith("symmetric"))
    return fake_quantize_ternary(x, group_size if scheme == "per_group_absmean" else None)


def bits_equal(a, b) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = np.uint64 if a.dtype == np.float64 else np.uint32
    return np.array_equal(a.view(view), b.view(view))


def values(seed: int, shape: tuple[int, ...], exponent: int = 0, dtype=F32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 10.0**exponent).astype(dtype)


def straight_through(x: np.ndarray, g: np.ndarray, scheme: str, bits: int, group_size: int) -> np.ndarray:
    """torchao's estimator restated: dx = where(qmin <= q <= qmax, g * s, 0) * inv on the unclamped q."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    size = x.shape[-1] if scheme.startswith("per_token") else group_size
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
    rule = token_qparams if scheme.startswith("per_token") else group_qparams
    scale, zero_point = rule(blocks, bits, scheme.endswith("symmetric"))
    s, z = scale[..., None], zero_point[..., None]
    inv = x.dtype.type(1) / s
    q = np.rint(blocks * inv) + z
    return (np.where((q >= qmin) & (q <= qmax), g.reshape(blocks.shape) * s, x.dtype.type(0)) * inv).reshape(x.shape)


# ---------------------------------------------------------------- forward: the functions, bit for bit

@given(seed=st.integers(0, 2**16), scheme=st.sampled_from(SCHEMES), bits=st.integers(2, 8),
       leading=st.sampled_from([(1,), (3,), (2, 3)]), groups=st.integers(1, 3),
       group_size=st.sampled_from([1, 4, 16, 32]), exponent=st.integers(-4, 4))
def test_forward_equals_the_functions_on_arrays_and_tensors(seed, scheme, bits, leading, groups, group_size,
                                                           exponent):
    fq = BlockFakeQuantize(make_spec(scheme, bits, group_size), "w")
    bits = fq.spec.bits
    x = values(seed, (*leading, groups * group_size), exponent)
    expected = reference(scheme, x, bits, group_size)
    assert bits_equal(fq(x), expected)
    y = fq(qatcore.tensor(x, requires_grad=True))
    assert isinstance(y, qatcore.Tensor) and y.requires_grad and bits_equal(y.data, expected)
    # float64 Tensors stay float64, as the functions keep them
    wide = x.astype(np.float64)
    y64 = fq(qatcore.tensor(wide, requires_grad=True))
    assert bits_equal(y64.data, reference(scheme, wide, bits, group_size))


def test_a_float64_array_is_quantized_in_float32_as_by_every_fake_quantize_module():
    # the module reads arrays as float32 (FakeQuantize does the same); Tensors keep their dtype
    x = values(0, (2, 64), dtype=np.float64)
    fq = BlockFakeQuantize(make_spec("per_group_symmetric"), "w")
    assert bits_equal(fq(x), fake_quantize_per_group(x.astype(F32), 32, 4))


def test_scales_follow_each_call_in_training_and_eval_alike():
    fq = BlockFakeQuantize(make_spec("per_token_affine", bits=8), "act")
    assert fq.observer is None and fq.dynamic and bool(fq.qparams_ready.data)
    small, large = values(1, (4, 16)), values(2, (4, 16), exponent=3)
    first = fq(small)
    assert bits_equal(fq(large), fake_quantize_per_token(large))      # no memory of the first call's range
    fq.eval()
    assert bits_equal(fq(small), first)
    fq.enable_observer(True)   # kept for the QAT controller, without effect: there is no observer
    assert bool(fq.observer_enabled.data) and fq.observer is None
    assert bits_equal(fq.train()(small), first)


def test_make_fake_quantize_picks_the_quantizer_of_the_scheme():
    config = QuantizationConfig.int8_dynamic_activation_int4_weight()
    assert type(make_fake_quantize(config.weight, "w")) is BlockFakeQuantize
    assert type(make_fake_quantize(config.activation, "a")) is BlockFakeQuantize
    static = make_fake_quantize(QuantizationConfig().weight, "w")
    assert type(static) is FakeQuantize and not static.dynamic
    with pytest.raises(ConfigError, match=r"BlockFakeQuantize 'fc\.weight' needs a QuantSpec with a per-group, "
                                          r"per-token or absmean scheme, got 'per_channel_symmetric'"):
        BlockFakeQuantize(QuantizationConfig().weight, "fc.weight")


def test_the_integer_grids():
    assert BlockFakeQuantize(make_spec("per_group_symmetric", bits=4), "w").qrange == (-8, 7)
    assert BlockFakeQuantize(make_spec("per_group_symmetric", bits=2), "w").qrange == (-2, 1)
    assert BlockFakeQuantize(make_spec("per_token_affine", bits=8), "a").qrange == (-128, 127)
    assert BlockFakeQuantize(make_spec("per_tensor_absmean"), "w").qrange == (-1, 1)
    assert BlockFakeQuantize(make_spec("per_group_absmean"), "w").qrange == (-1, 1)


# ---------------------------------------------------------------- gradients: straight-through

@given(seed=st.integers(0, 2**16), scheme=st.sampled_from(SCHEMES[:4]), bits=st.integers(2, 8),
       group_size=st.sampled_from([4, 16, 32]), dtype=st.sampled_from([np.float32, np.float64]))
def test_per_group_and_per_token_gradients_are_the_masked_straight_through_ones(seed, scheme, bits, group_size,
                                                                               dtype):
    fq = BlockFakeQuantize(make_spec(scheme, bits, group_size), "w")
    x = values(seed, (3, 2 * group_size), dtype=dtype)
    g = values(seed + 1, x.shape, dtype=dtype)
    t = qatcore.tensor(x, requires_grad=True)
    fq(t).backward(g)
    expected = straight_through(x, g, scheme, bits, group_size)
    assert t.grad.dtype == dtype and bits_equal(t.grad, expected)
    # inside the grid the gradient is g up to the double rounding of (g * s) * inv; outside, 0
    passed = expected != 0
    np.testing.assert_allclose(t.grad[passed], g[passed], rtol=4 * np.finfo(dtype).eps, atol=0)


def test_per_group_clipped_elements_get_no_gradient_by_hand():
    # int2 symmetric, group [1.0, -0.5, 0.2, 0.0]: s = 1 / 1.5 and 1.0 / s = 1.5 rounds to 2 > qmax = 1
    fq = BlockFakeQuantize(make_spec("per_group_symmetric", bits=2, group_size=4), "w")
    t = qatcore.tensor(np.array([[1.0, -0.5, 0.2, 0.0, 0.1, 0.1, 0.1, 0.1]], F32), requires_grad=True)
    fq(t).backward(np.full((1, 8), 3.0, F32))
    assert t.grad.tolist() == [[0.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]]


@given(seed=st.integers(0, 2**16), scheme=st.sampled_from(["per_tensor_absmean", "per_group_absmean"]),
       exponent=st.integers(-3, 3), dtype=st.sampled_from([np.float32, np.float64]))
def test_ternary_gradient_is_the_identity_even_beyond_the_grid(seed, scheme, exponent, dtype):
    fq = BlockFakeQuantize(make_spec(scheme, group_size=16), "w")
    x = values(seed, (4, 32), exponent, dtype)
    x[0, 0] = 20 * np.abs(x).mean()                    # far beyond the grid: |x / s| > 1.5
    g = values(seed + 1, x.shape, dtype=dtype)
    t = qatcore.tensor(x, requires_grad=True)
    y = fq(t)
    y.backward(g)
    assert bits_equal(t.grad, g)                       # BitNet's w + (u - w).detach(): dx = dy everywhere
    blocks = x.reshape(1, -1) if scheme == "per_tensor_absmean" else x.reshape(4, 2, 16)
    assert np.abs(np.rint(blocks / absmean_scale(blocks)[..., None])).max() > 1   # clipped, and still got dy


def test_ternary_by_hand():
    # s = mean|x| + 1e-5 = 0.4 + 1e-5: 0.1 / s -> 0, -0.3 / s = -0.74998 -> -1, 0.9 / s = 2.2499 -> 2 -> 1
    x = np.array([[0.1, -0.3, 0.9, -0.3]], F32)
    fq = BlockFakeQuantize(make_spec("per_tensor_absmean"), "w")
    s = F32(0.4 + 1e-5)
    assert bits_equal(fq(x), np.array([[0, -1, 1, -1]], F32) * s)
    # per group of 2: s = 0.2 + 1e-5 and 0.6 + 1e-5; the epsilon keeps 0.1 / s and -0.3 / s just inside
    # the ties 0.5 and -0.5 (which would round to even all the same): 0 and -0
    grouped = BlockFakeQuantize(make_spec("per_group_absmean", group_size=2), "w")
    s1, s2 = F32(0.2 + 1e-5), F32(0.6 + 1e-5)
    assert bits_equal(grouped(x), np.array([[0.0, -s1, s2, -0.0]], F32))


def test_absmean_scale_is_the_float64_mean_plus_epsilon_rounded_once():
    for seed in range(50):
        rng = np.random.default_rng(seed)
        blocks = values(seed, (3, int(rng.integers(1, 200))), exponent=int(rng.integers(-5, 3)))
        mean = np.abs(blocks).mean(axis=-1, dtype=np.float64)
        scale = absmean_scale(blocks)
        assert scale.dtype == F32 and bits_equal(scale, (mean + 1e-5).astype(F32))
        wide = blocks.astype(np.float64)
        assert bits_equal(absmean_scale(wide), np.abs(wide).mean(axis=-1) + 1e-5)


def test_ternary_all_zero_block_has_the_epsilon_as_its_scale():
    fq = BlockFakeQuantize(make_spec("per_group_absmean", group_size=4), "w")
    x = np.array([[0, 0, 0, 0, 1e-7, -1e-7, 0, 3e-5]], F32)
    scale, _, _ = fq.block_qparams(x)
    second = (np.abs(x[0, 4:]).astype(np.float64).mean() + 1e-5).astype(F32)
    assert scale[..., 0].tolist() == [[F32(1e-5), second]]
    y = fq(x)
    assert np.all(np.isfinite(y)) and bits_equal(y[0, :4], np.zeros(4, F32))   # zeros stay zeros, no NaN
    # the second group: s = 1.755e-5; 3e-5 / s = 1.71 -> 2 -> 1, the others -> 0 (-1e-7 to -0)
    assert bits_equal(y[0, 4:], np.array([0.0, -0.0, 0.0, second], F32))


# ---------------------------------------------------------------- disabled, refusals, block_qparams

@pytest.mark.parametrize("scheme", SCHEMES)
def test_disabled_fake_quant_passes_x_through(scheme):
    fq = BlockFakeQuantize(make_spec(scheme, group_size=4), "w").disable_fake_quant()
    x = values(0, (2, 8))
    assert fq(x) is x
    t = qatcore.tensor(x, requires_grad=True)
    assert fq(t) is t
    # the identity, gradient included: here a float64 gradcheck is meaningful
    assert gradcheck(lambda v: fq(v) * np.arange(1.0, 17.0).reshape(2, 8), [x.astype(np.float64)])
    assert bits_equal(fq.enable_fake_quant()(x), reference(scheme, x, fq.spec.bits, 4))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_calculate_qparams_refuses_naming_the_quantizer(scheme):
    fq = BlockFakeQuantize(make_spec(scheme), "blocks.0.fc_1.weight")
    with pytest.raises(ConfigError, match=rf"BlockFakeQuantize 'blocks\.0\.fc_1\.weight' \({scheme}\) has no single "
                                          r"QParams: its scales follow each call's values; use block_qparams\(x\)"):
        fq.calculate_qparams()


@pytest.mark.parametrize("scheme, learnable", [("per_group_symmetric", "fixed"), ("per_group_symmetric", "lsq"),
                                               ("per_group_affine", "fixed"), ("per_group_absmean", "fixed")])
def test_a_last_axis_not_divisible_by_group_size_names_the_quantizer(scheme, learnable):
    fq = BlockFakeQuantize(make_spec(scheme, group_size=32, learnable=learnable), "head.weight")
    message = (rf"head\.weight \({scheme}\): x's last axis \(48, shape \(2, 48\)\) is not divisible by "
               r"group_size=32; choose a group_size that divides it")
    for call in (lambda: fq(values(0, (2, 48))), lambda: fq(qatcore.tensor(values(0, (2, 48)))),
                 lambda: fq.block_qparams(values(0, (2, 48)))):
        with pytest.raises(ConfigError, match=message):
            call()


def test_an_unnamed_quantizer_says_what_it_is():
    with pytest.raises(ConfigError, match=r"^BlockFakeQuantize \(per_group_symmetric\): x's last axis"):
        BlockFakeQuantize(make_spec("per_group_symmetric")).forward(values(0, (2, 48)))


def test_non_float_inputs_are_refused_naming_the_quantizer():
    fq = BlockFakeQuantize(make_spec("per_token_affine", bits=8), "fc.input")
    with pytest.raises(ConfigError, match=r"fc\.input \(per_token_affine\): x must be a float32 or float64"):
        fq(qatcore.tensor(np.ones((2, 4), np.int64)))


@given(seed=st.integers(0, 2**16), scheme=st.sampled_from(SCHEMES), bits=st.integers(2, 8),
       exponent=st.integers(-3, 3))
def test_block_qparams_integers_lie_in_the_grid_and_rebuild_the_output(seed, scheme, bits, exponent):
    fq = BlockFakeQuantize(make_spec(scheme, bits, group_size=16), "w")
    qmin, qmax = fq.qrange
    x = values(seed, (2, 3, 48), exponent)
    scale, zero_point, integers = fq.block_qparams(x)
    assert integers.dtype == np.int32 and integers.shape == x.shape
    assert integers.min() >= qmin and integers.max() <= qmax
    blocks = {"per_group_symmetric": (2, 3, 3), "per_group_affine": (2, 3, 3), "per_group_absmean": (2, 3, 3),
              "per_token_affine": (2, 3, 1), "per_token_symmetric": (2, 3, 1), "per_tensor_absmean": (1,)}[scheme]
    assert scale.shape == (*blocks, 1) and zero_point.shape == scale.shape
    assert np.all(scale > 0) and np.all(zero_point == np.rint(zero_point))
    if scheme == "per_token_affine":   # clamped to the grid; torchao's per-group affine zero point is not
        assert np.all(zero_point >= qmin) and np.all(zero_point <= qmax)
    y = fq(x)
    size = {(2, 3, 1): 48, (2, 3, 3): 16, (1,): x.size}[blocks]
    q = integers.reshape(-1, size)
    # equal as values (integers have no -0, which the forward gives for a negative value rounding to 0)
    s, z = scale.reshape(-1, 1), zero_point.reshape(-1, 1)
    rebuilt = ((q - z) * s).astype(F32)            # y = (q - z) * s, ternary (z = 0) included
    if "absmean" in scheme:
        assert bits_equal(s, absmean_scale(x.reshape(-1, size))[:, None])
    assert rebuilt.dtype == y.dtype and np.array_equal(rebuilt.reshape(x.shape), y)
    if scheme.endswith(("symmetric", "absmean")):
        assert np.all(zero_point == 0)


def test_block_qparams_of_the_8da4w_weight_by_hand():
    fq = make_fake_quantize(QuantizationConfig.int8_dynamic_activation_int4_weight().weight, "fc.weight")
    w = np.zeros((2, 64), F32)
    w[0, :32], w[0, 32:], w[1, :32], w[1, 32:] = 1.5, -0.75, 0.0, 3.0
    scale, zero_point, integers = fq.block_qparams(w)
    # max |w| / 7.5 per group; the all-zero group gets the smallest normal float32
    assert scale[..., 0].tolist() == [[F32(0.2), F32(0.1)], [np.finfo(F32).tiny, F32(0.4)]]
    assert np.all(zero_point == 0)
    # 1.5 / 0.2 = 7.5 -> 8 clamps to 7; -0.75 / 0.1 = -7.5 -> -8; 3 / 0.4 = 7.5 -> 7
    assert integers[0, :32].tolist() == [7] * 32 and integers[0, 32:].tolist() == [-8] * 32
    assert integers[1, :32].tolist() == [0] * 32 and integers[1, 32:].tolist() == [7] * 32


# ---------------------------------------------------------------- LSQ group scales

def lsq_quantizer(group_size: int = 32, bits: int = 4, name: str = "fc.weight") -> BlockFakeQuantize:
    return BlockFakeQuantize(make_spec("per_group_symmetric", bits, group_size, learnable="lsq"), name)


def test_an_lsq_quantizer_starts_with_one_placeholder_scale():
    fq = lsq_quantizer()
    assert fq.learns_scale and isinstance(fq.scale, Parameter) and fq.scale.data.shape == (1,)
    assert not bool(fq.qparams_ready.data) and not isinstance(fq.zero_point, Parameter)
    assert [name for name, _ in fq.named_parameters()] == ["scale"]
    x = values(3, (4, 64))
    scale, _, _ = fq.block_qparams(x)          # before the first call: the dynamic scales
    assert bits_equal(scale[..., 0], group_qparams(x.reshape(4, 2, 32), 4, True)[0])


@given(seed=st.integers(0, 2**16), bits=st.integers(2, 8), rows=st.integers(1, 6), groups=st.integers(1, 4),
       group_size=st.sampled_from([8, 16, 32]), exponent=st.integers(-3, 3))
def test_lsq_first_call_equals_the_dynamic_quantizer_bit_for_bit(seed, bits, rows, groups, group_size, exponent):
    fq = lsq_quantizer(group_size, bits)
    parameter = fq.scale
    x = values(seed, (rows, groups * group_size), exponent)
    y = fq(qatcore.tensor(x, requires_grad=True))
    assert bits_equal(y.data, fake_quantize_per_group(x, group_size, bits))
    assert fq.scale is parameter and bool(fq.qparams_ready.data)  # the Parameter an optimizer holds
    assert fq.scale.data.shape == (x.size // group_size,) and fq.zero_point.data.shape == fq.scale.data.shape
    expected = group_qparams(x.reshape(-1, group_size), bits, True)[0]
    assert bits_equal(fq.scale.data, expected)
    assert bits_equal(fq.block_qparams(x)[0].reshape(-1), expected)


def test_lsq_tiny_groups_start_at_the_float32_eps_floor_not_the_dynamic_scale():
    # a learned scale is kept >= FLOAT32_EPS; a group whose dynamic scale max|x| / 7.5 is below it
    # starts there (the only difference from the dynamic quantizer's first call)
    fq = lsq_quantizer(group_size=4)
    x = np.array([[1e-7, -2e-7, 0, 5e-8, 0.5, -0.25, 0.125, 0.0]], F32)
    y = fq(x)
    assert fq.scale.data.tolist() == [FLOAT32_EPS, F32(0.5) / F32(7.5)]
    assert bits_equal(y[:, 4:], fake_quantize_per_group(x, 4, 4)[:, 4:])
    assert bits_equal(y[:, :4], fake_quantize(x[:, :4], FLOAT32_EPS, 0, -8, 7))
    assert not bits_equal(y[:, :4], fake_quantize_per_group(x, 4, 4)[:, :4])


@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 4, 8]), leading=st.sampled_from([(6,), (2, 3)]),
       perturb=st.booleans())
def test_lsq_gradients_are_fake_quantize_learnable_on_the_group_view(seed, bits, leading, perturb):
    group_size, qmax = 16, 2 ** (bits - 1) - 1
    fq = lsq_quantizer(group_size, bits)
    x = values(seed, (*leading, 48))
    fq(x)                                                   # initialise
    if perturb:                                             # a trained scale, clipping some values
        fq.scale.data *= F32(0.6) + values(seed + 2, fq.scale.data.shape).__abs__() * F32(0.3)
    start = fq.scale.data.copy()
    g = values(seed + 1, x.shape)
    t = qatcore.tensor(x, requires_grad=True)
    y = fq(t)
    y.backward(g)
    # the reference: per channel along axis 0 of the (numel / group_size, group_size) view
    rows = qatcore.tensor(x.reshape(-1, group_size), requires_grad=True)
    scale = qatcore.tensor(start.copy(), requires_grad=True)
    expected = fake_quantize_learnable(rows, scale, qatcore.tensor(np.zeros_like(start)), -qmax - 1, qmax, 0,
                                       default_grad_factor(x.size, qmax))
    expected.backward(g.reshape(-1, group_size))
    assert bits_equal(y.data, expected.data.reshape(x.shape))
    assert bits_equal(t.grad, rows.grad.reshape(x.shape))
    assert bits_equal(fq.scale.grad, scale.grad)
    # and the LSQ table itself (summed in float64)
    blocks = x.reshape(-1, group_size).astype(np.float64)
    s = start.astype(np.float64)[:, None]
    inv = (F32(1) / start).astype(np.float64)[:, None]
    q = np.rint((x.reshape(-1, group_size) * (F32(1) / start)[:, None]).astype(np.float64))
    dy = g.reshape(-1, group_size).astype(np.float64)
    table = np.where(q < -qmax - 1, dy * (-qmax - 1), np.where(q > qmax, dy * qmax, dy * (q * s - blocks) * inv))
    np.testing.assert_allclose(fq.scale.grad, table.sum(axis=1) * default_grad_factor(x.size, qmax),
                               rtol=1e-5, atol=1e-7)


def test_lsq_scale_gradient_matches_finite_differences_where_every_value_is_clipped():
    # with every |x| / s beyond the grid, y = clamp(q) * s exactly: y's true derivative in s is the LSQ one
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(2, 3, (2, 8)), rng.uniform(-3, -2, (2, 8))], axis=1).astype(F32)
    fq = BlockFakeQuantize(make_spec("per_group_symmetric", 4, 8, "lsq").replace(grad_factor=1.0), "w")
    fq(x)
    fq.scale.data[...] = F32(0.1)
    w = rng.normal(size=x.shape)
    fq(qatcore.tensor(x)).backward(w.astype(F32))

    def loss(scales: np.ndarray) -> float:
        blocks = x.reshape(-1, 8).astype(np.float64)
        return float(np.sum(w.reshape(-1, 8) * np.clip(np.rint(blocks / scales[:, None]), -8, 7) * scales[:, None]))

    for group in range(4):
        step = np.zeros(4)
        step[group] = 1e-7
        numeric = (loss(0.1 + step) - loss(0.1 - step)) / 2e-7
        assert fq.scale.grad[group] == pytest.approx(numeric, rel=1e-5)


def test_lsq_uses_the_learned_scales_and_keeps_them_positive():
    fq = lsq_quantizer(group_size=8)
    x = values(6, (2, 16))
    fq(x)
    fq.scale.data[...] = np.array([0.05, -0.3, 0.0, 0.2], F32)   # an optimizer step drove two non-positive
    y = fq(x)
    assert fq.scale.data.tolist() == [F32(0.05), FLOAT32_EPS, FLOAT32_EPS, F32(0.2)]
    assert np.all(fq.scale.data > 0)
    rows = x.reshape(4, 8)
    expected = fake_quantize(rows, fq.scale.data, np.zeros(4, F32), -8, 7, axis=0).reshape(2, 16)
    assert bits_equal(y, expected)
    assert bits_equal(fq.block_qparams(x)[0].reshape(-1), fq.scale.data)


def test_lsq_refuses_values_of_another_size_naming_the_quantizer():
    fq = lsq_quantizer(group_size=8, name="blocks.1.fc_2.weight")
    fq(values(0, (2, 16)))
    with pytest.raises(ConfigError, match=r"BlockFakeQuantize 'blocks\.1\.fc_2\.weight': its 4 learned group scales "
                                          r"were made for 32 values, got shape \(4, 16\)"):
        fq(values(0, (4, 16)))


def test_lsq_state_loads_into_a_fresh_quantizer():
    trained = lsq_quantizer(group_size=8)
    x = values(7, (3, 16))
    trained(x)
    trained.scale.data *= F32(0.75)
    fresh = lsq_quantizer(group_size=8)
    parameter = fresh.scale
    fresh.load_state_dict(qatcore.loads(qatcore.dumps(trained.state_dict())))
    assert fresh.scale is parameter and fresh.scale.data.shape == (6,)
    assert bool(fresh.qparams_ready.data) and bits_equal(fresh.scale.data, trained.scale.data)
    assert bits_equal(fresh(x), trained(x))


# ---------------------------------------------------------------- statistics callback, refusal helper

def recorded_backward(quantizer_output, g):
    """Backward through a quantizer's output with a recording on_backward; what it was called with."""
    calls = []
    quantizer_output(lambda *args: calls.append(args)).backward(g)
    (call,) = calls
    return call


@pytest.mark.parametrize("scheme", ["per_group_symmetric", "per_token_affine", "per_tensor_absmean"])
def test_on_backward_gets_the_gradient_entering_first_as_fake_quantize_gives_it(scheme):
    # FakeQuantizeFunction calls on_backward(dL/dy, dL/dx, clipped, dscale); the statistics record the
    # first as grad_norm_in ("the gradient entering"). The block quantizers must pass the same order.
    from qatcore.quantization.group_token_fake_quantize import BlockFakeQuantizeFunction, TernaryFakeQuantizeFunction

    x = values(8, (4, 32))
    x[:, 0] = 100.0                                   # clipped elements, so that dL/dx != dL/dy
    g = values(9, x.shape)
    t = qatcore.tensor(x, requires_grad=True)
    static = recorded_backward(lambda cb: fake_quantize(t, 0.5, 0, -8, 7, on_backward=cb), g)
    assert bits_equal(static[0], g) and not bits_equal(static[1], g)
    t = qatcore.tensor(x, requires_grad=True)
    if scheme == "per_tensor_absmean":
        call = recorded_backward(lambda cb: TernaryFakeQuantizeFunction.apply(t, group_size=None, on_backward=cb), g)
        assert bits_equal(call[0], g) and bits_equal(call[1], g)
        assert int(np.sum(call[2])) == 4 and call[3] is None    # the four 100.0s lie beyond {-1, 0, 1}
        return
    spec = make_spec(scheme, 4, 32)
    call = recorded_backward(lambda cb: BlockFakeQuantizeFunction.apply(
        t, group_size=spec.group_size, bits=4, symmetric=spec.scheme.symmetric, on_backward=cb), g)
    assert bits_equal(call[0], g)                     # dL/dy first ...
    assert bits_equal(call[1], t.grad)                # ... then dL/dx
    assert int(np.sum(call[2])) == int(np.sum(t.grad == 0)) and call[3] is None


def test_refuse_dynamic_quantizers_names_the_first():
    class Holder(Module):
        def __init__(self):
            super().__init__()
            self.static = FakeQuantize(QuantizationConfig().activation, "static")
            self.first = BlockFakeQuantize(make_spec("per_group_symmetric", 4, 32), "first")
            self.second = BlockFakeQuantize(make_spec("per_tensor_absmean"), "second")

    with pytest.raises(ConfigError, match=r"^convert_to_quantized: quantizer 'first' uses per_group_symmetric \(int4, "
                                          r"group_size=32\); a QAT model's QDQ form holds per-tensor and "
                                          r"per-channel grids only"):
        refuse_dynamic_quantizers(Holder().named_modules(), "convert_to_quantized")
    holder = Holder()
    del holder.first
    with pytest.raises(ConfigError, match=r"^export: quantizer 'second' uses per_tensor_absmean \(int2_narrow\); "):
        refuse_dynamic_quantizers(holder.named_modules(), "export")
    refuse_dynamic_quantizers([("static", FakeQuantize(QuantizationConfig().weight))], "convert")  # nothing raised


# ---------------------------------------------------------------- BitNet b1.58, marked torch

def _ternary_by_the_paper(w, scale):
    """BitNet b1.58's equations 1-3 in PyTorch, given s = mean|w| + eps: clamp(round(w / s), -1, 1) * s."""
    return (w / scale).round().clamp(-1, 1) * scale


def _bitnet_weight_quant(w):
    """BitNet's released weight_quant over the last axis of ``w``'s blocks:
    ``s = 1 / w.abs().mean().clamp(min=1e-5)``, then ``(w * s).round().clamp(-1, 1) / s``."""
    s = 1 / w.abs().mean(dim=-1, keepdim=True).clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1) / s, s


@pytest.mark.torch
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 64), columns=st.sampled_from([8, 32, 96, 256]),
       exponent=st.integers(-3, 1), group_size=st.sampled_from([None, 8, 32]))
def test_ternary_against_the_paper_and_bitnets_released_code(seed, rows, columns, exponent, group_size):
    import torch

    if group_size is not None and columns % group_size:
        group_size = columns
    w = values(seed, (rows, columns), exponent)
    blocks = w.reshape(1, -1) if group_size is None else w.reshape(rows, columns // group_size, group_size)
    ours = fake_quantize_ternary(w, group_size).reshape(blocks.shape)
    scale = absmean_scale(blocks)[..., None]
    tw = torch.tensor(blocks)
    # 1. the paper's formula with our scale (the float64 mean + eps, rounded once): bit for bit; with
    # PyTorch's float32 mean + eps: the same wherever that rounds to the same scale
    assert bits_equal(_ternary_by_the_paper(tw, torch.tensor(scale)).numpy(), ours)
    float32_scale = tw.abs().mean(dim=-1, keepdim=True) + 1e-5
    same = np.broadcast_to(float32_scale.numpy() == scale, blocks.shape)
    assert bits_equal(_ternary_by_the_paper(tw, float32_scale).numpy()[same], ours[same])
    # 2. BitNet's released code: its scale is mean|w|, not mean|w| + 1e-5; every nonzero output is about
    # 1e-5 smaller in magnitude, and the weights with |w| in [s_code / 2, s / 2] round to +-1 there, 0 here
    reference, inverse = _bitnet_weight_quant(tw)
    s_code = (1 / inverse).numpy()
    atol = 8 * float(np.spacing(scale).max())
    np.testing.assert_allclose(scale - s_code, 1e-5, rtol=0, atol=atol)
    q_ours = np.clip(np.rint(blocks / scale), -1, 1)
    q_code = (tw * inverse).round().clamp(-1, 1).numpy()
    flipped = q_ours != q_code
    assert np.all(q_ours[flipped] == 0) and np.all(np.abs(q_code[flipped]) == 1)
    magnitude = np.abs(blocks)[flipped]
    assert np.all(magnitude >= np.broadcast_to(s_code, blocks.shape)[flipped] / 2 * (1 - 1e-6))
    assert np.all(magnitude <= np.broadcast_to(scale, blocks.shape)[flipped] / 2 * (1 + 1e-6))
    kept = ~flipped
    np.testing.assert_allclose(np.abs(ours[kept] - reference.numpy()[kept]), np.abs(q_ours[kept]) * 1e-5,
                               rtol=0, atol=atol)


@pytest.mark.torch
def test_bitnets_released_code_is_1e5_away_on_gpt_sized_weights():
    # docs/numerics.md ("Ternary weights (absmean)"): the paper's s = mean + 1e-5 and BitNet's code's
    # s = max(mean, 1e-5) differ by ~6e-4 of the scale on a GPT-2-initialised weight (std 0.02), and
    # the weights that close to a rounding boundary round the other way
    import torch

    w = values(0, (256, 256)) * F32(0.02)
    scale = absmean_scale(w.reshape(1, -1))[0]
    reference, inverse = _bitnet_weight_quant(torch.tensor(w.reshape(1, -1)))
    s_code = float((1 / inverse).item())
    assert abs(scale - s_code) / np.spacing(scale) > 1000               # thousands of ulps, not one
    q_code = (torch.tensor(w) * inverse.reshape(())).round().clamp(-1, 1).numpy()
    assert np.sum(np.clip(np.rint(w / scale), -1, 1) != q_code) > 0     # weights ternarised differently
    difference = np.abs(fake_quantize_ternary(w) - reference.numpy().reshape(w.shape)).max()
    assert difference == pytest.approx(scale, rel=1e-3)                  # a whole step, where one flipped
