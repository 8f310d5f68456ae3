"""``HistogramObserver``: a bounded histogram of everything observed, and a range
from its percentiles, so that a few extreme values do not stretch the scale.

Not PyTorch's ``HistogramObserver``, despite the name: that one searches its histogram
for the range with the least L2 quantization error; this one reads percentiles. The
error-minimising observer here is :mod:`mse_observer` (``QuantSpec(observer="mse")``).

The histogram has a fixed number of bins (``observer_options["bins"]``) over a
grid ``[start, start + bins * width)``; memory does not grow with the data.

Update rule for one batch (NaN/Inf handled by the Observer base):

1. Grid. The first batch sets ``start = min(x)``, ``width = (max(x) - min(x)) / bins``.
   When a later batch falls outside the grid, the grid grows by *aligned
   coarsening*: it shifts left by a whole number ``m`` of old bins and its bin
   width doubles ``k`` times (the fewest that cover the new data), so every new
   bin edge is an old bin edge.
2. Re-binning. Each old bin's count moves, whole, to the new bin containing the
   old bin's centre. With aligned coarsening an old bin lies entirely inside one
   new bin, so re-binning is exact: the histogram equals the one that binning
   all the data on the final grid would give (up to float rounding of values
   lying on a bin edge), however often the grid grew.
   Two cases cannot be aligned and start a fresh grid over ``[min, max]`` of
   everything seen: a histogram that so far holds a single value (width 0, the
   move is then exact too) and a jump of more than ``bins`` times in range (the
   whole old histogram is narrower than one new bin; counts move by less than
   one new bin width). The total count is kept in every case.
3. Counting. The batch's values are added to the bins that contain them. In a
   data-parallel group (``qatcore.process_group``) the batch is the global one: the
   grid comes from the reduced extremes (``Observer.observe``), so it is the same on
   every rank, and each rank's bin counts (and bin sums) are added over the ranks
   before they are added to the histogram. The counts are then exactly one process's;
   the float64 bin sums are added in another order, so they may differ in the last bits.
4. Range. ``min_val`` / ``max_val`` become the ``(100 - p)``-th and ``p``-th
   percentiles (``p = observer_options["percentile"]``), read from the histogram
   with the values of a bin taken as spread evenly across it (within about one
   bin width of ``np.percentile`` of the data) and clamped to the exact extremes
   ``data_min`` / ``data_max``; ``p = 100`` gives those extremes themselves.

The helpers below work on ``(channels, bins)`` histograms; :mod:`mse_observer`
uses them per channel.

>>> import numpy as np
>>> from qatcore.quantization.config import QuantSpec
>>> spec = QuantSpec(observer="histogram", observer_options={"bins": 100, "percentile": 99.0})
>>> observer = HistogramObserver(spec, name="relu1")
>>> observer.observe(np.arange(1000, dtype=np.float32) / 1000)        # uniform on [0, 1)
>>> observer.observe(np.array([50.0], dtype=np.float32))              # one outlier
>>> observer.histogram.data.shape, int(observer.histogram.data.sum())
((100,), 1001)
>>> float(observer.data_max.data[0]), bool(observer.max_val.data[0] < 1.5)
(50.0, True)
"""

from __future__ import annotations

import numpy as np

from qatcore.process_group import current_group
from qatcore.quantization.config import ObserverKind
from qatcore.quantization.observer import Observer, empty_range

__all__ = ["HistogramObserver", "histogram_state", "update_histograms", "histogram_percentile"]


def histogram_state(channels: int, bins: int, with_sums: bool) -> dict[str, np.ndarray]:
    """The histogram buffers of ``channels`` channels (the exact extremes start at +inf/-inf)."""
    state = {
        "histogram": np.zeros((channels, bins), dtype=np.int64),
        "histogram_start": np.zeros(channels, dtype=np.float64),
        "bin_width": np.zeros(channels, dtype=np.float64),
        "data_min": np.full(channels, np.inf, dtype=np.float32),
        "data_max": np.full(channels, -np.inf, dtype=np.float32),
    }
    if with_sums:
        state["histogram_sums"] = np.zeros((channels, bins), dtype=np.float64)
    return state


