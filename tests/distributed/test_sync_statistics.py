"""Data-parallel statistics: BatchNorm and the observers inside a group see the global batch.

Every test runs the ranks as threads (``ThreadGroup``), gives each its share of a global
batch (uneven shares, and empty ones where an empty share is possible), and compares with
one process on the concatenated batch:

- BatchNorm: outputs, running statistics and gradients. The gradients are combined as the
  data-parallel wrapper combines them, sum_r w_r * grad_r with w_r = n_r / N and grad_r the
  gradient of the mean loss over rank r's share; dx (not a parameter) is checked as
  w_r * dx_r, the weight everything computed from it upstream gets. Equal within rounding
  (the sums are added in another order), bitwise across ranks where every rank must agree.
- QATConvBn2d (folded BatchNorm) in a prepared model: running statistics, observers,
  outputs and the conv weights' combined gradients.
- every observer kind: state bitwise equal to one process's (histogram bin sums within
  rounding), and bitwise equal across ranks.
"""

import numpy as np
import pytest

import qatcore.nn.functional as F
from qatcore import kernels
from qatcore.distributed import ThreadGroup
from qatcore.errors import ShapeError
from qatcore.models import DigitsCNN
from qatcore.process_group import current_group
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.config import QuantSpec
from qatcore.quantization.observer_factory import OBSERVER_CLASSES, make_observer
from qatcore.quantization.qat import QATConvBn2d, QATPreparer
from qatcore.tensor import Tensor


def shares(batch, sizes):
    """The global batch cut into consecutive shares of ``sizes`` samples."""
    return np.split(batch, np.cumsum(sizes)[:-1])


def channel_major(x):
    """x (N, C, ...) stored in (C, N, ...) order, as a convolution returns its output."""
    return np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)


def tolerances(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)


# ---- BatchNorm ---------------------------------------------------------------------------

def bn_step(x, probe, weight, bias, layout):
    """One training-mode BatchNorm on x with fresh running statistics and the mean loss
    (1/n) sum_i sum(out_i * probe_i) over x's samples: (out, dx, dweight, dbias, running
    mean, running var)."""
    dtype = x.dtype
    x = channel_major(x) if layout == "channel_major" else x
    if layout == "channel_major" and x.shape[0] > 1:
        assert kernels.layout.is_channel_major(x)  # the path a conv output takes
    running_mean, running_var = np.zeros(x.shape[1], dtype), np.ones(x.shape[1], dtype)
    xt = Tensor(x, requires_grad=True)
    wt, bt = Tensor(weight, requires_grad=True), Tensor(bias, requires_grad=True)
    out = F.batch_norm(xt, running_mean, running_var, wt, bt, training=True, momentum=0.3, eps=1e-5)
    loss = (out * Tensor(probe)).sum() / max(x.shape[0], 1)
    loss.backward()
    return out.numpy(), xt.grad, wt.grad, bt.grad, running_mean, running_var


def check_batch_norm(shape, sizes, dtype, layout, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    channel_scale = rng.uniform(0.5, 3.0, size=(shape[0],) + (1,) * (len(shape) - 1))
    x = (rng.normal(size=(n,) + shape) * channel_scale + 1.5).astype(dtype)
    probe = rng.normal(size=x.shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, size=shape[0]).astype(dtype)
    bias = rng.normal(size=shape[0]).astype(dtype)
    whole = bn_step(x, probe, weight, bias, layout)
    x_shares, probe_shares = shares(x, sizes), shares(probe, sizes)

    def rank(group):
        return bn_step(x_shares[group.rank], probe_shares[group.rank], weight, bias, layout)

    ranks = ThreadGroup.run(len(sizes), rank)
    tol = tolerances(dtype)
    w = [size / n for size in sizes]
    np.testing.assert_allclose(np.concatenate([r[0] for r in ranks]), whole[0], **tol)
    np.testing.assert_allclose(np.concatenate([wr * r[1] for wr, r in zip(w, ranks)]), whole[1], **tol)
    for index in (2, 3):  # dweight, dbias: what the wrapper makes of the local gradients
        combined = sum(wr * r[index].astype(np.float64) for wr, r in zip(w, ranks))
        np.testing.assert_allclose(combined, whole[index], **tol)
    stat_tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-7)
    for index in (4, 5):
        np.testing.assert_allclose(ranks[0][index], whole[index], **stat_tol)
        for other in ranks[1:]:  # every rank holds the same running statistics
            np.testing.assert_array_equal(other[index], ranks[0][index])
    for r, size in zip(ranks, sizes):
        assert r[0].shape == (size,) + shape and r[1].shape == (size,) + shape
        assert r[0].dtype == dtype and r[1].dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sizes", [(5, 3), (5, 3, 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channel_major"])
def test_batch_norm_2d_matches_one_process(dtype, sizes, layout):
    check_batch_norm((3, 4, 5), sizes, dtype, layout, seed=len(sizes))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sizes", [(5, 3), (5, 3, 4), (1, 6, 2)])
