"""Observers: qparams against the formulas of docs/numerics.md (QParams.from_range on numpy
extremes, an independent moving-average recurrence), degenerate inputs, NaN/Inf,
the histogram and MSE observers, state_dict round trips and, when PyTorch is
installed, torch.ao.quantization's observers where the formulas coincide."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qatcore
from qatcore.errors import ConfigError, ObserverError
from qatcore.quantization.config import QuantSpec
from qatcore.quantization.dtypes import INT4, INT4_NARROW, INT8, INT8_NARROW, UINT4, UINT8, QuantDType
from qatcore.quantization.histogram_observer import HistogramObserver
from qatcore.quantization.mse_observer import MSEObserver
from qatcore.quantization.observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    Observer,
    PerChannelMinMaxObserver,
)
from qatcore.quantization.observer_factory import OBSERVER_CLASSES, make_observer
from qatcore.quantization.qparams import QParams
from qatcore.quantization.qscheme import QScheme
from qatcore.tensor import Tensor

DTYPES = [INT8, INT8_NARROW, UINT8, INT4, INT4_NARROW, UINT4, QuantDType(16, True), QuantDType(2, False)]


def make_spec(dtype=UINT8, scheme=QScheme.PER_TENSOR_AFFINE, observer="minmax", axis=None, **kwargs):
    if scheme.per_channel and axis is None:
        axis = 0
    return QuantSpec(bits=dtype.bits, signed=dtype.signed, narrow_range=dtype.narrow_range, scheme=scheme,
                     axis=axis, observer=observer, **kwargs)


def scheme_for(per_channel: bool, symmetric: bool) -> QScheme:
    return {(False, False): QScheme.PER_TENSOR_AFFINE, (False, True): QScheme.PER_TENSOR_SYMMETRIC,
            (True, False): QScheme.PER_CHANNEL_AFFINE, (True, True): QScheme.PER_CHANNEL_SYMMETRIC}[
        (per_channel, symmetric)]


def assert_qparams_equal(actual: QParams, expected: QParams) -> None:
    np.testing.assert_array_equal(actual.scale, expected.scale)
    np.testing.assert_array_equal(actual.zero_point, expected.zero_point)
    assert actual.axis == expected.axis and actual.dtype == expected.dtype


def channel_rows(x: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


# every (observer kind, scheme) the factory accepts (the dynamic schemes have no observer)
SUPPORTED = [(kind, scheme) for kind in ("minmax", "moving_average_minmax", "histogram", "mse")
             for scheme in QScheme if not scheme.dynamic and not (kind == "histogram" and scheme.per_channel)]


def supported_id(case):
    return f"{case[0]}-{case[1].value}"


# ---- hypothesis data ------------------------------------------------------------------------
# every finite float32, subnormals included; the moving average stays below 1e30 so its
# float32 differences cannot overflow (that path has its own test)
ANY_FINITE32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
BOUNDED32 = st.floats(min_value=float(np.float32(-1e30)), max_value=float(np.float32(1e30)), width=32,
                      allow_subnormal=True)


@st.composite
def batches_per_tensor(draw, max_batches=3, elements=ANY_FINITE32):
    count = draw(st.integers(1, max_batches))
    shapes = hnp.array_shapes(min_dims=1, max_dims=4, max_side=5)
    return [draw(hnp.arrays(np.float32, shapes, elements=elements)) for _ in range(count)]


@st.composite
def batches_per_channel(draw, max_batches=3, elements=ANY_FINITE32):
    """(axis, batches): 1-4-D arrays with the same channel count along ``axis``, other sides free."""
    ndim = draw(st.integers(1, 4))
    axis = draw(st.integers(0, ndim - 1))
    channels = draw(st.integers(1, 4))
    batches = []
    for _ in range(draw(st.integers(1, max_batches))):
        shape = list(draw(hnp.array_shapes(min_dims=ndim, max_dims=ndim, max_side=4)))
        shape[axis] = channels
        batches.append(draw(hnp.arrays(np.float32, tuple(shape), elements=elements)))
    return axis, batches


# ---- MinMax and moving average against the formulas -----------------------------------------
@given(batches=batches_per_tensor(), dtype=st.sampled_from(DTYPES), symmetric=st.booleans())
def test_minmax_per_tensor_matches_from_range(batches, dtype, symmetric):
    scheme = scheme_for(False, symmetric)
    observer = make_observer(make_spec(dtype, scheme, "minmax"))
    assert isinstance(observer, MinMaxObserver)
    for batch in batches:
        observer.observe(batch)
    values = np.concatenate([b.ravel() for b in batches])
    assert observer.min_val.data.tolist() == [values.min()]
    assert observer.max_val.data.tolist() == [values.max()]
    expected = QParams.from_range(values.min(), values.max(), dtype, scheme)
    assert_qparams_equal(observer.calculate_qparams(), expected)


@given(case=batches_per_channel(), dtype=st.sampled_from(DTYPES), symmetric=st.booleans())
def test_minmax_per_channel_matches_from_range(case, dtype, symmetric):
    axis, batches = case
    scheme = scheme_for(True, symmetric)
    observer = make_observer(make_spec(dtype, scheme, "minmax", axis=axis))
    assert isinstance(observer, PerChannelMinMaxObserver)
    for batch in batches:
        observer.observe(batch)
    rows = np.concatenate([channel_rows(b, axis) for b in batches], axis=1)
    lo, hi = rows.min(axis=1), rows.max(axis=1)
    np.testing.assert_array_equal(observer.min_val.data, lo)
    np.testing.assert_array_equal(observer.max_val.data, hi)
    expected = QParams.from_range(lo, hi, dtype, scheme, axis=axis)
    assert_qparams_equal(observer.calculate_qparams(), expected)


def moving_average_reference(lows: list[np.ndarray], highs: list[np.ndarray], c: float):
    """The first batch's extremes, then m <- m + c * (cur - m) in float32 (docs/numerics.md); a
    channel where float32 overflows or leaves min > max is redone in float64 and rounded."""
    low, high = lows[0].astype(np.float32), highs[0].astype(np.float32)
    for cur_low, cur_high in zip(lows[1:], highs[1:]):
        next_low, next_high = low.copy(), high.copy()
        for i in range(low.size):
            a = np.float32(low[i] + np.float32(c) * (cur_low[i] - low[i]))
            b = np.float32(high[i] + np.float32(c) * (cur_high[i] - high[i]))
            if not (np.isfinite(a) and np.isfinite(b) and a <= b):
                a = np.float32(float(low[i]) + c * (float(cur_low[i]) - float(low[i])))
                b = np.float32(float(high[i]) + c * (float(cur_high[i]) - float(high[i])))
                # beyond 2^53 float64 cancels too (9.0e15 + (1 - 9.0e15) = 0): min <= max guard
                a = min(a, b)
            next_low[i], next_high[i] = a, b
        low, high = next_low, next_high
    return low, high


@given(batches=batches_per_tensor(max_batches=5, elements=BOUNDED32), dtype=st.sampled_from(DTYPES),
       symmetric=st.booleans(), c=st.sampled_from([0.01, 0.3, 1.0]))
def test_moving_average_per_tensor_matches_recurrence(batches, dtype, symmetric, c):
    scheme = scheme_for(False, symmetric)
    spec = make_spec(dtype, scheme, "moving_average_minmax", observer_options={"averaging_constant": c})
    observer = make_observer(spec)
    assert isinstance(observer, MovingAverageMinMaxObserver)
    for batch in batches:
        observer.observe(batch)
    lo, hi = moving_average_reference([b.min(keepdims=True).ravel() for b in batches],
                                      [b.max(keepdims=True).ravel() for b in batches], c)
    np.testing.assert_array_equal(observer.min_val.data, lo)
    np.testing.assert_array_equal(observer.max_val.data, hi)
    assert_qparams_equal(observer.calculate_qparams(), QParams.from_range(lo, hi, dtype, scheme))


@given(case=batches_per_channel(max_batches=5, elements=BOUNDED32), dtype=st.sampled_from(DTYPES),
       symmetric=st.booleans())
def test_moving_average_per_channel_matches_recurrence(case, dtype, symmetric):
    axis, batches = case
    scheme = scheme_for(True, symmetric)
    observer = make_observer(make_spec(dtype, scheme, "moving_average_minmax", axis=axis))
    assert isinstance(observer, MovingAveragePerChannelMinMaxObserver)
    for batch in batches:
        observer.observe(batch)
    lo, hi = moving_average_reference([channel_rows(b, axis).min(axis=1) for b in batches],
                                      [channel_rows(b, axis).max(axis=1) for b in batches], 0.01)
    np.testing.assert_array_equal(observer.min_val.data, lo)
    np.testing.assert_array_equal(observer.max_val.data, hi)
    assert_qparams_equal(observer.calculate_qparams(), QParams.from_range(lo, hi, dtype, scheme, axis=axis))


# ---- degenerate inputs --------------------------------------------------------------------
DEGENERATE = {
    "zeros": [np.zeros((4, 3), np.float32)],
    "constant": [np.full((3, 5), 3.7, np.float32)],
    "negative_constant": [np.full((2, 2), -2.5, np.float32)],
    "single_element": [np.array([[5.0]], np.float32)],
    "huge": [np.array([[1e38, -1e38], [3e38, -3.4e38]], np.float32)],
    "huge_then_opposite": [np.full((2, 2), -3.4e38, np.float32), np.full((2, 2), 3.4e38, np.float32)],
    "tiny_denormal": [np.full((2, 3), 1e-40, np.float32)],
    "tiny_mixed": [np.array([[1e-40, -1e-40], [0.0, 1e-45]], np.float32)],
    "tiny_then_huge": [np.full((2, 2), 1e-40, np.float32),
                       np.array([[0.0, 1e38], [-1e-40, 2.0]], np.float32)],
}


@pytest.mark.parametrize("case", SUPPORTED, ids=supported_id)
@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_inputs_give_finite_positive_scales(case, name):
    kind, scheme = case
    for dtype in (INT8_NARROW, UINT8, INT4):
        observer = make_observer(make_spec(dtype, scheme, kind, axis=1 if scheme.per_channel else None))
        for batch in DEGENERATE[name]:
            observer.observe(batch)
        qparams = observer.calculate_qparams()
        assert np.all(np.isfinite(qparams.scale)) and np.all(qparams.scale > 0), (name, qparams.scale)
        assert np.all(qparams.zero_point >= dtype.qmin) and np.all(qparams.zero_point <= dtype.qmax)
        assert np.all(np.isfinite(observer.min_val.data)) and np.all(np.isfinite(observer.max_val.data))
        assert np.all(observer.min_val.data <= observer.max_val.data)
        values = np.concatenate([b.ravel() for b in DEGENERATE[name]])
        # every range lies within the data's extremes widened to include 0 (MSE shrinks toward 0)
        assert observer.min_val.data.min() >= min(values.min(), 0)
        assert observer.max_val.data.max() <= max(values.max(), 0)


def test_moving_average_keeps_min_below_max_when_float32_cancels():
    # found by hypothesis: in float32, 16777220 + (1 - 16777220) = 0, below the new minimum 1
    observer = make_observer(make_spec(observer="moving_average_minmax",
                                       observer_options={"averaging_constant": 1.0}))
    observer.observe(np.array([16777220.0, 0.0], np.float32))
    observer.observe(np.array([1.0], np.float32))
    assert observer.min_val.data.tolist() == [1.0] and observer.max_val.data.tolist() == [1.0]


def test_moving_average_does_not_overflow_near_the_float32_limit():
    observer = make_observer(make_spec(observer="moving_average_minmax",
                                       observer_options={"averaging_constant": 0.5}))
    observer.observe(np.array([-3.4e38], np.float32))
    observer.observe(np.array([3.4e38], np.float32))
    assert observer.max_val.data.tolist() == [np.float32(0.0)]  # (-3.4e38 + 3.4e38) / 2 in float64, rounded
    assert np.isfinite(observer.calculate_qparams().scale).all()


# ---- NaN / Inf ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", SUPPORTED, ids=supported_id)
def test_nan_and_inf_raise_an_error_naming_the_observer(case):
    kind, scheme = case
    observer = make_observer(make_spec(INT8, scheme, kind), name="block2.conv.weight")
    clean = np.array([[0.5, -1.0, 2.0]], np.float32)
    observer.observe(clean)
    before = observer.state_dict()
    bad = np.array([[np.nan, 1.0, np.inf, np.nan, -np.inf, 0.0]], np.float32)
    with pytest.raises(ObserverError) as info:
        observer.observe(bad)
    message = str(info.value)
    assert type(observer).__name__ in message and "'block2.conv.weight'" in message
    assert "2 NaN and 2 Inf" in message and "ignore_nan" in message
    after = observer.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing poisoned


def test_values_beyond_float32_count_as_inf():
    observer = make_observer(make_spec(observer="minmax"), name="x")
    with pytest.raises(ObserverError, match="0 NaN and 1 Inf"):
        observer.observe(np.array([1.0, 1e300]))


@pytest.mark.parametrize("case", SUPPORTED, ids=supported_id)
def test_ignore_nan_observes_only_the_finite_values(case):
    kind, scheme = case
    rng = np.random.default_rng(3)
    ignoring = make_observer(make_spec(INT8, scheme, kind, ignore_nan=True), name="act")
    reference = make_observer(make_spec(INT8, scheme, kind), name="act")
    all_bad = np.full((1, 4), np.nan, np.float32)
    ignoring.observe(all_bad)  # an all-non-finite batch changes nothing, not even has_observed
    assert not ignoring.has_observed
    with pytest.raises(ObserverError, match="has not observed"):
        ignoring.calculate_qparams()
    for _ in range(3):
        batch = rng.normal(size=(1, 50)).astype(np.float32)
        dirty = batch.copy()
        dirty[0, rng.choice(50, 7, replace=False)] = [np.nan, np.inf, -np.inf, np.nan, np.nan, np.inf, np.nan]
        ignoring.observe(dirty)
        reference.observe(batch[np.isfinite(dirty)][None, :])
        before = ignoring.state_dict()
        ignoring.observe(all_bad)
        after = ignoring.state_dict()
        assert all(np.array_equal(before[k], after[k]) for k in before)
    assert_qparams_equal(ignoring.calculate_qparams(), reference.calculate_qparams())
    ref_state = reference.state_dict()
    for key, value in ignoring.state_dict().items():
        np.testing.assert_array_equal(value, ref_state[key], err_msg=key)


def test_ignore_nan_per_channel_channel_without_finite_values():
    spec = make_spec(INT8, QScheme.PER_CHANNEL_SYMMETRIC, "minmax", axis=1, ignore_nan=True)
    observer = make_observer(spec, name="fc.weight")
    observer.observe(np.array([[1.0, np.nan, -2.0], [0.5, np.inf, 3.0]], np.float32))
    with pytest.raises(ObserverError, match=r"'fc.weight'.*channels \[1\] along axis 1"):
        observer.calculate_qparams()
    observer.observe(np.array([[0.0, 4.0, 0.0]], np.float32))
    np.testing.assert_array_equal(observer.max_val.data, [1.0, 4.0, 3.0])
    assert observer.calculate_qparams().scale.shape == (3,)


# ---- errors -------------------------------------------------------------------------------
def test_never_observed_error_names_the_observer():
    observer = make_observer(make_spec(observer="histogram"))
    observer.name = "layer3.relu"
    with pytest.raises(ObserverError, match="HistogramObserver 'layer3.relu' has not observed any values"):
        observer.calculate_qparams()
    observer.observe(np.zeros((0, 3), np.float32))  # an empty batch is not an observation
    assert not observer.has_observed


def test_per_channel_shape_errors():
    observer = make_observer(make_spec(INT8, QScheme.PER_CHANNEL_AFFINE, "mse", axis=2), name="conv")
    assert observer.min_val.data.shape == (0,) and observer.histogram.data.shape[0] == 0
    with pytest.raises(ObserverError, match=r"axis 2 does not exist in an array of shape \(3, 4\)"):
        observer.observe(np.zeros((3, 4), np.float32))
    observer.observe(np.zeros((2, 2, 5), np.float32))
    assert observer.min_val.data.shape == (5,) and observer.histogram.data.shape == (5, 2048)
    with pytest.raises(ObserverError, match=r"'conv' has 5 channels along axis 2.*\(2, 2, 6\) with 6"):
        observer.observe(np.zeros((2, 2, 6), np.float32))


def test_a_rejected_first_batch_does_not_fix_the_channel_count():
    spec = make_spec(INT8, QScheme.PER_CHANNEL_AFFINE, "minmax", axis=0, ignore_nan=True)
    observer = make_observer(spec)
    observer.observe(np.full((3, 2), np.nan, np.float32))  # nothing finite: nothing changes
    assert observer.min_val.data.shape == (0,) and not observer.has_observed
    strict = make_observer(spec.replace(ignore_nan=False))
    with pytest.raises(ObserverError, match="1 NaN"):
        strict.observe(np.array([[np.nan, 1.0]], np.float32))
    assert strict.min_val.data.shape == (0,)
    observer.observe(np.ones((4, 2), np.float32))
    strict.observe(np.ones((4, 2), np.float32))
    assert observer.min_val.data.shape == strict.max_val.data.shape == (4,)


def test_the_observer_table_matches_the_classes_and_the_config():
    from qatcore.quantization.config import OBSERVER_OPTIONS

    assert set(OBSERVER_CLASSES) == set(OBSERVER_OPTIONS)
    for kind, classes in OBSERVER_CLASSES.items():
        for per_channel, cls in zip((False, True), classes):
            if cls is not None:
                assert cls.KIND == kind and per_channel in cls.PER_CHANNEL, (kind, cls.__name__)


def test_unsupported_combinations_are_config_errors():
    per_channel = make_spec(INT8, QScheme.PER_CHANNEL_SYMMETRIC, "histogram")
    supported = "per-tensor schemes only.*'minmax', 'moving_average_minmax' or 'mse'"
    with pytest.raises(ConfigError, match=supported):
        make_observer(per_channel, "conv1.weight")
    with pytest.raises(ConfigError, match=r"HistogramObserver does not support.*\['per_tensor_affine'"):
        HistogramObserver(per_channel)
    with pytest.raises(ConfigError, match="use make_observer"):
        MinMaxObserver(make_spec(observer="moving_average_minmax"))
    with pytest.raises(ConfigError, match="PerChannelMinMaxObserver does not support .*'per_tensor_affine'"):
        PerChannelMinMaxObserver(make_spec(observer="minmax"))
    with pytest.raises(ConfigError, match="needs a QuantSpec"):
        make_observer({"observer": "minmax"})
    with pytest.raises(TypeError):
        Observer(make_spec())  # abstract
    with pytest.raises(ObserverError, match="real numbers"):
        make_observer(make_spec()).observe(np.array(["a"]))


def test_factory_table():
    for kind, scheme in SUPPORTED:
        observer = make_observer(make_spec(INT8, scheme, kind), "n")
        assert observer.spec.observer == kind and observer.name == "n"
    assert type(make_observer(make_spec(INT8, QScheme.PER_CHANNEL_AFFINE, "mse"))) is MSEObserver


# ---- forward, state ------------------------------------------------------------------------
def test_forward_observes_in_both_modes_and_returns_its_input():
    observer = make_observer(make_spec(observer="minmax"))
    x = Tensor(np.array([1.0, -2.0], np.float32))
    assert observer(x) is x
    observer.eval()
    y = np.array([5.0], np.float32)
    assert observer(y) is y
    np.testing.assert_array_equal(observer.max_val.data, [5.0])
    assert int(observer.num_batches_observed.data) == 2
    assert "uint8, per_tensor_affine" in repr(observer)


@pytest.mark.parametrize("case", SUPPORTED, ids=supported_id)
def test_state_dict_round_trip(case, tmp_path):
    kind, scheme = case
    rng = np.random.default_rng(7)
    batches = [rng.normal(scale=1 + 2 * i, size=(6, 3, 4)).astype(np.float32) for i in range(6)]
    spec = make_spec(UINT8, scheme, kind, axis=1 if scheme.per_channel else None)
    original = make_observer(spec, "a")
    for batch in batches[:3]:
        original(batch)
    path = tmp_path / "observer.qatc"
    qatcore.save(original.state_dict(), path)
    restored = make_observer(spec, "a")
    restored(batches[5])  # sizes the per-channel buffers; its values are overwritten below
    restored.load_state_dict(qatcore.load(path))
    assert_qparams_equal(restored.calculate_qparams(), original.calculate_qparams())
    for batch in batches[3:]:
        original(batch)
        restored(batch)
    reference = original.state_dict()
    for key, value in restored.state_dict().items():
        assert value.dtype == reference[key].dtype
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    assert_qparams_equal(restored.calculate_qparams(), original.calculate_qparams())


def test_has_observed_survives_loading_into_a_fresh_per_tensor_observer():
    original = make_observer(make_spec(observer="moving_average_minmax"))
    original.observe(np.arange(5, dtype=np.float32))
    fresh = make_observer(make_spec(observer="moving_average_minmax"))
    assert not fresh.has_observed
    fresh.load_state_dict(original.state_dict())
    assert fresh.has_observed
    assert_qparams_equal(fresh.calculate_qparams(), original.calculate_qparams())


# ---- histogram -------------------------------------------------------------------------------
def histogram_spec(bins=2048, percentile=99.99):
    return make_spec(observer="histogram", observer_options={"bins": bins, "percentile": percentile})


def growing_batches(seed):
    """Batches whose range keeps growing, to force re-binning (dense data, see below)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(loc=i, scale=1.5**i, size=4000).astype(np.float32) for i in range(6)] + [
        rng.lognormal(size=3000).astype(np.float32) * 3, rng.uniform(-2, 2, size=2000).astype(np.float32)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bins,percentile", [(2048, 99.99), (256, 99.0), (64, 90.0)])
def test_histogram_percentiles_match_numpy(seed, bins, percentile):
    # Dense data: where consecutive order statistics are farther apart than a bin,
    # np.percentile interpolates between them and no histogram can follow it.
    observer = HistogramObserver(histogram_spec(bins, percentile), name="act")
    batches = growing_batches(seed)
    for batch in batches:
        observer.observe(batch)
    values = np.concatenate(batches)
    width = float(observer.bin_width.data[0])
    low, high = np.percentile(values.astype(np.float64), [100 - percentile, percentile])
    assert abs(float(observer.min_val.data[0]) - low) <= 2 * width
    assert abs(float(observer.max_val.data[0]) - high) <= 2 * width
    assert observer.data_min.data[0] == values.min() and observer.data_max.data[0] == values.max()
    expected = QParams.from_range(observer.min_val.data, observer.max_val.data, UINT8,
                                  QScheme.PER_TENSOR_AFFINE)
    assert_qparams_equal(observer.calculate_qparams(), expected)


def test_histogram_memory_is_bounded_and_rebinning_keeps_every_count():
    observer = HistogramObserver(histogram_spec(bins=100))
    rng = np.random.default_rng(5)
    total = 0
    for i in range(30):
        batch = rng.normal(loc=(-1) ** i * i, scale=1.3**i, size=rng.integers(1, 5000)).astype(np.float32)
        observer.observe(batch)
        total += batch.size
        assert observer.histogram.data.shape == (100,)
        assert int(observer.histogram.data.sum()) == total
    observer.observe(np.array([1e30], np.float32))  # a jump of far more than `bins` times: a fresh grid
    assert observer.histogram.data.shape == (100,) and int(observer.histogram.data.sum()) == total + 1


@pytest.mark.parametrize("first", ["spread", "point_mass"])
def test_histogram_rebinning_is_exact(first):
    # aligned coarsening never splits an old bin: the result equals binning all data on the final grid
    rng = np.random.default_rng(11)
    start = rng.normal(size=500) if first == "spread" else np.full(500, 0.3)
    batches = [start.astype(np.float32)] + [
        rng.normal(loc=0.5 * i, scale=1.7**i, size=700).astype(np.float32) for i in range(1, 7)]
    observer = HistogramObserver(histogram_spec(bins=128))
    for batch in batches:
        observer.observe(batch)
    lo, width = float(observer.histogram_start.data[0]), float(observer.bin_width.data[0])
    values = np.concatenate(batches).astype(np.float64)
    assert lo <= values.min() and values.max() <= lo + 128 * width
    expected = np.bincount(np.clip(np.floor((values - lo) / width), 0, 127).astype(int), minlength=128)
    np.testing.assert_array_equal(observer.histogram.data, expected)


def test_histogram_percentile_100_is_the_exact_range():
    observer = HistogramObserver(histogram_spec(bins=16, percentile=100.0))
    for batch in growing_batches(2):
        observer.observe(batch)
    values = np.concatenate(growing_batches(2))
    assert observer.min_val.data.tolist() == [values.min()]
    assert observer.max_val.data.tolist() == [values.max()]


@given(case=batches_per_channel(max_batches=4), kind=st.sampled_from(["histogram", "mse"]),
       per_channel=st.booleans(), symmetric=st.booleans(), bins=st.sampled_from([8, 33, 2048]))
def test_histogram_observers_invariants_on_any_data(case, kind, per_channel, symmetric, bins):
    # any finite float32s (1e38, subnormals, repeats): counts kept, memory bounded, ranges ordered
    axis, batches = case
    per_channel = per_channel and kind == "mse"
    spec = make_spec(INT8, scheme_for(per_channel, symmetric), kind, axis=axis if per_channel else None,
                     observer_options={"bins": bins})
    observer = make_observer(spec)
    for batch in batches:
        observer.observe(batch)
    rows = np.concatenate([channel_rows(b, axis) if per_channel else b.reshape(1, -1) for b in batches],
                          axis=1)
    counts = observer.histogram.data.reshape(-1, bins)
    assert counts.shape == (rows.shape[0], bins)
    np.testing.assert_array_equal(counts.sum(axis=1), rows.shape[1])
    np.testing.assert_array_equal(observer.data_min.data, rows.min(axis=1))
    np.testing.assert_array_equal(observer.data_max.data, rows.max(axis=1))
    low, high = observer.min_val.data, observer.max_val.data
    assert np.all(low <= high)
    assert np.all(low >= np.minimum(rows.min(axis=1), 0)) and np.all(high <= np.maximum(rows.max(axis=1), 0))
    qparams = observer.calculate_qparams()
    assert np.all(np.isfinite(qparams.scale)) and np.all(qparams.scale > 0)


# ---- MSE -------------------------------------------------------------------------------------
def fake_quant_mse(x: np.ndarray, qparams: QParams) -> float:
    return float(np.mean((qparams.dequantize(qparams.quantize(x)).astype(np.float64) - x) ** 2))


@pytest.mark.parametrize("dtype,symmetric",
                         [(UINT8, False), (INT8, True), (INT8_NARROW, True), (INT4, False)])
def test_mse_clips_outliers_and_beats_minmax(dtype, symmetric):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=20000), [12.0, -11.0, 15.0]]).astype(np.float32)
    scheme = scheme_for(False, symmetric)
    observer = MSEObserver(make_spec(dtype, scheme, "mse"))
    for part in np.array_split(x, 4):
        observer.observe(part)
    chosen = observer.calculate_qparams()
    minmax = QParams.from_range(x.min(), x.max(), dtype, scheme)
    assert x.min() < observer.min_val.data[0] <= observer.max_val.data[0] < x.max()
    assert fake_quant_mse(x, chosen) <= fake_quant_mse(x, minmax)
    assert chosen.scale[0] < minmax.scale[0]