def bin_index(values: np.ndarray, start: np.ndarray, width: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each value: floor((v - start) / width), clipped to [0, bins - 1]; 0 where width is 0.

    ``start`` and ``width`` broadcast against ``values`` (one per row)."""
    offset = np.asarray(values, dtype=np.float64) - start
    has_width = np.broadcast_to(width > 0, offset.shape)
    ratio = np.divide(offset, width, out=np.zeros_like(offset), where=has_width)
    return np.clip(np.floor(ratio), 0, bins - 1).astype(np.int64)


def covering_grid(start: np.ndarray, width: np.ndarray, had_data: np.ndarray, new_min: np.ndarray,
                  new_max: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel, the grid (start, width) that covers [new_min, new_max], and which grids moved.

    Fresh grid for channels without data; aligned coarsening (module docstring) where
    possible; a fresh grid over [new_min, new_max] otherwise. float64 throughout.
    """
    new_start, new_width = start.copy(), width.copy()
    fresh = ~had_data & (new_min <= new_max)
    grow = had_data & ((new_min < start) | (new_max > start + bins * width))
    safe_width = np.where(width > 0, width, 1.0)
    with np.errstate(over="ignore"):
        shift = np.maximum(np.ceil((start - new_min) / safe_width), 0.0)  # old bins added on the left
        needed = shift + np.ceil((new_max - start) / safe_width)           # old bins to cover in all
        factor = 2.0 ** np.ceil(np.log2(np.maximum(needed / bins, 1.0)))
    factor = np.where(bins * factor < needed, 2.0 * factor, factor)         # log2 rounding, to be safe
    aligned = grow & (width > 0) & (factor <= bins)
    new_start[aligned] = start[aligned] - shift[aligned] * width[aligned]
    new_width[aligned] = width[aligned] * factor[aligned]
    fresh |= grow & ~aligned
    new_start[fresh] = new_min[fresh]
    new_width[fresh] = (new_max[fresh] - new_min[fresh]) / bins
    return new_start, new_width, grow


def update_histograms(state: dict[str, np.ndarray], rows: np.ndarray, finite: np.ndarray | None,
                      batch_min: np.ndarray, batch_max: np.ndarray, present: np.ndarray) -> None:
    """Fold one batch (float32 rows, one per channel) into the histogram buffers, in place.

    ``state`` holds the arrays of :func:`histogram_state` (``histogram_sums`` optional:
    when present it accumulates the sum of the values in each bin, and follows the
    counts when they are re-binned).
    """
    counts, sums = state["histogram"], state.get("histogram_sums")
    start, width = state["histogram_start"], state["bin_width"]
    data_min, data_max = state["data_min"], state["data_max"]
    channels, bins = counts.shape
    had_data = data_min <= data_max
    new_min = np.where(present, np.minimum(data_min, batch_min), data_min)
    new_max = np.where(present, np.maximum(data_max, batch_max), data_max)
    new_start, new_width, grown = covering_grid(start, width, had_data, new_min.astype(np.float64),
                                                new_max.astype(np.float64), bins)
    if grown.any():
        moved = np.flatnonzero(grown)
        centres = start[moved, None] + (np.arange(bins) + 0.5) * width[moved, None]
        targets = bin_index(centres, new_start[moved, None], new_width[moved, None], bins)
        flat = (np.arange(moved.size)[:, None] * bins + targets).ravel()
        size = moved.size * bins
        moved_counts = np.bincount(flat, weights=counts[moved].ravel(), minlength=size)
        # float64 bincount of int64 counts is exact below 2**53 values
        counts[moved] = np.rint(moved_counts).astype(np.int64).reshape(moved.size, bins)
        if sums is not None:
            sums[moved] = np.bincount(flat, weights=sums[moved].ravel(), minlength=size).reshape(-1, bins)
    start[...], width[...] = new_start, new_width
    if finite is None:
        channel_of, values = np.repeat(np.arange(channels), rows.shape[1]), rows.ravel()
    else:
        channel_of, values = np.nonzero(finite)[0], rows[finite]
    index = bin_index(values, start[channel_of], width[channel_of], bins) + channel_of * bins
    batch_counts = np.bincount(index, minlength=channels * bins).reshape(channels, bins).astype(np.int64, copy=False)
    group = current_group()
    if group is not None:  # the global batch's counts, on the grid every rank shares
        batch_counts = group.allreduce(batch_counts, "sum")
    counts += batch_counts
    if sums is not None:
        batch_sums = np.bincount(index, weights=values.astype(np.float64), minlength=channels * bins).reshape(
            channels, bins)
        if group is not None:
            batch_sums = group.allreduce(batch_sums, "sum")
        sums += batch_sums
    data_min[...], data_max[...] = new_min, new_max


def histogram_percentile(counts: np.ndarray, start: float, width: float, percentile):
    """The ``percentile``-th percentile of one channel's histogram (float64); ``percentile``
    may be an array of them (one cumulative sum for all).

    Rank as in ``np.percentile`` (position (n - 1) * q / 100 among the sorted values);
    the n_b values of a bin are taken at the midpoints of n_b equal slices of it.
    """
    total = int(counts.sum())
    position = (total - 1) * np.asarray(percentile, dtype=np.float64) / 100.0 + 0.5  # in [0.5, total - 0.5]
    cumulative = np.cumsum(counts)
    b = np.searchsorted(cumulative, position, side="right")  # first bin whose count passes it
    before = cumulative[b] - counts[b]
    value = start + width * (b + (position - before) / counts[b])
    return float(value) if np.ndim(value) == 0 else value.astype(np.float64)


class HistogramObserver(Observer):
    """Per tensor: a bounded, exactly re-binned histogram; the range is its
    [100 - p, p] percentile range (update rule in the module docstring).

    Buffers: ``histogram`` (bins,) int64 counts; ``histogram_start``, ``bin_width``
    (1,) float64, the grid; ``data_min``, ``data_max`` (1,) float32, the exact
    extremes; ``min_val``, ``max_val`` (1,) float32, the percentile range that
    ``calculate_qparams`` uses. Per-channel schemes are not supported (use
    ``"mse"`` or the min/max observers).

    >>> import numpy as np
    >>> from qatcore.quantization.config import QuantSpec
    >>> observer = HistogramObserver(QuantSpec(observer="histogram", observer_options={"percentile": 100.0}))
    >>> observer.observe(np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32))
    >>> observer.min_val.data, observer.max_val.data
    (array([0.], dtype=float32), array([3.], dtype=float32))
    """

    KIND = ObserverKind.HISTOGRAM
    PER_CHANNEL = (False,)

    def _initial_state(self, channels: int) -> dict[str, np.ndarray]:
        state = histogram_state(1, self.spec.observer_options["bins"], with_sums=False)
        state["histogram"] = state["histogram"].reshape(-1)
        return {**empty_range(channels), **state}

    def _update(self, rows, finite, batch_min, batch_max, present) -> None:
        state = {name: getattr(self, name).data for name in
                 ("histogram", "histogram_start", "bin_width", "data_min", "data_max")}
        state["histogram"] = state["histogram"].reshape(1, -1)  # a view: updates land in the buffer
        update_histograms(state, rows, finite, batch_min, batch_max, present)
        p = float(self.spec.observer_options["percentile"])
        counts, start, width = state["histogram"][0], state["histogram_start"][0], state["bin_width"][0]
        data_min, data_max = state["data_min"], state["data_max"]
        if p == 100.0:  # the whole range: the exact extremes, not a bin's estimate of them
            low, high = float(data_min[0]), float(data_max[0])
        else:
            low = histogram_percentile(counts, start, width, 100.0 - p)
            high = histogram_percentile(counts, start, width, p)
        # clamp in float64, then round: a value between two float32s rounds to one of them
        self.min_val.data[...] = np.clip(low, float(data_min[0]), float(data_max[0]))
        self.max_val.data[...] = np.clip(high, float(data_min[0]), float(data_max[0]))
