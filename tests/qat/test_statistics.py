"""QAT statistics: known synthetic cases, bounded memory, save/load, outputs."""

import json
import math

import numpy as np
import pytest

import qatcore
from qatcore.data import DataLoader, load_digits
from qatcore.errors import ConfigError, QATCoreError
from qatcore.models import DigitsCNN
from qatcore.optim import SGD
from qatcore.quantization import FakeQuantize, QScheme, QuantSpec
from qatcore.quantization.qat import QATPreparer, QATSchedule, QATStatistics, Series, StatisticsConfig
from qatcore.quantization.qat.statistics_collector import StatisticsCollector
from qatcore.training import train_one_epoch


def sample(quantizer, x, collector, kind="activation"):
    """One sample step of a lone quantizer: forward and backward with dy = 1."""
    object.__setattr__(quantizer, "recorder", (collector, kind))
    collector.begin_step(0)
    y = quantizer(qatcore.tensor(x, requires_grad=True))
    y.backward(np.ones_like(x))
    return collector.statistics.quantizers[quantizer.name]


def test_clip_fraction_matches_the_normal_tail():
    # int8 narrow symmetric, scale 1/127: values beyond 127.5/127 clip; for N(0, 1)
    # the clipped fraction is erfc(t / sqrt(2))
    spec = QuantSpec(bits=8, signed=True, narrow_range=True, scheme=QScheme.PER_TENSOR_SYMMETRIC,
                     observer="minmax")
    quantizer = FakeQuantize.with_fixed_qparams(spec, 1 / 127, 0, name="act")
    x = np.random.default_rng(0).normal(size=1_000_000).astype(np.float32)
    stats = sample(quantizer, x, StatisticsCollector())
    expected = math.erfc((127.5 / 127) / math.sqrt(2))
    assert stats.series["clip_fraction"].last() == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("bits", [4, 6, 8, 10])
def test_sqnr_of_uniform_and_sine_data(bits):
    # A b-bit grid over [-A, A] has 2^b - 1 steps of s = 2A / (2^b - 1); quantization noise
    # is uniform with power s^2 / 12. Uniform data (power A^2 / 3): SQNR = 20 log10(2^b - 1)
    # ~ 6.02 b dB. A full-scale sine (power A^2 / 2) adds 1.76 dB: 6.02 b + 1.76, once the
    # grid is fine enough (b >= 6) for the rounding noise of a sine to be uniform.
    spec = QuantSpec(bits=bits, signed=False, scheme=QScheme.PER_TENSOR_AFFINE, observer="minmax")
    n = 200_000
    uniform = np.random.default_rng(1).uniform(-1, 1, n).astype(np.float32)
    sine = np.sin(np.linspace(0, 2000 * np.pi, n)).astype(np.float32)
    cases = [(uniform, 20 * math.log10(2**bits - 1))] + ([(sine, 6.02 * bits + 1.76)] if bits >= 6 else [])
    for data, expected in cases:
        quantizer = FakeQuantize(spec, name="q")
        stats = sample(quantizer, data, StatisticsCollector())
        assert stats.series["sqnr_db"].last() == pytest.approx(expected, abs=0.5)


def test_frozen_observer_gives_a_flat_scale_series():
    x_train, y_train, _, _ = load_digits()
    preparer = QATPreparer(schedule=QATSchedule(freeze_observers_at=20), statistics=StatisticsConfig(every=5))
    qat = preparer.prepare_for_qat(DigitsCNN())
    optimizer = SGD(qat.parameters(), lr=0.02, momentum=0.9)
    train_one_epoch(qat, DataLoader(x_train, y_train, 32, shuffle=True, rng=np.random.default_rng(0)), optimizer)
    stats = preparer.get_qat_statistics(qat)
    for name in ("conv1.weight", "conv2.output", "activation_fake_quant.x"):
        series = stats.quantizers[name].series["scale_mean"]
        frozen = series.values[series.steps >= 20]
        assert len(frozen) >= 5 and np.all(frozen == frozen[0])
    moving = stats.quantizers["conv1.weight"].series["scale_mean"]
    assert len(np.unique(moving.values[moving.steps < 20])) > 1


