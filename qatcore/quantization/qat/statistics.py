"""QAT statistics: what quantization does to the model *while it trains*.

Every ``every`` training steps (a *sample step*) each quantizer of the QAT model
records, in bounded series indexed by step:

- quantization parameters: scale (mean/min/max over channels, and every
  channel's value with ``per_channel_detail``), zero point, the observer's range;
- ranges: the batch's min/max, an exponential moving average of them
  (c = 0.01 per sample), and for activations the 0.1 / 1 / 50 / 99 / 99.9
  percentiles of every sampled value, from a bounded histogram;
- gradient flow through the fake-quant node: the fraction of elements clipped
  (their gradient zeroed by the straight-through estimator), the L2 norm of the
  gradient entering (dL/dy) and leaving (dL/dx), and the scale gradient (LSQ);
- quantization error: SQNR = 10 log10(sum x^2 / sum (x - fake_quant(x))^2) dB
  (SQNR and the percentiles use at most 16384 elements per tensor, a fixed stride),
  and for weights the *flip rate*: the fraction of integer weights that changed
  since the previous sample (oscillation around a rounding boundary).

In a data-parallel run every value describes the global batch and every rank holds the
same statistics (the reductions are described in ``statistics_collector``).

Memory is bounded however long training runs: a :class:`Series` holds at most
``capacity`` points; when full it drops every other point and doubles its
sampling stride, so it always spans the whole run, at a resolution that halves
each time it fills (never more than ``capacity`` points, never fewer than half).

>>> stats = QATStatistics()
>>> for step in range(0, 100, 10):
...     stats.record("fc.weight", "weight", step, {"scale_mean": 0.01 + step * 1e-4})
>>> stats.quantizers["fc.weight"].series["scale_mean"].steps.tolist()[:3]
[0, 10, 20]
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from qatcore import serialization
from qatcore.errors import ConfigError
from qatcore.process_group import ProcessGroup
from qatcore.quantization.histogram_observer import bin_index, histogram_percentile, histogram_state, update_histograms
from qatcore.quantization.qat.statistics_plot import statistics_figure
from qatcore.text_table import text_table

__all__ = ["Series", "QuantizerStatistics", "QATStatistics", "StatisticsConfig", "PERCENTILES"]

PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
EMA_CONSTANT = 0.01


@dataclass(frozen=True)
class StatisticsConfig:
    """How statistics are collected: ``enabled`` (the off switch), a sample every
    ``every`` steps, at most ``capacity`` points per series, every channel's scale
    with ``per_channel_detail``, ``histogram_bins`` bins for activation percentiles."""

    enabled: bool = True
    every: int = 10
    capacity: int = 512
    per_channel_detail: bool = False
    histogram_bins: int = 256

    def __post_init__(self) -> None:
        if type(self.enabled) is not bool or type(self.per_channel_detail) is not bool:
            raise ConfigError("StatisticsConfig.enabled and per_channel_detail must be True or False")
        if type(self.every) is not int or self.every < 1:
            raise ConfigError(f"StatisticsConfig.every must be a positive int, got {self.every!r}")
        if type(self.capacity) is not int or self.capacity < 2 or self.capacity % 2:
            raise ConfigError(f"StatisticsConfig.capacity must be an even int >= 2, got {self.capacity!r}")
        if type(self.histogram_bins) is not int or not 16 <= self.histogram_bins <= 65536:
            raise ConfigError(
                f"StatisticsConfig.histogram_bins must be an int in [16, 65536], got {self.histogram_bins!r}"
            )


class Series:
    """A bounded series of (step, value) points (values: numbers or equal-shape arrays)."""

    def __init__(self, capacity: int = 512) -> None:
        if capacity < 2 or capacity % 2:
            raise ConfigError(f"Series capacity must be an even int >= 2, got {capacity}")
        self.capacity = capacity
        self.stride = 1        # keep one offered point in `stride`
        self.offered = 0       # points offered so far
        self._steps: list[int] = []
        self._values: list[Any] = []

    def append(self, step: int, value: Any) -> None:
        if self.offered % self.stride == 0:
            self._steps.append(int(step))
            self._values.append(value)
            if len(self._steps) > self.capacity:
                # full: keep every other point (the offered indices stay multiples of the new stride)
                self._steps = self._steps[::2]
                self._values = self._values[::2]
                self.stride *= 2
        self.offered += 1

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> np.ndarray:
        return np.asarray(self._steps, dtype=np.int64)

    @property
    def values(self) -> np.ndarray:
        return np.asarray(self._values, dtype=np.float64)

    def last(self) -> Any:
        return self._values[-1] if self._values else None

    def to_dict(self) -> dict:
        return {"capacity": self.capacity, "stride": self.stride, "offered": self.offered,
                "steps": self.steps, "values": self.values}

    @classmethod
    def from_dict(cls, data: dict) -> Series:
        series = cls(int(data["capacity"]))
        series.stride, series.offered = int(data["stride"]), int(data["offered"])
        series._steps = [int(s) for s in np.asarray(data["steps"])]
        values = np.asarray(data["values"], dtype=np.float64)
        series._values = [v if np.ndim(v) else float(v) for v in values]
        if len(series._steps) != len(series._values):
            raise ConfigError("statistics series: steps and values differ in length")
        return series


class QuantizerStatistics:
    """The series of one quantizer, plus the bounded state behind its percentiles,
    moving averages and flip rate."""

    def __init__(self, name: str, kind: str, capacity: int = 512, histogram_bins: int = 256) -> None:
        self.name, self.kind, self.capacity = name, kind, capacity
        self.series: dict[str, Series] = {}
        self.histogram = histogram_state(1, histogram_bins, with_sums=False)
        self.moving: dict[str, float] = {}
        self.previous_integers: np.ndarray | None = None

    def add(self, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key not in self.series:
                self.series[key] = Series(self.capacity)
            self.series[key].append(step, value)

    def update_histogram(self, x: np.ndarray, group: ProcessGroup | None = None) -> None:
        """Add the finite values of ``x`` to the histogram behind :meth:`percentiles`.

        With ``group`` (a data-parallel run, ``x`` this rank's values), the histogram
        becomes the one of every rank's values together, the same on every rank: the
        grid is grown for the global range [min_r min(x_r), max_r max(x_r)] (a "min"
        reduction of (min, -max)), the old counts are re-binned on it as they would be
        in one process, and each rank's counts on that grid are summed (a "sum"
        reduction). Binning a value does not depend on which rank holds it, so the
        counts, the extremes and the percentiles equal those of one process given the
        concatenated values, exactly.

        >>> stats = QuantizerStatistics("relu.output", "activation", histogram_bins=16)
        >>> stats.update_histogram(np.arange(101, dtype=np.float32))
        >>> round(stats.percentiles()["p50"], 1)   # within a bin width (101/16) of 50
        50.4
        """
        finite = x[np.isfinite(x)].astype(np.float32).reshape(1, -1)
        if group is None:
            if finite.size:
                update_histograms(self.histogram, finite, None, finite.min(axis=1), finite.max(axis=1),
                                  np.array([True]))
            return
        local = (np.array([finite.min(), -finite.max()], dtype=np.float64) if finite.size
                 else np.full(2, np.inf))  # a rank with no finite value takes no part in the range
        low, negative_high = group.allreduce(local, "min")
        if not np.isfinite(low):  # no finite value on any rank: every rank returns here
            return
        low32, high32 = np.array([low], dtype=np.float32), np.array([-negative_high], dtype=np.float32)
        # grow the grid and re-bin the old counts (equal on every rank), counting nothing yet
        update_histograms(self.histogram, finite[:, :0], None, low32, high32, np.array([True]))
        bins = self.histogram["histogram"].shape[1]
        index = bin_index(finite[0], self.histogram["histogram_start"][0], self.histogram["bin_width"][0], bins)
        self.histogram["histogram"][0] += group.allreduce(np.bincount(index, minlength=bins), "sum")

    def percentiles(self) -> dict[str, float]:
        counts = self.histogram["histogram"][0]
        if counts.sum() == 0:
            return {}
        start, width = float(self.histogram["histogram_start"][0]), float(self.histogram["bin_width"][0])
        lo, hi = float(self.histogram["data_min"][0]), float(self.histogram["data_max"][0])
        values = np.clip(histogram_percentile(counts, start, width, PERCENTILES), lo, hi)
        return {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, values)}

    def moving_average(self, key: str, value: float) -> float:
        previous = self.moving.get(key)
        self.moving[key] = value if previous is None else previous + EMA_CONSTANT * (value - previous)
        return self.moving[key]

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "capacity": self.capacity,
            "series": {k: s.to_dict() for k, s in self.series.items()},
            "histogram": {k: v.copy() for k, v in self.histogram.items()},
            "moving": dict(self.moving),
            "previous_integers": self.previous_integers,
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuantizerStatistics:
        stats = cls(data["name"], data["kind"], int(data["capacity"]), int(data["histogram"]["histogram"].shape[1]))
        stats.series = {k: Series.from_dict(v) for k, v in data["series"].items()}
        stats.histogram = {k: np.array(v) for k, v in data["histogram"].items()}
        stats.moving = {k: float(v) for k, v in data["moving"].items()}
        stats.previous_integers = data["previous_integers"]
        return stats


def sqnr_db(x: np.ndarray, y: np.ndarray, group: ProcessGroup | None = None) -> float:
    """10 log10(signal power / noise power), noise = x - y; inf when y == x exactly.

    SQNR = 10 log10(sum x^2 / sum (x - y)^2). With ``group`` (a data-parallel run, ``x``
    and ``y`` this rank's values) both sums run over every rank's values (one "sum"
    reduction) before the ratio: the SQNR of all the values together, the same on every
    rank, equal to one process's up to the order of the float64 additions.

    >>> x = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    >>> round(sqnr_db(x, np.array([1.0, -2.0, 2.9], dtype=np.float32)), 2)
    31.46
    """
    x64 = x.astype(np.float64, copy=False)
    noise = float(np.sum((x64 - y) ** 2))
    signal = float(np.sum(x64 * x64))
    if group is not None:
        signal, noise = (float(v) for v in group.allreduce(np.array([signal, noise]), "sum"))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class QATStatistics:
    """All quantizers' statistics of one QAT model (see the module docstring)."""

    def __init__(self, config: StatisticsConfig | None = None) -> None:
        self.config = config if config is not None else StatisticsConfig()
        self.quantizers: dict[str, QuantizerStatistics] = {}
        self.last_step = -1

    def quantizer(self, name: str, kind: str) -> QuantizerStatistics:
        if name not in self.quantizers:
            self.quantizers[name] = QuantizerStatistics(name, kind, self.config.capacity, self.config.histogram_bins)
        return self.quantizers[name]

    def record(self, name: str, kind: str, step: int, values: dict[str, Any]) -> None:
        """Add one sample of ``values`` for quantizer ``name`` at ``step``."""
        self.quantizer(name, kind).add(step, values)
        self.last_step = max(self.last_step, int(step))

    # ---- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain Python/numpy values (what qatcore.save stores)."""
        config = self.config
        return {
            "format": "qatcore.statistics", "version": 1, "last_step": self.last_step,
            "config": asdict(config),
            "quantizers": {name: q.to_dict() for name, q in self.quantizers.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> QATStatistics:
        if not isinstance(data, dict) or data.get("format") != "qatcore.statistics":
            raise ConfigError("not a qatcore statistics record (missing format 'qatcore.statistics')")
        if data.get("version") != 1:
            raise ConfigError(f"statistics record version {data.get('version')!r}; this qatcore reads version 1")
        config = data.get("config")
        known = {f.name for f in fields(StatisticsConfig)}
        if not isinstance(config, dict) or not set(config) <= known:
            raise ConfigError(f"statistics record: 'config' must be a mapping with keys from {sorted(known)}, "
                              f"got {sorted(config) if isinstance(config, dict) else type(config).__name__}")
        stats = cls(StatisticsConfig(**config))
        try:
            stats.last_step = int(data["last_step"])
            stats.quantizers = {name: QuantizerStatistics.from_dict(q) for name, q in data["quantizers"].items()}
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise ConfigError(f"statistics record is malformed ({type(e).__name__}: {e})") from None
        return stats

    def save(self, path) -> None:
        """Write through qatcore.save (msgpack container, atomic)."""
        serialization.save(self.to_dict(), path)

    @classmethod
    def load(cls, path) -> QATStatistics:
        return cls.from_dict(serialization.load(path))

    def to_json(self) -> str:
        """The series as JSON for harnesses: {"last_step", "config": {...}, "quantizers": {name:
        {"kind", "series": {key: {"steps": [...], "values": [...], "stride", "offered"}},
        "percentiles": {...}}}}; non-finite numbers become null. ``from_json`` reads it back."""
        def clean(values: np.ndarray) -> list:
            return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values.tolist()]

        out = {"last_step": self.last_step, "config": asdict(self.config), "quantizers": {}}
        for name, q in self.quantizers.items():
            out["quantizers"][name] = {
                "kind": q.kind,
                "series": {k: {"steps": s.steps.tolist(), "values": clean(s.values), "stride": s.stride,
                               "offered": s.offered} for k, s in q.series.items()},
                "percentiles": q.percentiles(),
            }
        return json.dumps(out, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> QATStatistics:
        """The statistics of a ``to_json()`` record (``statistics.json`` of a run), to read:
        the series, ``summary()`` and ``plot()`` are the original's (null reads back as NaN).
        What sampling goes on from (the histogram behind ``percentiles()``, the moving
        averages, the last integer weights) is only in ``to_dict()``/``save()``; the record's
        percentiles are in its JSON. ConfigError for text that is not such a record."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"not a statistics record of QATStatistics.to_json: not valid JSON ({e})") from None
        config = data.get("config") if isinstance(data, dict) else None
        if not isinstance(config, dict) or not isinstance(data.get("quantizers"), dict):
            raise ConfigError("not a statistics record of QATStatistics.to_json (no 'config' and 'quantizers')")
        try:
            stats = cls(StatisticsConfig(**config))
            stats.last_step = int(data["last_step"])
            for name, record in data["quantizers"].items():
                quantizer = stats.quantizer(name, str(record["kind"]))
                quantizer.series = {key: Series.from_dict({"capacity": stats.config.capacity, **series})
                                    for key, series in record["series"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"statistics record is malformed ({type(e).__name__}: {e})") from None
        return stats

    def summary(self) -> str:
        """A text table of the latest sample of every quantizer."""
        header = ["quantizer", "kind", "scale", "range", "clipped %", "SQNR dB", "flips %", "|g in|", "|g out|"]
        rows = [header]
        def last(q: QuantizerStatistics, key: str, fmt: str = "{:.4g}") -> str:
            series = q.series.get(key)
            value = None if series is None else series.last()
            return "-" if value is None or np.ndim(value) else fmt.format(value)

        for name, q in self.quantizers.items():
            low, high = last(q, "observed_min", "{:.3g}"), last(q, "observed_max", "{:.3g}")
            clipped = q.series.get("clip_fraction")
            clip = "-" if clipped is None or not len(clipped) else f"{100 * clipped.last():.2f}"
            flips = q.series.get("flip_rate")
            flip = "-" if flips is None or not len(flips) else f"{100 * flips.last():.2f}"
            rows.append([name, q.kind, last(q, "scale_mean"), f"[{low}, {high}]", clip, last(q, "sqnr_db", "{:.1f}"),
                         flip, last(q, "grad_norm_in"), last(q, "grad_norm_out")])
        lines = text_table(rows)
        lines.append(f"last step {self.last_step}; one sample every {self.config.every} steps")
        return "\n".join(lines)

    def figure(self, title: str | None = None):
        """The matplotlib Figure of these statistics, titled with ``title`` (what trained) and the
        last step sampled; legends outside the panels (``statistics_plot``). Needs matplotlib;
        the caller saves and closes it."""
        return statistics_figure(self, title)

    def plot(self, path, title: str | None = None) -> None:
        """Write :meth:`figure` as a PNG to ``path``. Needs matplotlib (``pip install
        'qatcore[plot]'``; a QATCoreError says so without it)."""
        fig = statistics_figure(self, title)
        try:
            fig.savefig(path, dpi=100)
        finally:
            import matplotlib.pyplot as plt  # loaded by statistics_figure: only to close the figure

            plt.close(fig)
