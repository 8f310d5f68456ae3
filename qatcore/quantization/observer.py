"""Observers: modules that watch values and propose quantization parameters.

An observer is fed float arrays (``observe(x)``, or calling it like a layer) and
keeps a running summary of them in registered buffers, so the summary is part
of ``state_dict()``. ``calculate_qparams()`` turns the range it holds in the
``min_val`` / ``max_val`` buffers into :class:`QParams` by the rule of
:meth:`QParams.from_range` (docs/numerics.md, "Scale and zero point from an
observed range"; the rules below are its section "Observers"). The observers
differ only in how a batch updates that range; per channel, every rule below
applies to each channel separately, with the batch reduced over all axes but
``spec.axis``:

    MinMaxObserver, PerChannelMinMaxObserver
        min <- min(min, batch_min),  max <- max(max, batch_max)
    MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
        first batch: min <- batch_min, max <- batch_max
        then:        m <- m + c * (batch_m - m)    (c = observer_options["averaging_constant"])
    HistogramObserver (histogram_observer.py), MSEObserver (mse_observer.py)

What every observer shares (this file's :class:`Observer`):

- values are taken as float32 (what fake quantization computes in); NaN or Inf
  raises :class:`ObserverError` naming the observer and counting the bad values,
  unless ``spec.ignore_nan``, in which case only the finite values are observed
  (a batch with none changes nothing);
- a per-channel observer learns its channel count from its first batch (its
  buffers start with shape ``(0,)``); a later batch with another count is an error;
- ``num_batches_observed`` counts batches that held a finite value; ``has_observed``
  reads it, so it survives a state_dict round trip;
- ``forward(x)`` observes ``x`` (in training *and* eval mode: the FakeQuantize that
  owns the observer decides when to call it) and returns ``x`` unchanged;
- inside a data-parallel group (``qatcore.process_group.current_group()`` is not None)
  ``x`` is this rank's share of the global batch, and the batch's extremes are reduced
  over the ranks before anything else (min of the minima, max of the maxima: exact), so
  every rank takes the same branches and holds the same state, the state one process
  observing the whole global batch holds. A rank with an empty share (or only NaN under
  ``ignore_nan``) still takes part. Histogram observers add the ranks' bin counts too
  (``histogram_observer.update_histograms``). Values that are the same on every rank
  (the weights) are observed outside the group (``use_group(None)``): nothing to reduce.

Each rule is written once (``_MinMaxRule``, ``_MovingAverageRule``); its two final
classes only say which schemes they take. ``make_observer(spec)``
(:mod:`qatcore.quantization.observer_factory`) picks the class from
``spec.observer`` and the scheme.

>>> import numpy as np
>>> from qatcore.quantization.config import ObserverKind, QuantSpec
>>> observer = MinMaxObserver(QuantSpec(observer="minmax"), name="fc1.activation")
>>> observer.observe(np.array([-1.0, 0.5, 3.0], dtype=np.float32))
>>> observer.min_val.data, observer.max_val.data
(array([-1.], dtype=float32), array([3.], dtype=float32))
>>> observer.calculate_qparams()
QParams(uint8, scale=0.0156863, zero_point=64)
"""

from __future__ import annotations

import abc
from typing import final

import numpy as np

from qatcore import kernels
from qatcore.errors import ConfigError, ObserverError
from qatcore.nn.module import Module
from qatcore.process_group import current_group
from qatcore.quantization.config import ObserverKind, QuantSpec
from qatcore.quantization.dtypes import QuantDType
from qatcore.quantization.qparams import QParams, scale_zero_point_from_range
from qatcore.quantization.qscheme import QScheme
from qatcore.tensor import Tensor

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PerChannelMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "empty_range",
]


def empty_range(channels: int) -> dict[str, np.ndarray]:
    """``min_val`` = +inf and ``max_val`` = -inf (float32): "nothing seen yet" for each channel."""
    return {"min_val": np.full(channels, np.inf, dtype=np.float32),
            "max_val": np.full(channels, -np.inf, dtype=np.float32)}