def test_batch_norm_plain_matches_one_process(dtype, sizes):
    """(N, C): one value per channel and sample, so a share of one sample is fine in a group."""
    check_batch_norm((6,), sizes, dtype, "contiguous", seed=7)


def test_batch_norm_with_an_empty_share():
    check_batch_norm((3,), (4, 0, 3), np.float64, "contiguous", seed=3)
    check_batch_norm((2, 3, 3), (4, 0, 3), np.float32, "contiguous", seed=4)


def test_batch_norm_needs_two_values_in_the_global_batch():
    x = np.ones((1, 3), np.float32)

    def rank(group):
        share = x if group.rank == 0 else x[:0]
        return F.batch_norm(Tensor(share), None, None, training=True)

    with pytest.raises(ShapeError, match="global batch"):
        ThreadGroup.run(2, rank)


def test_one_rank_is_the_single_process_path():
    """A group of one rank reduces nothing (current_group() is None): bit for bit the plain op."""
    rng = np.random.default_rng(5)
    x, probe = rng.normal(size=(6, 3, 2, 2)), rng.normal(size=(6, 3, 2, 2))
    weight, bias = np.ones(3), np.zeros(3)
    [inside] = ThreadGroup.run(1, lambda group: (current_group(), bn_step(x, probe, weight, bias, "contiguous")))
    assert inside[0] is None
    for got, expected in zip(inside[1], bn_step(x, probe, weight, bias, "contiguous")):
        np.testing.assert_array_equal(got, expected)


# ---- QATConvBn2d in a prepared model -------------------------------------------------------

CONFIGS = {
    "default": QuantizationConfig(),
    # histograms on both sides: the activations' are summed over the ranks, the weights' are not
    # (the weights are the same on every rank; summing would count them once per rank)
    "histograms": QuantizationConfig(
        weight=QuantSpec(bits=8, signed=True, narrow_range=True, scheme="per_channel_symmetric", axis=0,
                         observer="mse", observer_options={"bins": 64, "candidates": 16}),
        activation=QuantSpec(bits=8, signed=False, observer="histogram",
                             observer_options={"bins": 64, "percentile": 99.5})),
    # learned scales: the activations' first scale is the global batch's 2 mean|x| / sqrt(qmax),
    # and the gradient factor 1 / sqrt(numel qmax) counts the global batch's elements
    "lsq": QuantizationConfig(
        weight=QuantSpec(bits=4, signed=True, narrow_range=True, scheme="per_channel_symmetric", axis=0,
                         learnable="lsq"),
        activation=QuantSpec(bits=8, signed=False, learnable="lsq+")),
}


def prepared_model(config):
    model = DigitsCNN(channels=(4, 6), rng=np.random.default_rng(11))
    qat = QATPreparer(check_optimizers=False).prepare_for_qat(model, config)  # no optimizer steps here
    qat.train()
    return qat


def qat_steps(batches, probes, config):
    """Training-mode forward and backward of a fresh prepared model on each batch (mean loss
    over the batch's samples): the outputs, the conv weights' gradients of each step, and
    the buffers at the end."""
    qat = prepared_model(config)
    assert isinstance(qat.get_submodule("conv1"), QATConvBn2d)
    outputs, gradients = [], []
    for x, probe in zip(batches, probes):
        for p in qat.parameters():
            p.grad = None
        y = qat(x)
        ((y * Tensor(probe)).sum() / max(x.shape[0], 1)).backward()
        outputs.append(y.numpy())
        gradients.append({name: p.grad.astype(np.float64) for name, p in qat.named_parameters()
                          if p.grad is not None and (name.split(".")[0] in ("conv1", "conv2") or "scale" in name)})
    return outputs, gradients, {k: np.array(v) for k, v in qat.state_dict().items()}


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("sizes", [(5, 3), (5, 3, 4)])
def test_qat_conv_bn_matches_one_process(sizes, config):
    config = CONFIGS[config]
    rng = np.random.default_rng(2)
    n = sum(sizes)
    batches = [rng.random((n, 1, 8, 8), dtype=np.float32) * scale for scale in (1.0, 1.5, 0.8)]
    probes = [rng.normal(size=(n, 10)).astype(np.float32) for _ in batches]
    whole_out, whole_grad, whole_state = qat_steps(batches, probes, config)

    def rank(group):
        return qat_steps([shares(b, sizes)[group.rank] for b in batches],
                         [shares(p, sizes)[group.rank] for p in probes], config)

    ranks = ThreadGroup.run(len(sizes), rank)
    w = [size / n for size in sizes]
    for step in range(len(batches)):
        np.testing.assert_allclose(np.concatenate([r[0][step] for r in ranks]), whole_out[step],
                                   rtol=1e-5, atol=1e-5)
        assert set(ranks[0][1][step]) == set(whole_grad[step])
        for name in whole_grad[step]:  # conv weights, and with LSQ the learned scales and zero points
            combined = sum(wr * r[1][step][name] for wr, r in zip(w, ranks))
            np.testing.assert_allclose(combined, whole_grad[step][name], rtol=1e-4, atol=1e-6, err_msg=name)
    for key, expected in whole_state.items():
        for r in ranks[1:]:  # the same model state on every rank, bit for bit
            np.testing.assert_array_equal(r[2][key], ranks[0][2][key], err_msg=key)
        if "running_" in key or key.endswith(("fake_quant.scale", "fake_quant.zero_point")):
            # BatchNorm's statistics; the learned scales' first value, a mean over the global batch
            np.testing.assert_allclose(ranks[0][2][key], expected, rtol=1e-6, atol=1e-7, err_msg=key)
        elif key.endswith("histogram_sums"):  # added over the ranks in another order
            np.testing.assert_allclose(ranks[0][2][key], expected, rtol=1e-12, atol=1e-9, err_msg=key)
        else:  # observers (of reduced extremes; weights, the same everywhere), counters, qparams
            np.testing.assert_array_equal(ranks[0][2][key], expected, err_msg=key)