def test_memory_stays_bounded_over_100000_steps():
    stats = QATStatistics(StatisticsConfig(capacity=64))
    for step in range(100_000):
        stats.record("layer.output", "activation", step, {"a": float(step), "b": 1.0})
    for series in stats.quantizers["layer.output"].series.values():
        assert 32 <= len(series) <= 64
        steps = series.steps
        assert steps[0] == 0 and steps[-1] >= 100_000 - 2 * series.stride and np.all(np.diff(steps) == series.stride)


def test_series_halves_resolution_when_full():
    series = Series(4)
    for step in range(9):
        series.append(step, step)
    assert series.steps.tolist() == [0, 4, 8] and series.stride == 4


def test_collection_runs_during_training_and_survives_save_load(tmp_path):
    x_train, y_train, _, _ = load_digits()
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(DigitsCNN())
    optimizer = SGD(qat.parameters(), lr=0.02, momentum=0.9)
    train_one_epoch(qat, DataLoader(x_train, y_train, 64, shuffle=True, rng=np.random.default_rng(0)), optimizer)
    stats = preparer.get_qat_statistics(qat)
    weight = stats.quantizers["conv2.weight"].series
    assert {"scale_mean", "flip_rate", "clip_fraction", "grad_norm_in", "grad_norm_out", "sqnr_db"} <= set(weight)
    activation = stats.quantizers["conv1.output"].series
    assert {"p99.9", "batch_max_ema", "observed_max"} <= set(activation)
    assert stats.last_step == 20 and len(weight["scale_mean"]) == 3
    path = tmp_path / "stats.qat"
    stats.save(path)
    loaded = QATStatistics.load(path)
    assert qatcore.dumps(loaded.to_dict()) == qatcore.dumps(stats.to_dict())
    assert loaded.summary() == stats.summary()
    parsed = json.loads(stats.to_json())
    assert parsed["quantizers"]["conv1.output"]["series"]["sqnr_db"]["steps"] == [0, 10, 20]
    assert "conv1.weight" in stats.summary()


def test_json_record_reads_back_to_the_same_series_and_summary():
    stats = QATStatistics(StatisticsConfig(every=5, capacity=16))
    for step in range(0, 100, 5):  # more samples than the capacity: the series thin out
        sqnr = math.inf if step == 0 else 40.0 + step  # a non-finite value is null in JSON, NaN read back
        stats.record("fc.weight", "weight", step, {"scale_mean": 0.01 + step * 1e-4, "sqnr_db": sqnr})
        stats.record("fc.output", "activation", step, {"scale_mean": 0.1, "observed_max": float(step)})
    loaded = QATStatistics.from_json(stats.to_json())
    assert loaded.summary() == stats.summary() and loaded.config == stats.config
    assert loaded.last_step == 95
    for name, quantizer in stats.quantizers.items():
        assert loaded.quantizers[name].kind == quantizer.kind
        for key, series in quantizer.series.items():
            restored = loaded.quantizers[name].series[key]
            assert restored.steps.tolist() == series.steps.tolist()
            assert (restored.stride, restored.offered) == (series.stride, series.offered) != (1, len(series))
            np.testing.assert_array_equal(restored.values, np.where(np.isinf(series.values), np.nan, series.values))
    with pytest.raises(ConfigError, match="not valid JSON"):
        QATStatistics.from_json("{")
    with pytest.raises(ConfigError, match="no 'config' and 'quantizers'"):
        QATStatistics.from_json('{"last_step": 3}')


