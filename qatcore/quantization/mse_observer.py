"""``MSEObserver``: the clipping range that minimises the fake-quantization mean
squared error of the observed values, per tensor or per channel.

Clipping trades rounding error (a wide range has a coarse step) against clipping
error (values beyond the range are clamped). For each channel (or the tensor)
with exact observed extremes [min, max], the observer tries
``K = observer_options["candidates"]`` ranges shrunk toward zero,

    [a_k * min, a_k * max],   a_k = k / K,   k = K, K - 1, ..., 1

turns each into QParams by the rule of :meth:`QParams.from_range`, fake-quantizes
the values with them (float32, ``y = (clamp(z + rne(x * inv), qmin, qmax) - z) * s``)
and keeps the range with the smallest sum of squared errors (docs/numerics.md,
"Observers"). ``a = 1`` (plain min/max) is tried first and a later candidate
must be strictly better, so on ties the wider range wins and the result is never
worse than min/max on what the observer holds.

It accumulates; it does not decide per batch. The values seen so far are held
in a bounded histogram per channel (``observer_options["bins"]`` bins, grown and
exactly re-binned as in :mod:`histogram_observer`) that also keeps the sum of
the values in each bin; the search runs after every batch over all of them,
each bin standing for its count of copies of its mean. Why: like the other
non-averaging observers, ``calculate_qparams`` then depends on everything
observed, not on whichever batch came last (a per-batch choice jumps from batch
to batch and would need yet another rule to combine), memory stays
``channels * bins`` however much is observed, and the search costs
``K * (non-empty bins)`` per batch, not ``K * batch size``. The histogram is
exact while each bin holds one distinct value (small tensors, and the zeros of a
ReLU output); otherwise a value is off by less than a bin width (by default
2048 bins, about 8 per 8-bit quantization step). A weight that changes during
QAT stays in the histogram with its old values too, as with ``MinMaxObserver``.

Buffers: ``histogram`` (C, bins) int64 counts, ``histogram_sums`` (C, bins)
float64, ``histogram_start`` / ``bin_width`` (C,) float64, ``data_min`` /
``data_max`` (C,) float32 exact extremes, ``min_val`` / ``max_val`` (C,) float32:
the chosen range (C = 1 per tensor; 0 until the first batch per channel).

>>> import numpy as np
>>> from qatcore.quantization.config import QuantSpec
>>> spec = QuantSpec(bits=4, signed=True, narrow_range=True, scheme="per_tensor_symmetric", observer="mse")
>>> observer = MSEObserver(spec)
>>> observer.observe(np.concatenate([np.linspace(-1, 1, 1001), [4.0]]).astype(np.float32))
>>> float(observer.data_max.data[0]), float(observer.max_val.data[0])   # the outlier is clipped
(4.0, 1.6399999856948853)
"""

from __future__ import annotations

from typing import final

import numpy as np

from qatcore.quantization.config import ObserverKind
from qatcore.quantization.dtypes import QuantDType
from qatcore.quantization.histogram_observer import histogram_state, update_histograms
from qatcore.quantization.observer import Observer, empty_range
from qatcore.quantization.qparams import scale_zero_point_from_range

__all__ = ["MSEObserver", "mse_clipping_range"]

_STATE = ("histogram", "histogram_sums", "histogram_start", "bin_width", "data_min", "data_max")


def fake_quantize_values(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                         dtype: QuantDType) -> np.ndarray:
    """Fake quantization (docs/numerics.md) of float32 ``x`` with one scale/zero point per value.

    Near the float32 limit (q - z) * s can overflow to +-inf, as the real fake quantizer
    would; that candidate's error is then inf and it is never chosen."""
    inverse = np.float32(1) / scale
    q = np.rint(x * inverse) + zero_point.astype(np.float32)
    with np.errstate(over="ignore"):
        return (np.clip(q, dtype.qmin, dtype.qmax) - zero_point).astype(np.float32) * scale


def mse_clipping_range(counts: np.ndarray, sums: np.ndarray, data_min: np.ndarray, data_max: np.ndarray,
                       dtype: QuantDType, symmetric: bool, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the candidate range [a * min, a * max] with the least squared fake-quant error.

    ``counts``/``sums`` (C, bins) describe the values (each non-empty bin: count copies
    of sum / count); channels without values (data_min > data_max) get (+inf, -inf).
    Returns float32 (low, high) of shape (C,).
    """
    has_data = data_min <= data_max
    channel, column = np.nonzero(counts)
    weight = counts[channel, column].astype(np.float64)
    points = (sums[channel, column] / weight).astype(np.float32)
    full_min = np.where(has_data, data_min, np.float32(0))
    full_max = np.where(has_data, data_max, np.float32(0))
    best_error = np.full(counts.shape[0], np.inf)
    low, high = full_min.copy(), full_max.copy()
    for k in range(candidates, 0, -1):
        alpha = np.float32(k / candidates)
        trial_min, trial_max = full_min * alpha, full_max * alpha
        scale, zero_point = scale_zero_point_from_range(trial_min, trial_max, dtype, symmetric)
        restored = fake_quantize_values(points, scale[channel], zero_point[channel], dtype)
        squared = weight * (restored.astype(np.float64) - points) ** 2
        error = np.bincount(channel, weights=squared, minlength=counts.shape[0])
        better = error < best_error
        best_error[better] = error[better]
        low[better], high[better] = trial_min[better], trial_max[better]
    low[~has_data], high[~has_data] = np.inf, -np.inf
    return low, high


@final
class MSEObserver(Observer):
    """Per tensor or per channel (along ``spec.axis``): the range minimising the
    fake-quant MSE over everything observed (rule and buffers in the module docstring).

    >>> import numpy as np
    >>> from qatcore.quantization.config import QuantSpec
    >>> spec = QuantSpec(bits=4, signed=True, narrow_range=True, scheme="per_channel_symmetric", axis=0,
    ...                  observer="mse", observer_options={"candidates": 20})
    >>> observer = MSEObserver(spec, name="fc.weight")
    >>> weight = np.array([[0.1, -0.2, 0.3, 0.7], [0.1, -0.1, 0.0, 7.0]], dtype=np.float32)
    >>> observer.observe(weight)
    >>> observer.max_val.data.tolist()   # clipping channel 1's 7.0 would cost more than rounding the rest
    [0.699999988079071, 7.0]
    """

    KIND = ObserverKind.MSE
    PER_CHANNEL = (False, True)

    def _initial_state(self, channels: int) -> dict[str, np.ndarray]:
        bins = self.spec.observer_options["bins"]
        return {**empty_range(channels), **histogram_state(channels, bins, with_sums=True)}

    def _update(self, rows, finite, batch_min, batch_max, present) -> None:
        state = {name: getattr(self, name).data for name in _STATE}
        update_histograms(state, rows, finite, batch_min, batch_max, present)
        low, high = mse_clipping_range(state["histogram"], state["histogram_sums"], state["data_min"],
                                       state["data_max"], self.spec.dtype, self.spec.scheme.symmetric,
                                       self.spec.observer_options["candidates"])
        self.min_val.data[...] = low
        self.max_val.data[...] = high
