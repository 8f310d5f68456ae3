"""Fused batch-norm kernels against a float64 NumPy oracle."""


import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qatcore.kernels import batch_norm as kernels


def forward_oracle(x, weight, bias, eps):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    var = ((x64 - mean[None, :, None]) ** 2).mean(axis=(0, 2))
    inv_std = 1 / np.sqrt(var + eps)
    xhat = (x64 - mean[None, :, None]) * inv_std[None, :, None]
    return xhat * weight[None, :, None] + bias[None, :, None], xhat, mean, var, inv_std


def backward_oracle(grad, xhat, weight, inv_std):
    g64, count = grad.astype(np.float64), grad.shape[0] * grad.shape[2]
    dbias = g64.sum(axis=(0, 2))
    dweight = (g64 * xhat).sum(axis=(0, 2))
    dx = (weight * inv_std)[None, :, None] * (
        g64 - dbias[None, :, None] / count - xhat * dweight[None, :, None] / count)
    return dx, dweight, dbias


def check(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)).astype(dtype)
    weight = rng.normal(size=shape[1]).astype(dtype)
    bias = rng.normal(size=shape[1]).astype(dtype)
    out, mean, var, inv_std = kernels.batch_norm_train_forward(x, weight, bias, 1e-5)
    e_out, e_xhat, e_mean, e_var, e_inv = forward_oracle(x, weight, bias, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    assert out.dtype == dtype
    np.testing.assert_allclose(mean, e_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, e_var, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(inv_std, e_inv, rtol=1e-10)
    np.testing.assert_allclose(out, e_out, **tol)
    grad = rng.normal(size=shape).astype(dtype)
    dx, dweight, dbias = kernels.batch_norm_train_backward(grad, x, mean, inv_std, weight)
    e_dx, e_dw, e_db = backward_oracle(grad, e_xhat, weight.astype(np.float64), inv_std)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dbias, e_db, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dweight, e_dw, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, e_dx, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-4 if dtype == np.float32 else 1e-10)


@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 17), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**16))
def test_matches_oracle(n, c, m, dtype, seed):
    if n * m < 2:
        m = 2
    check((n, c, m), dtype, seed)


def test_constant_channel_is_finite():
    x = np.full((4, 2, 3), 7.0, dtype=np.float32)
    out, mean, var, inv_std = kernels.batch_norm_train_forward(
        x, np.ones(2, np.float32), np.zeros(2, np.float32), 1e-5)
    assert np.all(np.isfinite(out)) and np.all(out == 0) and np.all(var == 0)


def test_inputs_left_alone():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 4)).astype(np.float32)
    before = x.copy()
    kernels.batch_norm_train_forward(x, np.ones(2, np.float32), np.zeros(2, np.float32), 1e-5)
    np.testing.assert_array_equal(x, before)


def check_split(shape, dtype, seed):
    """The kernels of a synchronized BatchNorm (the fused computation split at its reductions)
    against the oracle with statistics given from outside, and bitwise against the fused pair
    when given the fused pair's own statistics."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)).astype(dtype)
    weight = rng.normal(size=shape[1]).astype(dtype)
    bias = rng.normal(size=shape[1]).astype(dtype)
    grad = rng.normal(size=shape).astype(dtype)
    x64, count = x.astype(np.float64), shape[0] * shape[2]
    # statistics "of another batch": the split kernels must use what they are given
    mean = rng.normal(size=shape[1])
    inv_std = rng.uniform(0.5, 2.0, size=shape[1])
    np.testing.assert_allclose(kernels.batch_norm_sums(x), x64.sum(axis=(0, 2)), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(kernels.batch_norm_squared_deviations(x, mean),
                               ((x64 - mean[None, :, None]) ** 2).sum(axis=(0, 2)), rtol=1e-12, atol=1e-9)
    xhat = (x64 - mean[None, :, None]) * inv_std[None, :, None]
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    out = kernels.batch_norm_normalize(x, weight, bias, mean, inv_std)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, xhat * weight[None, :, None] + bias[None, :, None], **tol)
    sums = kernels.batch_norm_gradient_sums(grad, x, mean, inv_std)
    np.testing.assert_allclose(sums[0], grad.astype(np.float64).sum(axis=(0, 2)), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sums[1], (grad * xhat).sum(axis=(0, 2)), rtol=1e-5, atol=1e-4)
    mean_g, mean_gx = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    dx = kernels.batch_norm_input_gradient(grad, x, mean, inv_std, weight, mean_g, mean_gx)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, (weight * inv_std)[None, :, None] * (
        grad - mean_g[None, :, None] - xhat * mean_gx[None, :, None]), **tol)
    if count == 0:
        return
    fused = kernels.batch_norm_train_forward(x, weight, bias, 1e-5)
    own_mean = kernels.batch_norm_sums(x) / count
    own_var = kernels.batch_norm_squared_deviations(x, own_mean) / count
    own_inv_std = 1.0 / np.sqrt(own_var + 1e-5)
    for got, expected in zip((own_mean, own_var, own_inv_std), fused[1:]):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(kernels.batch_norm_normalize(x, weight, bias, own_mean, own_inv_std), fused[0])
    dx, dweight, dbias = kernels.batch_norm_train_backward(grad, x, own_mean, own_inv_std, weight)
    sums = kernels.batch_norm_gradient_sums(grad, x, own_mean, own_inv_std)
    np.testing.assert_array_equal(sums[0], dbias)
    np.testing.assert_array_equal(sums[1], dweight)
    np.testing.assert_array_equal(
        kernels.batch_norm_input_gradient(grad, x, own_mean, own_inv_std, weight, sums[0] / count, sums[1] / count),
        dx)


@given(st.integers(0, 5), st.integers(1, 4), st.integers(1, 17), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**16))
def test_split_kernels_match_oracle_and_fused(n, c, m, dtype, seed):
    check_split((n, c, m), dtype, seed)


def test_runs_as_plain_python(run_without_jit):
    run_without_jit(__file__, """
        tests.check((3, 2, 5), np.float32, 1)
        tests.check((2, 3, 1), np.float64, 2)
        tests.check_split((3, 2, 9), np.float32, 3)
        tests.check_split((0, 2, 4), np.float64, 4)
    """)


@pytest.mark.parametrize("shape", [(2, 16, 1024), (1, 16, 2048), (2, 64, 64), (1, 320, 32), (3, 5, 13)])
def test_matches_oracle_on_the_networks_shapes(shape):
    """ResNet's and MobileNetV2's BatchNorms at batch 2, C-contiguous (N, C, H*W) and in the
    one-row-per-channel form of a channel-major activation (1, C, N*H*W); and a shape whose
    rows are not a multiple of the 8 partial sums."""
    for dtype in (np.float32, np.float64):
        check(shape, dtype, 7)