def test_mse_per_channel_clips_outliers_per_channel_and_beats_minmax():
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(6, 2000)).astype(np.float32)
    weight[1, 7], weight[4, 9] = 7.0, -6.5
    spec = make_spec(INT4_NARROW, QScheme.PER_CHANNEL_SYMMETRIC, "mse", axis=0)
    observer = MSEObserver(spec)
    observer.observe(weight)
    chosen = observer.calculate_qparams()
    minmax = QParams.from_range(weight.min(axis=1), weight.max(axis=1), spec.dtype, spec.scheme, axis=0)
    assert observer.max_val.data[1] < 4 and observer.min_val.data[4] > -4  # the outliers are clipped
    assert len(set(chosen.scale.tolist())) > 1  # one decision per channel
    for c in range(6):
        one = QParams(chosen.scale[c:c + 1], chosen.zero_point[c:c + 1], spec.dtype)
        base = QParams(minmax.scale[c:c + 1], minmax.zero_point[c:c + 1], spec.dtype)
        assert fake_quant_mse(weight[c], one) <= fake_quant_mse(weight[c], base)
    assert chosen.scale[1] < minmax.scale[1] and chosen.scale[4] < minmax.scale[4]


def test_mse_prefers_the_widest_range_on_ties():
    # a range below eps * (qmax - qmin) gives every candidate the same scale (eps), hence the same error
    observer = MSEObserver(make_spec(UINT8, observer="mse", observer_options={"candidates": 10}))
    observer.observe(np.array([0.0, 1e-30, 5e-31], np.float32))
    assert observer.min_val.data.tolist() == [0.0] and observer.max_val.data[0] == np.float32(1e-30)


