"""Channel-major activations (``qatcore.kernels.layout``): what conv2d returns, and what the ops
after it read without a copy. Each op must give the values and gradients it gives on the same
array stored C-contiguously; only the memory order differs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qatcore
import qatcore.nn.functional as F
from qatcore.autograd import gradcheck
from qatcore.kernels import layout
from qatcore.ops import conv as conv_op
from qatcore.quantization.fake_quantize import fake_quantize, fake_quantize_learnable


def channel_major(x):
    """The same (N, C, ...) values stored in (C, N, ...) order."""
    return np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)


def values_and_grads(fn, *arrays):
    """fn's output array and the gradients of sum(output * fixed weights) w.r.t. each input."""
    tensors = [qatcore.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    weights = np.random.default_rng(99).standard_normal(out.shape).astype(out.data.dtype)
    (out * qatcore.tensor(weights)).sum().backward()
    return out.data, [t.grad for t in tensors]


def assert_same(a, b, exact):
    if exact:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


CONVS = [  # (C, K, kernel, stride, padding, groups): 3x3, strided, pointwise (no im2col), grouped, depthwise
    (3, 4, 3, 1, 1, 1), (4, 6, 3, 2, 1, 1), (5, 3, 1, 1, 0, 1), (4, 2, 1, 2, 0, 1), (4, 4, 3, 1, 1, 2),
    (4, 4, 3, 1, 1, 4), (6, 6, 3, 2, 1, 6),
]


def test_conv2d_returns_channel_major_output():
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 5)).astype(np.float32)
    out = F.conv2d(x, np.ones((4, 2, 3, 3), np.float32), padding=1).data
    assert layout.is_channel_major(out) and out.shape == (3, 4, 5, 5)


@pytest.mark.parametrize("c, k, kernel, stride, padding, groups", CONVS)
def test_conv2d_reads_channel_major_input_as_c_contiguous(c, k, kernel, stride, padding, groups):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, c, 6, 7)).astype(np.float32)
    w = rng.standard_normal((k, c // groups, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)

    def conv(t, weight, bias):
        return F.conv2d(t, weight, bias, stride, padding, groups=groups)

    ref_out, ref_grads = values_and_grads(conv, x, w, b)
    out, grads = values_and_grads(conv, channel_major(x), w, b)
    pointwise = (kernel, stride, padding) == (1, 1, 0)
    # im2col copies either layout into the same columns: the same GEMM, the same bits; a
    # pointwise conv multiplies the channel rows in place (BLAS on a strided operand)
    assert_same(out, ref_out, exact=not pointwise)
    for got, expected in zip(grads, ref_grads):
        assert_same(got, expected, exact=not pointwise)
    if groups < c:  # im2col's dx is channel-major; the depthwise kernels keep the gradient's layout
        assert layout.is_channel_major(grads[0])


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 4), c=st.integers(1, 3), k=st.integers(1, 3), kernel=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), chunk=st.integers(1, 4000), seed=st.integers(0, 2**16))
def test_conv2d_gives_the_same_result_in_chunks(n, c, k, kernel, stride, chunk, seed):
    """A batch is unfolded ``_CHUNK_BYTES`` of columns at a time; the size of a chunk only
    regroups dW's per-sample terms."""
    rng = np.random.default_rng(seed)
    x = channel_major(rng.standard_normal((n, c, 5, 6)))
    w = rng.standard_normal((k, c, kernel, kernel))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv_op, "_CHUNK_BYTES", 2**40)
        whole_out, whole_grads = values_and_grads(lambda t, u: F.conv2d(t, u, stride=stride, padding=kernel // 2),
                                                  x, w)
        patch.setattr(conv_op, "_CHUNK_BYTES", chunk)
        out, grads = values_and_grads(lambda t, u: F.conv2d(t, u, stride=stride, padding=kernel // 2), x, w)
    np.testing.assert_allclose(out, whole_out, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, whole_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_gradients_through_a_channel_major_chain(monkeypatch):
    """float64 gradient check of conv -> batch norm -> relu -> pointwise conv -> strided conv,
    every activation channel-major, in chunks of one sample."""
    monkeypatch.setattr(conv_op, "_CHUNK_BYTES", 1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 5, 5))
    w1, w2, w3 = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((4, 3, 1, 1)), rng.standard_normal((2, 4, 3, 3))
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)

    def chain(x, w1, w2, w3, gamma, beta):
        y = F.conv2d(x, w1, padding=1)
        y = F.relu(F.batch_norm(y, None, None, gamma, beta, training=True))
        y = F.conv2d(y, w2)
        assert layout.is_channel_major(y.data)
        return F.conv2d(y, w3, stride=2, padding=1)

    assert gradcheck(chain, [x, w1, w2, w3, gamma, beta])


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (5, 2)])
def test_batch_norm_reads_channel_major_input(shape):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    gamma, beta = rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)
    stats = {}

    def bn(t, g, b, key):
        stats[key] = (np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32))
        return F.batch_norm(t, *stats[key], g, b, training=True)

    ref_out, ref_grads = values_and_grads(lambda t, g, b: bn(t, g, b, "c"), x, gamma, beta)
    out, grads = values_and_grads(lambda t, g, b: bn(t, g, b, "cm"), channel_major(x), gamma, beta)
    # the per-channel sums run in the kernel's fixed order over N*M values in both layouts,
    # but split into rows differently (N rows of M, or one row of N*M)
    assert layout.is_channel_major(out) and layout.is_channel_major(grads[0])
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    for got, expected in zip(stats["cm"], stats["c"]):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_fake_quantize_reads_channel_major_input(axis):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 2
    channels = 1 if axis is None else x.shape[axis]
    scale = rng.uniform(0.01, 0.05, channels).astype(np.float32)
    zero_point = rng.integers(100, 150, channels).astype(np.float32)

    def fq(t, s):
        return fake_quantize_learnable(t, s, qatcore.tensor(zero_point), 0, 255, axis)

    ref_out, ref_grads = values_and_grads(fq, x, scale)
    out, grads = values_and_grads(fq, channel_major(x), scale)
    np.testing.assert_array_equal(out, ref_out)  # element-wise: the same bits in any order
    np.testing.assert_array_equal(grads[0], ref_grads[0])
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-6)
    assert layout.is_channel_major(out)
    np.testing.assert_array_equal(fake_quantize(channel_major(x), scale, zero_point, 0, 255, axis),
                                  fake_quantize(x, scale, zero_point, 0, 255, axis))


@pytest.mark.parametrize("pool", [
    lambda t: F.max_pool2d(t, 2), lambda t: F.max_pool2d(t, 3, 2, 1), lambda t: F.avg_pool2d(t, 2),
    lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False), lambda t: F.adaptive_avg_pool2d(t, 1),
])
def test_pooling_reads_channel_major_input(pool):
    x = np.random.default_rng(5).permutation(4 * 3 * 6 * 6).reshape(4, 3, 6, 6).astype(np.float32)  # no ties
    ref_out, ref_grads = values_and_grads(pool, x)
    out, grads = values_and_grads(pool, channel_major(x))
    np.testing.assert_array_equal(out, ref_out)  # each plane pooled alone: the same bits
    np.testing.assert_array_equal(grads[0], ref_grads[0])