def test_off_switch():
    x_train, y_train, _, _ = load_digits()
    preparer = QATPreparer(statistics=StatisticsConfig(enabled=False))
    qat = preparer.prepare_for_qat(DigitsCNN())
    optimizer = SGD(qat.parameters(), lr=0.02)
    train_one_epoch(qat, DataLoader(x_train[:128], y_train[:128], 64), optimizer)
    assert preparer.get_qat_statistics(qat).quantizers == {}


def test_lsq_scale_gradient_is_recorded():
    spec = QuantSpec(bits=4, signed=False, scheme="per_tensor_symmetric", learnable="lsq")
    quantizer = FakeQuantize(spec, name="act")
    stats = sample(quantizer, np.random.default_rng(2).uniform(0, 1, 1000).astype(np.float32), StatisticsCollector())
    assert stats.series["scale_grad"].last() > 0


def test_plot_writes_png_or_explains(tmp_path):
    stats = QATStatistics()
    stats.record("a.output", "activation", 0, {"scale_mean": 0.1, "observed_min": 0.0, "observed_max": 1.0,
                                               "clip_fraction": 0.01})
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(QATCoreError, match=r"pip install 'qatcore\[plot\]'"):
            stats.plot(tmp_path / "stats.png")
        return
    stats.plot(tmp_path / "stats.png")
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs", [dict(every=0), dict(capacity=3), dict(histogram_bins=4), dict(enabled=1)])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        StatisticsConfig(**kwargs)


@pytest.mark.parametrize("record, message", [
    ({"format": "qatcore.statistics", "version": 1}, "'config' must be a mapping"),
    ({"format": "qatcore.statistics", "version": 1, "config": {"bogus": 1}}, r"got \['bogus'\]"),
    ({"format": "qatcore.statistics", "version": 1, "config": {}, "last_step": 0, "quantizers": {"a": {}}},
     "statistics record is malformed .*KeyError"),
])
def test_malformed_statistics_records_are_refused_by_field(record, message):
    with pytest.raises(ConfigError, match=message):
        QATStatistics.from_dict(record)


def test_schedule_from_something_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match="QATSchedule: expected a mapping of its fields, got int"):
        QATSchedule.from_dict(5)


def _many_quantizers(count: int = 40) -> QATStatistics:
    stats = QATStatistics()
    for index in range(count):
        kind = "weight" if index % 2 else "activation"
        for step in range(0, 100, 10):
            values = {"scale_mean": 0.01 * (index + 1) * (1 + step / 1000), "clip_fraction": 0.001 * index}
            if kind == "activation":
                values.update(observed_min=-0.1 * index, observed_max=0.5 * index + step / 100)
            stats.record(f"layer{index}.{'weight' if index % 2 else 'output'}", kind, step, values)
    return stats


def test_the_plot_has_a_title_and_legends_outside_the_data(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    import matplotlib.pyplot as plt

    stats = _many_quantizers()
    fig = stats.figure("resnet20 on digits: weights 4-bit LSQ")
    try:
        fig.canvas.draw()
        assert fig.get_suptitle() == "resnet20 on digits: weights 4-bit LSQ\nlast sample at training step 90, " \
                                     "one every 10 steps"
        scale_axis, range_axis = fig.axes[:2]
        renderer = fig.canvas.get_renderer()
        for axis, entries in ((scale_axis, 40), (range_axis, 20)):  # one entry per activation range (min and max)
            legend = axis.get_legend()
            assert legend is not None and len(legend.get_texts()) == entries
            legend_box, data_box = legend.get_window_extent(renderer), axis.get_window_extent(renderer)
            assert legend_box.x0 >= data_box.x1  # to the right of the axes: it covers no curve
            assert legend_box.x1 <= fig.bbox.x1  # and inside the image
        assert fig.axes[2].get_legend() is None
    finally:
        plt.close(fig)
    stats.plot(tmp_path / "stats.png", title="untitled run")
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert QATStatistics().figure().get_suptitle() == "QAT statistics\nno training step recorded"
    plt.close("all")