def brute_force_range(x: np.ndarray, dtype, scheme, candidates: int) -> tuple[np.float32, np.float32]:
    """Try every a = k / K on the raw values, keep the first strictly better (a = 1 first)."""
    best, best_range = np.inf, None
    for k in range(candidates, 0, -1):
        alpha = np.float32(k / candidates)
        lo, hi = x.min() * alpha, x.max() * alpha
        error = fake_quant_mse(x, QParams.from_range(lo, hi, dtype, scheme))
        if error < best:
            best, best_range = error, (lo, hi)
    return best_range


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype,symmetric",
                         [(UINT4, False), (INT4_NARROW, True), (UINT8, False), (INT8, True)])
def test_mse_equals_brute_force_on_a_small_case(seed, dtype, symmetric):
    # distinct values a grid step apart (wider than a bin), so the histogram holds them exactly
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 3.0, 401, dtype=np.float32)
    x = np.concatenate([rng.choice(grid[150:260], 25, replace=False), rng.choice(grid, 3, replace=False)])
    scheme = scheme_for(False, symmetric)
    observer = MSEObserver(make_spec(dtype, scheme, "mse", observer_options={"candidates": 40}))
    observer.observe(x[:10])
    observer.observe(x[10:])
    lo, hi = brute_force_range(x, dtype, scheme, 40)
    assert (observer.min_val.data[0], observer.max_val.data[0]) == (lo, hi)

    per_channel = scheme_for(True, symmetric)
    stacked = np.stack([x, x[::-1] * np.float32(0.5), np.float32(2) * x])  # (3, 28): scaled copies
    observer = MSEObserver(make_spec(dtype, per_channel, "mse", axis=0, observer_options={"candidates": 40}))
    observer.observe(stacked)
    for c in range(3):
        lo, hi = brute_force_range(stacked[c], dtype, scheme, 40)
        assert (observer.min_val.data[c], observer.max_val.data[c]) == (lo, hi)