# ---- observers -----------------------------------------------------------------------------

def observer_specs():
    """One spec per (kind, scheme) the factory table supports, with small options."""
    options = {"minmax": {}, "moving_average_minmax": {"averaging_constant": 0.3},
               "histogram": {"bins": 32, "percentile": 99.0}, "mse": {"bins": 32, "candidates": 16}}
    specs = []
    for kind, classes in OBSERVER_CLASSES.items():
        for per_channel, cls in enumerate(classes):
            if cls is None:
                continue
            scheme = "per_channel_affine" if per_channel else "per_tensor_affine"
            specs.append(QuantSpec(scheme=scheme, axis=1 if per_channel else None, observer=kind,
                                   observer_options=options[kind.value]))
    return specs


SPECS = observer_specs()


def observer_batches(sizes, seed):
    """Global batches (N, 3, 4) whose range moves: grows (the histogram grid coarsens), jumps
    (a fresh grid), and has outliers in one rank's share only."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    batches = []
    for loc, spread in ((0.0, 1.0), (2.0, 3.0), (-1.0, 0.5), (50.0, 200.0), (0.0, 1.0)):
        b = (rng.normal(loc, spread, size=(n, 3, 4)) * np.array([1.0, 2.0, 0.5])[:, None]).astype(np.float32)
        batches.append(b)
    batches[2][-1, 0, 0] = 400.0  # in the last rank's share only
    return batches


def observe_all(spec, batches):
    observer = make_observer(spec, "probe")
    for b in batches:
        observer.observe(b)
    return {k: np.array(v) for k, v in observer.state_dict().items()}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.observer.value}-{s.scheme.value}")
@pytest.mark.parametrize("sizes", [(5, 3), (5, 3, 4), (4, 0, 3)])
def test_observer_state_matches_one_process(spec, sizes):
    batches = observer_batches(sizes, seed=len(sizes))
    whole = observe_all(spec, batches)
    ranks = ThreadGroup.run(len(sizes), lambda group: observe_all(
        spec, [shares(b, sizes)[group.rank] for b in batches]))
    assert int(whole["num_batches_observed"]) == len(batches)
    for key, expected in whole.items():
        for r in ranks[1:]:
            np.testing.assert_array_equal(r[key], ranks[0][key], err_msg=key)
        if key == "histogram_sums":
            # the ranks' float64 bin sums are added in another order than one process adds
            np.testing.assert_allclose(ranks[0][key], expected, rtol=1e-12, atol=1e-9, err_msg=key)
        else:
            np.testing.assert_array_equal(ranks[0][key], expected, err_msg=key)


def test_an_empty_share_takes_part_in_every_reduction():
    """A rank that sees nothing (first batch included) still ends with the global state."""
    spec = QuantSpec(observer="mse", observer_options={"bins": 16})
    rng = np.random.default_rng(9)
    batches = [rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3)]

    def rank(group):
        return observe_all(spec, [b if group.rank == 0 else b[:0] for b in batches])

    nothing, everything = ThreadGroup.run(2, rank)[::-1]
    whole = observe_all(spec, batches)
    for key in whole:
        np.testing.assert_array_equal(nothing[key], everything[key], err_msg=key)
        np.testing.assert_allclose(nothing[key], whole[key], rtol=1e-12, err_msg=key)
    assert int(nothing["num_batches_observed"]) == 3 and int(nothing["histogram"].sum()) == 90


def test_ignore_nan_share_with_nothing_finite():
    spec = QuantSpec(observer="minmax", ignore_nan=True)

    def rank(group):
        observer = make_observer(spec)
        observer.observe(np.array([np.nan, np.inf], np.float32) if group.rank == 0
                         else np.array([-2.0, 3.0], np.float32))
        return observer.min_val.data.item(), observer.max_val.data.item(), int(observer.num_batches_observed.data)

    assert ThreadGroup.run(2, rank) == [(-2.0, 3.0, 1)] * 2