class Observer(Module, abc.ABC):
    """Abstract base: watches values, proposes QParams.

    Args:
        spec: the QuantSpec of the tensor being observed (dtype, scheme, axis,
            ``observer`` kind, ``observer_options``, ``ignore_nan``). Its ``observer``
            must be this class's kind; ``make_observer`` picks the class for you.
        name: the layer/quantizer name used in error messages (may be set later).

    A concrete observer declares ``KIND`` (the ``spec.observer`` it implements),
    ``PER_CHANNEL`` (the ``scheme.per_channel`` values it supports) and implements
    ``_initial_state(channels)`` (its buffers, ``min_val`` and ``max_val`` included)
    and ``_update(...)`` (how one batch changes them).
    """

    KIND: ObserverKind
    PER_CHANNEL: tuple[bool, ...]

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise ConfigError(f"{type(self).__name__} needs a QuantSpec, got {type(spec).__name__}")
        if spec.observer != self.KIND:
            raise ConfigError(
                f"{type(self).__name__} implements observer {self.KIND.value!r} but the spec asks for "
                f"{spec.observer.value!r}; use make_observer(spec) to get the matching class"
            )
        if spec.scheme.per_channel not in self.PER_CHANNEL:
            supported = [s.value for s in QScheme if s.per_channel in self.PER_CHANNEL]
            raise ConfigError(
                f"{type(self).__name__} does not support scheme {spec.scheme.value!r}; it supports "
                f"{supported} (make_observer(spec) picks the class that fits the scheme)"
            )
        self.spec = spec
        self.name = name
        for buffer_name, value in self._initial_state(0 if spec.scheme.per_channel else 1).items():
            self.register_buffer(buffer_name, value)
            if spec.scheme.per_channel:
                self.mark_resizable(buffer_name)  # sized by the data: empty until observed
        self.register_buffer("num_batches_observed", np.zeros((), dtype=np.int64))

    # ---- what a concrete observer provides ---------------------------------------------
    @abc.abstractmethod
    def _initial_state(self, channels: int) -> dict[str, np.ndarray]:
        """Every buffer of this observer (min_val/max_val included) for ``channels`` channels."""

    @abc.abstractmethod
    def _update(self, rows: np.ndarray, finite: np.ndarray | None, batch_min: np.ndarray,
                batch_max: np.ndarray, present: np.ndarray) -> None:
        """Fold one batch into the buffers, in place.

        ``rows`` is the batch as float32 of shape (channels, values per channel);
        ``finite`` is None when every value is finite, else the mask of values to use;
        ``batch_min``/``batch_max`` are the per-channel extremes of those values and
        ``present`` marks the channels that have at least one (the others must not change).
        """

    # ---- the shared surface --------------------------------------------------------------
    @property
    def dtype(self) -> QuantDType:
        return self.spec.dtype

    @property
    def has_observed(self) -> bool:
        """True once a batch with a finite value has been observed (read from a buffer)."""
        return bool(self.num_batches_observed.data > 0)

    @final
    def observe(self, x) -> None:
        """Update the state from ``x`` (a numpy array, Tensor or anything array-like)."""
        rows, finite = self._channel_rows(x)
        if rows.shape[1] == 0:
            batch_min = np.full(rows.shape[0], np.inf, dtype=np.float32)
            batch_max = -batch_min
        elif finite is None:
            batch_min, batch_max = rows.min(axis=1), rows.max(axis=1)
        else:
            batch_min = np.where(finite, rows, np.float32(np.inf)).min(axis=1)
            batch_max = np.where(finite, rows, np.float32(-np.inf)).max(axis=1)
        group = current_group()
        if group is not None:
            # one reduction for both: max(b) = -min(-b), exactly
            extremes = group.allreduce(np.concatenate([batch_min, -batch_max]), "min")
            batch_min, batch_max = extremes[:batch_min.size], -extremes[batch_min.size:]
        present = batch_min <= batch_max
        if not present.any():
            return
        if self.min_val.data.shape[0] != rows.shape[0]:  # a per-channel observer's first batch
            for buffer_name, value in self._initial_state(rows.shape[0]).items():
                setattr(self, buffer_name, value)
        self._update(rows, finite, batch_min, batch_max, present)
        self.num_batches_observed.data[...] += 1

    @final
    def calculate_qparams(self) -> QParams:
        """QParams.from_range(min_val, max_val) for this spec's dtype, scheme and axis."""
        if not self.has_observed:
            raise ObserverError(
                f"{self.describe()} has not observed any values yet; run data through it "
                "(observe(x) or calibration) before asking for quantization parameters"
            )
        min_val, max_val = self.min_val.data, self.max_val.data
        unseen = np.flatnonzero(~(min_val <= max_val))
        if unseen.size:
            raise ObserverError(
                f"{self.describe()}: channels {unseen.tolist()[:10]} along axis {self.spec.axis} "
                "never saw a finite value (every value there was NaN/Inf and ignore_nan dropped it)"
            )
        return QParams.from_range(min_val, max_val, self.spec.dtype, self.spec.scheme, self.spec.axis)

    @final
    def scale_zero_point(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale float32, zero_point int32) arrays: calculate_qparams's values without building
        and validating a QParams object (FakeQuantize calls this on every training step)."""
        if not self.has_observed or not np.all(self.min_val.data <= self.max_val.data):
            self.calculate_qparams()  # raises, naming the cause
            raise AssertionError("unreachable: calculate_qparams accepted an empty or inverted range")
        return scale_zero_point_from_range(self.min_val.data, self.max_val.data, self.spec.dtype,
                                           self.spec.scheme.symmetric)

    def forward(self, x):
        """Observe ``x`` (a Tensor's data or an array) and return ``x`` itself, in
        training and eval mode alike: the FakeQuantize owning the observer decides
        when to call it."""
        self.observe(x)
        return x

    @final
    def describe(self) -> str:
        """How error messages name this observer: class and layer name."""
        return f"{type(self).__name__} {self.name!r}" if self.name else f"{type(self).__name__} (unnamed)"

    def extra_repr(self) -> str:
        axis = f", axis={self.spec.axis}" if self.spec.scheme.per_channel else ""
        name = f", name={self.name!r}" if self.name else ""
        return f"{self.spec.dtype.name}, {self.spec.scheme.value}{axis}{name}"

    # ---- helpers -----------------------------------------------------------------------------
    @final
    def _channel_rows(self, x) -> tuple[np.ndarray, np.ndarray | None]:
        """The batch as float32 (channels, values) and its finite mask (None if all finite).

        Raises ObserverError on NaN/Inf (unless ignore_nan), on an axis the array does
        not have, and on a channel count that differs from the first batch's.
        """
        raw = x.data if isinstance(x, Tensor) else np.asarray(x)
        if raw.dtype.kind not in "biuf":
            raise ObserverError(f"{self.describe()} observes real numbers, got an array of dtype {raw.dtype}")
        with np.errstate(over="ignore"):  # beyond float32's range becomes Inf, reported below
            arr = np.asarray(raw, dtype=np.float32)
        if self.spec.scheme.per_channel:
            axis = self.spec.axis
            if axis >= arr.ndim:
                raise ObserverError(
                    f"{self.describe()}: per-channel axis {axis} does not exist in an array of shape "
                    f"{arr.shape}"
                )
            channels, known = arr.shape[axis], self.min_val.data.shape[0]
            if known != 0 and channels != known:
                raise ObserverError(
                    f"{self.describe()} has {known} channels along axis {axis} (from its first batch), "
                    f"but got an array of shape {arr.shape} with {channels}"
                )
            rows = np.moveaxis(arr, axis, 0).reshape(channels, -1)
        else:
            # every value once, in memory order: no copy of a channel-major activation
            rows = (arr.swapaxes(0, 1) if kernels.layout.is_channel_major(arr) else arr).reshape(1, -1)
        finite = np.isfinite(rows)
        if finite.all():
            return rows, None
        if not self.spec.ignore_nan:
            n_nan, n_inf = int(np.isnan(rows).sum()), int(np.isinf(rows).sum())
            raise ObserverError(
                f"{self.describe()} observed {n_nan} NaN and {n_inf} Inf values (as float32) among "
                f"{rows.size}; the range would be meaningless. Find where they come from, or set "
                "QuantSpec(ignore_nan=True) to observe only the finite values"
            )
        return rows, finite


class _MinMaxRule(Observer):
    """The running-extremes rule, for both schemes (abstract: the two final classes
    below choose the scheme)."""

    KIND = ObserverKind.MINMAX

    def _initial_state(self, channels: int) -> dict[str, np.ndarray]:
        return empty_range(channels)

    def _update(self, rows, finite, batch_min, batch_max, present) -> None:
        # channels without finite values carry +inf/-inf here, which min/max leave unchanged
        np.minimum(self.min_val.data, batch_min, out=self.min_val.data)
        np.maximum(self.max_val.data, batch_max, out=self.max_val.data)


@final
class MinMaxObserver(_MinMaxRule):
    """Per tensor: the running extremes of everything observed.

        min <- min(min, min(x)),  max <- max(max, max(x))

    >>> import numpy as np
    >>> from qatcore.quantization.config import ObserverKind, QuantSpec
    >>> spec = QuantSpec(bits=8, signed=True, scheme="per_tensor_symmetric", observer="minmax")
    >>> observer = MinMaxObserver(spec)
    >>> observer.observe(np.array([-0.5, 2.55], dtype=np.float32))
    >>> observer.observe(np.array([0.1], dtype=np.float32))
    >>> observer.calculate_qparams()
    QParams(int8, scale=0.02, zero_point=0)
    """

    PER_CHANNEL = (False,)


@final
class PerChannelMinMaxObserver(_MinMaxRule):
    """Per channel along ``spec.axis``: the running extremes of each channel.

        min[c] <- min(min[c], min(x[..., c, ...])),  likewise max

    >>> import numpy as np
    >>> from qatcore.quantization.config import ObserverKind, QuantSpec
    >>> spec = QuantSpec(bits=8, signed=True, narrow_range=True, scheme="per_channel_symmetric",
    ...                  axis=0, observer="minmax")
    >>> observer = PerChannelMinMaxObserver(spec)
    >>> observer.min_val.data.shape                     # channels are known after the first batch
    (0,)
    >>> observer.observe(np.array([[1.27, -0.3], [0.2, -2.54]], dtype=np.float32))
    >>> observer.calculate_qparams().scale.tolist()
    [0.009999999776482582, 0.019999999552965164]
    """

    PER_CHANNEL = (True,)


class _MovingAverageRule(Observer):
    """The moving-average rule, for both schemes (abstract: the two final classes
    below choose the scheme)."""

    KIND = ObserverKind.MOVING_AVERAGE_MINMAX

    def _initial_state(self, channels: int) -> dict[str, np.ndarray]:
        return empty_range(channels)

    def _update(self, rows, finite, batch_min, batch_max, present) -> None:
        c = np.float32(self.spec.observer_options["averaging_constant"])
        low, high = self.min_val.data, self.max_val.data
        first = present & ~np.isfinite(low)  # a channel's first finite values set it
        later = present & ~first
        with np.errstate(over="ignore", invalid="ignore"):
            new_low = low + c * (batch_min - low)
            new_high = high + c * (batch_max - high)
            # In real arithmetic the recurrence keeps min <= max; float32 can overflow, or
            # round min above max when one side cancels (m huge, batch value tiny).
            redo = later & ~(np.isfinite(new_low) & np.isfinite(new_high) & (new_low <= new_high))
            if redo.any():
                wide_low, wide_high = low.astype(np.float64), high.astype(np.float64)
                new_low[redo] = (wide_low + float(c) * (batch_min - wide_low))[redo]
                new_high[redo] = (wide_high + float(c) * (batch_max - wide_high))[redo]
                new_low[redo] = np.minimum(new_low[redo], new_high[redo])  # last guard, one float32 ulp at most
        low[first], high[first] = batch_min[first], batch_max[first]
        low[later], high[later] = new_low[later], new_high[later]


@final
class MovingAverageMinMaxObserver(_MovingAverageRule):
    """Per tensor: an exponential moving average of each batch's extremes.

        first batch: min <- min(x),  max <- max(x)
        then:        min <- min + c * (min(x) - min),  likewise max
        c = spec.observer_options["averaging_constant"] (default 0.01)

    The arithmetic is float32, as in PyTorch's observer. In real arithmetic the
    recurrence keeps min <= max; where float32 breaks that (the difference
    overflows near the float32 limit, or rounding puts min above max when a huge
    m cancels against a small batch value) both are evaluated in float64 and
    rounded once, so the range stays finite and ordered.

    >>> import numpy as np
    >>> from qatcore.quantization.config import ObserverKind, QuantSpec
    >>> spec = QuantSpec(observer="moving_average_minmax", observer_options={"averaging_constant": 0.5})
    >>> observer = MovingAverageMinMaxObserver(spec)
    >>> observer.observe(np.array([0.0, 2.0], dtype=np.float32))
    >>> observer.observe(np.array([0.0, 4.0], dtype=np.float32))
    >>> observer.max_val.data
    array([3.], dtype=float32)
    """

    PER_CHANNEL = (False,)


@final
class MovingAveragePerChannelMinMaxObserver(_MovingAverageRule):
    """Per channel along ``spec.axis``: the moving-average rule of
    :class:`MovingAverageMinMaxObserver` applied to each channel's extremes (a
    channel's first finite values set it, then m <- m + c * (batch_m - m)).

    >>> import numpy as np
    >>> from qatcore.quantization.config import ObserverKind, QuantSpec
    >>> spec = QuantSpec(bits=8, signed=True, scheme="per_channel_affine", axis=1,
    ...                  observer="moving_average_minmax", observer_options={"averaging_constant": 0.5})
    >>> observer = MovingAveragePerChannelMinMaxObserver(spec)
    >>> observer.observe(np.array([[1.0, -1.0, 0.0]], dtype=np.float32))
    >>> observer.observe(np.array([[3.0, -3.0, 0.0]], dtype=np.float32))
    >>> observer.min_val.data, observer.max_val.data
    (array([ 2., -2.,  0.], dtype=float32), array([ 2., -2.,  0.], dtype=float32))
    """

    PER_CHANNEL = (True,)
