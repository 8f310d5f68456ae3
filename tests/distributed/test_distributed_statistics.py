"""QAT statistics in a data-parallel run (ranks simulated by ThreadGroup): every value
describes the global batch, every rank holds the same statistics, and they are those of
one process training on the global batches.

Which comparisons are exact: the forward statistics of values every rank computes
bitwise as one process does (batch_min/batch_max, their moving averages, the
histogram's percentiles, clip_fraction) are reductions that lose nothing (min, max,
integer counts). SQNR sums the same float64 terms in another order, and a data-parallel
gradient is a weighted sum of the ranks' float32 gradients rather than one computation
over the batch: those compare with a tight tolerance. Across ranks everything is bitwise
equal: every value is computed from the same reduced numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

import qatcore
from qatcore import nn
from qatcore.data import DataLoader, ShardedLoader
from qatcore.data.sharding import share_bounds
from qatcore.distributed import DataParallel, ThreadGroup
from qatcore.errors import ConfigError
from qatcore.optim import SGD
from qatcore.process_group import use_group
from qatcore.quantization import FakeQuantize, QScheme, QuantizationConfig, QuantSpec
from qatcore.quantization.qat import QATPreparer, QATSchedule, StatisticsConfig, calibrate
from qatcore.quantization.qat.statistics_collector import SAMPLE_ELEMENTS, StatisticsCollector

# the series whose values are reductions that lose nothing; the others differ by rounding
EXACT_FORWARD = ("batch_min", "batch_max", "batch_min_ema", "batch_max_ema", "p0.1", "p1", "p50", "p99", "p99.9",
                 "clip_fraction")
# values computed from weights and qparams only, the same on every rank without a reduction
FROM_WEIGHTS = ("scale_mean", "scale_min", "scale_max", "zero_point_mean", "observed_min", "observed_max")


def _series(statistics) -> dict[tuple[str, str], tuple[list, np.ndarray]]:
    return {(name, key): (s.steps.tolist(), s.values)
            for name, q in statistics.quantizers.items() for key, s in q.series.items()}


def _assert_ranks_identical(per_rank: list[dict]) -> None:
    for rank, series in enumerate(per_rank[1:], 1):
        assert series.keys() == per_rank[0].keys(), f"rank {rank} recorded other series"
        for key, (steps, values) in series.items():
            assert steps == per_rank[0][key][0], f"{key}: steps differ on rank {rank}"
            assert np.array_equal(values, per_rank[0][key][1], equal_nan=True), f"{key}: differs on rank {rank}"


# ---- a lone quantizer: the reductions themselves, on values known bit for bit ------------------------------

def _lone_quantizer(learnable: bool) -> FakeQuantize:
    if learnable:
        # grad_factor given: by default it is 1 / sqrt(numel * qmax) of the *local* activation,
        # which differs between a rank's share and the global batch (the scale gradient
        # DataParallel applies then differs from one process's, and scale_grad records it)
        spec = QuantSpec(bits=4, signed=True, scheme="per_tensor_symmetric", learnable="lsq",
                         grad_factor=1 / np.sqrt(51200 * 7))
        quantizer = FakeQuantize(spec, name="act")
        quantizer.observer_enabled.data[...] = False
        quantizer.scale.data = np.array([0.3], dtype=np.float32)   # as if learned, the same on every rank
        quantizer.zero_point.data = np.zeros(1, dtype=np.float32)
        quantizer.qparams_ready.data[...] = True
        return quantizer
    spec = QuantSpec(bits=8, signed=True, narrow_range=True, scheme=QScheme.PER_TENSOR_SYMMETRIC, observer="minmax")
    return FakeQuantize.with_fixed_qparams(spec, 2.5 / 127, 0, name="act")


def _sample_steps(batches: list[np.ndarray], upstream: np.ndarray, rows: slice, learnable: bool):
    """One sample step of a lone activation quantizer per global batch in ``batches``, on its
    rows ``rows``, with a mean loss over them: the local dL/dy is ``upstream / n``, so the
    global batch's is ``upstream / N``, whatever the shares."""
    quantizer = _lone_quantizer(learnable)
    collector = StatisticsCollector(StatisticsConfig(every=1))
    object.__setattr__(quantizer, "recorder", (collector, "activation"))
    local = rows.stop - rows.start
    for step, x in enumerate(batches):
        collector.begin_step(step, local)
        y = quantizer(qatcore.tensor(x[rows], requires_grad=True))
        y.backward(upstream[rows] / np.float32(local))
    return _series(collector.statistics)


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "lsq"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_quantizers_statistics_over_ranks_are_those_of_the_global_batch(world_size, learnable):
    """A lone activation quantizer, global batches of 25 rows of (8, 16, 16): 51200 values,
    so SQNR and the histogram read one value in 3 (SAMPLE_ELEMENTS 16384) and each rank
    must start its stride where the global one falls in its share (shares of 13/12 and
    9/8/8 rows). Step 0: the last 8 rows (all of the last rank's share with 3 ranks) are
    NaN; step 1: a few NaN and inf; step 2: wider values (the histogram's grid grows);
    step 3: no finite value on any rank (no range recorded, the histogram unchanged).

    The quantizer's qparams are fixed (or a learned scale, equal on every rank), so
    everything but the gradient norms, the scale gradient and SQNR is compared exactly."""
    rng = np.random.default_rng(0)
    batch = 25
    x = rng.normal(size=(batch, 8, 16, 16)).astype(np.float32)
    assert x.size // SAMPLE_ELEMENTS == 3
    upstream = rng.normal(size=x.shape).astype(np.float32)
    tail_nan, some_nan = x.copy(), x.copy()
    tail_nan[-8:] = np.nan
    some_nan[10, 1, 3, :4] = [np.nan, np.inf, -np.inf, np.nan]
    batches = [tail_nan, some_nan, x * np.float32(3), np.full_like(x, np.nan)]
    reference = _sample_steps(batches, upstream, slice(0, batch), learnable)

    def rank_main(group):
        start, stop = share_bounds(batch, group.rank, group.world_size)
        return _sample_steps(batches, upstream, slice(start, stop), learnable)

    per_rank = ThreadGroup.run(world_size, rank_main)
    _assert_ranks_identical(per_rank)
    assert per_rank[0].keys() == reference.keys()
    assert reference[("act", "batch_max")][0] == [0, 1, 2]  # step 3 had no finite value
    for key, (steps, values) in reference.items():
        assert per_rank[0][key][0] == steps, key
        if key[1] in EXACT_FORWARD or key[1] in FROM_WEIGHTS:
            np.testing.assert_array_equal(per_rank[0][key][1], values, err_msg=str(key))
        else:  # sqnr_db, grad_norm_in/out, scale_grad: the same terms, added in another order
            np.testing.assert_allclose(per_rank[0][key][1], values, rtol=1e-6, err_msg=str(key))


