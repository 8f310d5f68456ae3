"""Float64 central-difference gradient checks for every differentiable op."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qatcore.nn.functional as F
from qatcore import ops, tensor
from qatcore.autograd import gradcheck


def arr(rng, *shape, low=-2.0, high=2.0):
    return rng.uniform(low, high, size=shape)


def away_from(rng, shape, points, margin=0.05):
    """Random values at least ``margin`` away from each kink in ``points``."""
    x = rng.uniform(-3, 8, size=shape)
    for p in points:
        x = np.where(np.abs(x - p) < margin, p + 2 * margin, x)
    return x


@given(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
       st.integers(0, 2**16))
def test_binary_ops_broadcast(shapes, seed):
    rng = np.random.default_rng(seed)
    a, b = arr(rng, *shapes.input_shapes[0]), arr(rng, *shapes.input_shapes[1])
    b_safe = np.where(np.abs(b) < 0.2, 0.5, b)
    assert gradcheck(F.add, [a, b])
    assert gradcheck(F.sub, [a, b])
    assert gradcheck(F.mul, [a, b])
    assert gradcheck(F.div, [a, b_safe])


@pytest.mark.parametrize("name, fn, low, high", [
    ("neg", F.neg, -2, 2),
    ("exp", F.exp, -2, 2),
    ("log", F.log, 0.2, 3),
    ("sqrt", F.sqrt, 0.2, 3),
    ("sigmoid", F.sigmoid, -5, 5),
    ("tanh", F.tanh, -3, 3),
    ("pow2", lambda t: F.pow(t, 2), -2, 2),
    ("pow_frac", lambda t: F.pow(t, 1.5), 0.2, 3),
    ("pow_neg", lambda t: t ** -1.0, 0.3, 3),
    ("cast", lambda t: F.cast(t, np.float32).double() * 1.0, -2, 2),
])
def test_unary_ops(name, fn, low, high):
    rng = np.random.default_rng(1)
    # cast goes through float32, so its numeric derivative is coarse
    tol = dict(atol=1e-2, rtol=1e-2) if name == "cast" else {}
    assert gradcheck(fn, [rng.uniform(low, high, size=(3, 4))], eps=1e-3 if name == "cast" else 1e-6, **tol)


@pytest.mark.parametrize("fn, kinks", [
    (F.relu, [0.0]),
    (F.relu6, [0.0, 6.0]),
    (lambda t: F.leaky_relu(t, 0.1), [0.0]),
    (F.hardswish, [-3.0, 3.0]),
    (F.hardsigmoid, [-3.0, 3.0]),
    (lambda t: F.clamp(t, -1.0, 2.5), [-1.0, 2.5]),
    (lambda t: F.clamp(t, min=0.5), [0.5]),
    (lambda t: F.clamp(t, max=0.5), [0.5]),
])
def test_piecewise_ops(fn, kinks):
    rng = np.random.default_rng(2)
    assert gradcheck(fn, [away_from(rng, (4, 5), kinks)])


@given(st.sampled_from([((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 4)), ((2, 3), (3, 4)),
                        ((2, 2, 3), (3, 4)), ((2, 1, 2, 3), (3, 3, 4)), ((4, 3), (2, 3, 2))]),
       st.integers(0, 2**16))
def test_matmul(shapes, seed):
    rng = np.random.default_rng(seed)
    assert gradcheck(F.matmul, [arr(rng, *shapes[0]), arr(rng, *shapes[1])])


def test_linear():
    rng = np.random.default_rng(3)
    assert gradcheck(F.linear, [arr(rng, 4, 3), arr(rng, 2, 3), arr(rng, 2)])
    assert gradcheck(F.linear, [arr(rng, 2, 4, 3), arr(rng, 2, 3)])


@given(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), st.data())
def test_reductions(shape, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    dims = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                               st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True).map(tuple)))
    keepdim = data.draw(st.booleans())
    x = rng.permutation(np.arange(np.prod(shape), dtype=np.float64)).reshape(shape) * 0.37  # no ties
    assert gradcheck(lambda t: F.sum(t, dims, keepdim), [x])
    assert gradcheck(lambda t: F.mean(t, dims, keepdim), [x])
    assert gradcheck(lambda t: F.max(t, dims, keepdim), [x])
    axes = range(len(shape)) if dims is None else ([dims] if isinstance(dims, int) else dims)
    if np.prod([shape[a] for a in axes]) > 1:
        assert gradcheck(lambda t: F.var(t, dims, keepdim), [x])
        assert gradcheck(lambda t: F.var(t, dims, keepdim, correction=0), [x])


def test_max_ties_share_gradient():
    import qatcore

    x = qatcore.tensor([1.0, 3.0, 3.0], requires_grad=True)
    F.max(x).backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.5, 0.5])


def test_shape_ops():
    rng = np.random.default_rng(4)
    x = arr(rng, 2, 3, 4)
    assert gradcheck(lambda t: F.reshape(t, (4, -1)) * np.arange(6.0), [x])
    assert gradcheck(lambda t: F.flatten(t, 1) * np.arange(12.0), [x])
    assert gradcheck(lambda t: F.transpose(t, 0, 2), [x])
    assert gradcheck(lambda t: F.permute(t, (1, 2, 0)), [x])
    assert gradcheck(lambda t: t.T, [x])
    assert gradcheck(lambda t: t[1, :, ::2], [x])
    assert gradcheck(lambda t: t[..., 1:3], [x])
    assert gradcheck(lambda t: t[None, 0], [x])
    assert gradcheck(lambda t: t[np.array([0, 1, 1]), np.array([2, 0, 2])], [x])  # repeated index


def test_cat():
    rng = np.random.default_rng(5)
    assert gradcheck(lambda a, b, c: F.cat([a, b, c], dim=1),
                     [arr(rng, 2, 1, 3), arr(rng, 2, 2, 3), arr(rng, 2, 3, 3)])
    assert gradcheck(lambda a, b: F.cat([a, b], dim=-1), [arr(rng, 2, 2), arr(rng, 2, 3)])


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_family(dim):
    rng = np.random.default_rng(6)
    x = arr(rng, 3, 4, low=-5, high=5)
    assert gradcheck(lambda t: F.softmax(t, dim), [x])
    assert gradcheck(lambda t: F.log_softmax(t, dim), [x])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(reduction, smoothing):
    rng = np.random.default_rng(7)
    target = np.array([0, 3, 2, 3])
    assert gradcheck(lambda t: F.cross_entropy(t, target, reduction, smoothing), [arr(rng, 4, 5)])


def test_mse_loss():
    rng = np.random.default_rng(8)
    assert gradcheck(F.mse_loss, [arr(rng, 3, 2), arr(rng, 3, 2)])
    assert gradcheck(lambda a, b: F.mse_loss(a, b, "none"), [arr(rng, 3, 2), arr(rng, 3, 2)])


conv_configs = st.fixed_dictionaries({
    "n": st.integers(1, 2), "groups": st.sampled_from([1, 2]), "cg": st.integers(1, 2),
    "kg": st.integers(1, 2), "h": st.integers(3, 6), "w": st.integers(3, 6),
    "k": st.integers(1, 3), "stride": st.integers(1, 2), "padding": st.integers(0, 1),
    "dilation": st.integers(1, 2), "bias": st.booleans(), "seed": st.integers(0, 2**16),
})


@given(conv_configs)
def test_conv2d(c):
    if (c["h"] + 2 * c["padding"] - c["dilation"] * (c["k"] - 1) - 1) < 0 or \
       (c["w"] + 2 * c["padding"] - c["dilation"] * (c["k"] - 1) - 1) < 0:
        return
    rng = np.random.default_rng(c["seed"])
    cin, cout = c["cg"] * c["groups"], c["kg"] * c["groups"]
    x = arr(rng, c["n"], cin, c["h"], c["w"])
    w = arr(rng, cout, c["cg"], c["k"], c["k"])
    inputs = [x, w] + ([arr(rng, cout)] if c["bias"] else [])
    assert gradcheck(
        lambda *t: F.conv2d(t[0], t[1], t[2] if len(t) > 2 else None, c["stride"], c["padding"],
                            c["dilation"], c["groups"]),
        inputs,
    )


def test_conv2d_depthwise():
    rng = np.random.default_rng(9)
    assert gradcheck(lambda x, w: F.conv2d(x, w, padding=1, groups=3),
                     [arr(rng, 2, 3, 4, 4), arr(rng, 3, 1, 3, 3)])


depthwise_configs = st.fixed_dictionaries({
    "n": st.integers(1, 2), "c": st.integers(1, 3), "h": st.integers(1, 6), "w": st.integers(1, 6),
    "kh": st.integers(1, 3), "kw": st.integers(1, 3), "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "padding": st.tuples(st.integers(0, 2), st.integers(0, 2)),
    "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)), "bias": st.booleans(),
    "seed": st.integers(0, 2**16),
})


@given(depthwise_configs)
def test_conv2d_depthwise_path(c):
    """groups == C == K goes through ops.DepthwiseConv2d: x, weight and bias gradients, any geometry."""
    sizes = zip((c["h"], c["w"]), (c["kh"], c["kw"]), c["padding"], c["dilation"])
    if any(size + 2 * p - d * (k - 1) - 1 < 0 for size, k, p, d in sizes):
        return
    rng = np.random.default_rng(c["seed"])
    x = arr(rng, c["n"], c["c"], c["h"], c["w"])
    w = arr(rng, c["c"], 1, c["kh"], c["kw"])
    inputs = [x, w] + ([arr(rng, c["c"])] if c["bias"] else [])

    def depthwise(*t):
        return F.conv2d(t[0], t[1], t[2] if len(t) > 2 else None, c["stride"], c["padding"], c["dilation"], c["c"])

    assert type(depthwise(*(tensor(a, requires_grad=True) for a in inputs))._ctx) is ops.DepthwiseConv2d
    assert gradcheck(depthwise, inputs)


def test_conv2d_depthwise_matches_the_grouped_gemm_path():
    """The same convolution through ops.Conv2d (im2col + GEMM) and ops.DepthwiseConv2d, float64."""
    rng = np.random.default_rng(12)
    x, w, b = arr(rng, 2, 5, 7, 6), arr(rng, 5, 1, 3, 3), arr(rng, 5)
    g = arr(rng, 2, 5, 4, 2)
    params = {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 2)}
    results = []
    for op, extra in ((ops.Conv2d, {"groups": 5}), (ops.DepthwiseConv2d, {})):
        ts = [tensor(a, requires_grad=True) for a in (x, w, b)]
        out = op.apply(*ts, **params, **extra)
        (out * tensor(g)).sum().backward()
        results.append([out.numpy()] + [t.grad for t in ts])
    for gemm, direct in zip(*results):
        np.testing.assert_allclose(direct, gemm, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 3), st.integers(1, 2), st.integers(0, 1), st.integers(1, 2), st.integers(0, 2**16))
def test_pooling(k, stride, padding, dilation, seed):
    if padding > k // 2:
        padding = 0
    rng = np.random.default_rng(seed)
    x = rng.permutation(np.arange(2 * 2 * 5 * 6, dtype=np.float64)).reshape(2, 2, 5, 6) * 0.1  # no ties
    assert gradcheck(lambda t: F.max_pool2d(t, k, stride, padding, dilation), [x])
    assert gradcheck(lambda t: F.avg_pool2d(t, k, stride, padding), [x])
    assert gradcheck(lambda t: F.avg_pool2d(t, k, stride, padding, count_include_pad=False), [x])


def test_adaptive_avg_pool():
    rng = np.random.default_rng(10)
    assert gradcheck(lambda t: F.adaptive_avg_pool2d(t, 1), [arr(rng, 2, 3, 4, 4)])
    assert gradcheck(lambda t: F.adaptive_avg_pool2d(t, 2), [arr(rng, 2, 3, 4, 6)])


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2, 2), (3, 2, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(shape, training):
    rng = np.random.default_rng(11)
    c = shape[1]
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2, size=c)

    def fn(x, w, b):
        # fresh running stats each call: the numeric derivative must not see updates
        return F.batch_norm(x, mean.copy(), var.copy(), w, b, training=training)

    assert gradcheck(fn, [arr(rng, *shape), arr(rng, c), arr(rng, c)], atol=1e-5)


def test_dropout_fixed_mask():
    rng = np.random.default_rng(12)
    fn = lambda t: F.dropout(t, 0.3, True, np.random.default_rng(0))  # noqa: E731 - same mask every call
    assert gradcheck(fn, [arr(rng, 4, 5)])