# ---- PyTorch, where the formulas coincide -------------------------------------------------------
# qatcore's symmetric rule divides by (qmax - qmin) / 2; with the *full* int8/uint8 ranges
# that is 127.5, exactly PyTorch's rule, so those cases must agree bit for bit. The narrow
# int8 range (qatcore's weight default) divides by 127 and differs from torch's default
# full-range observer on purpose (docs/numerics.md, "Scale and zero point from an observed range"),
# so it is not compared.
TORCH_CASES = [("quint8", "per_tensor_affine", UINT8), ("qint8", "per_tensor_affine", INT8),
               ("qint8", "per_tensor_symmetric", INT8), ("quint8", "per_tensor_symmetric", UINT8)]


@pytest.mark.torch
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("torch_dtype,torch_scheme,dtype", TORCH_CASES)
@pytest.mark.parametrize("kind", ["minmax", "moving_average_minmax"])
def test_matches_torch_observers(kind, torch_dtype, torch_scheme, dtype, seed):
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's own deprecation notices
        from torch.ao.quantization import MinMaxObserver as TorchMinMax
        from torch.ao.quantization import MovingAverageMinMaxObserver as TorchMovingAverage
        torch_class = TorchMinMax if kind == "minmax" else TorchMovingAverage
        reference = torch_class(dtype=getattr(torch, torch_dtype), qscheme=getattr(torch, torch_scheme))
    observer = make_observer(make_spec(dtype, QScheme(torch_scheme), kind))
    rng = np.random.default_rng(seed)
    for i in range(5):
        batch = rng.normal(loc=0.3 * i - seed, scale=1 + i, size=(8, 16)) * 10.0 ** (seed - 1)
        batch = batch.astype(np.float32)
        observer.observe(batch)
        reference(torch.from_numpy(batch))
    scale, zero_point = reference.calculate_qparams()
    ours = observer.calculate_qparams()
    np.testing.assert_array_equal(ours.scale, scale.numpy().astype(np.float32).reshape(-1))
    np.testing.assert_array_equal(ours.zero_point, zero_point.numpy().astype(np.int32).reshape(-1))
    np.testing.assert_array_equal(observer.min_val.data, reference.min_val.numpy().reshape(-1))