# ---- a QAT model trained under DataParallel ---------------------------------------------------------------

X = np.random.default_rng(0).normal(size=(50, 1, 16, 16)).astype(np.float32)
Y = np.random.default_rng(1).integers(0, 10, 50)
BATCH, STEPS = 25, 4


def _prepared_model():
    """Conv(1->8, 16x16) -> ReLU -> Linear(2048 -> 10), no BatchNorm; 4-bit LSQ weights (their
    scales are learned, and equal on every rank as DataParallel averages their gradients);
    uint8 activations whose observers calibrate on the first global batch, then stay off
    (freeze_observers_at=0), so the activation qparams do not depend on synchronized
    observers. Calibrated outside the group: every rank sees the whole calibration batch."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, rng=np.random.default_rng(1)), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 10, rng=np.random.default_rng(2)))
    config = QuantizationConfig(weight=QuantSpec(bits=4, signed=True, narrow_range=True,
                                                 scheme="per_channel_symmetric", learnable="lsq"))
    preparer = QATPreparer(schedule=QATSchedule(freeze_observers_at=0), statistics=StatisticsConfig(every=1))
    with use_group(None):
        qat = preparer.prepare_for_qat(model, config)
        calibrate(qat, X[:BATCH])
    return preparer, qat


def _train(model, loader) -> None:
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9)
    done = 0
    while done < STEPS:
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            done += 1
            if done == STEPS:
                break


def _loader() -> DataLoader:
    return DataLoader(X, Y, BATCH, shuffle=True, rng=np.random.default_rng(5))


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_qat_model_trained_on_shares_records_the_statistics_of_the_global_batches(world_size):
    """Every step a sample step, 4 steps of global batches of 25 (shares 13/12 and 9/8/8),
    against one process on the same global batches.

    The conv output (51200 values, channel-major in memory) is subsampled one in 3, from
    where the global stride falls in each rank's share. After the first optimizer step
    the ranks' weights differ from the one process's in the last bits (a weighted sum of
    the ranks' gradients is not bitwise the batch's gradient), so the series compare with
    a tight tolerance, except the input quantizer's forward statistics at step 0, whose
    values are the data themselves (exact reductions, compared exactly). Across ranks
    every series is bitwise equal."""
    reference_preparer, reference = _prepared_model()
    _train(reference, _loader())
    expected = _series(reference_preparer.get_qat_statistics(reference))

    def rank_main(group):
        preparer, qat = _prepared_model()
        _train(DataParallel(qat), ShardedLoader(_loader(), group.rank, group.world_size))
        return _series(preparer.get_qat_statistics(qat))

    per_rank = ThreadGroup.run(world_size, rank_main)
    _assert_ranks_identical(per_rank)
    assert per_rank[0].keys() == expected.keys()
    conv_output = expected[("0.output", "grad_norm_in")]
    assert conv_output[0] == list(range(STEPS)) and np.all(conv_output[1] > 0)
    assert {key for _, key in expected} >= {"batch_max", "sqnr_db", "p99.9", "grad_norm_out", "clip_fraction",
                                           "scale_grad", "flip_rate"}
    for key, (steps, values) in expected.items():
        assert per_rank[0][key][0] == steps, key
        np.testing.assert_allclose(per_rank[0][key][1], values, rtol=1e-5, atol=1e-9, err_msg=str(key))
        if key[0] == "activation_fake_quant.x" and key[1] in EXACT_FORWARD:
            assert per_rank[0][key][1][0] == values[0], key


def test_begin_step_in_a_group_needs_the_local_batch_size():
    def rank_main(group):
        collector = StatisticsCollector(StatisticsConfig(every=1))
        with pytest.raises(ConfigError, match="local batch size must be given"):
            collector.begin_step(0)
        collector.begin_step(1, 3 + group.rank)
        return collector.share

    assert ThreadGroup.run(2, rank_main) == [3 / 7, 4 / 7]
