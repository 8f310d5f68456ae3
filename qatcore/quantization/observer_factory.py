"""``make_observer``: the observer a QuantSpec asks for, from one table keyed by
observer kind (``QuantSpec.observer``).

Each kind has a per-tensor and a per-channel class (None where the kind does not
support that scheme). A new observer is one row here, plus its options in
``qatcore.quantization.config.OBSERVER_OPTIONS``.

======================== =================================== ===========================================
spec.observer            per-tensor scheme                   per-channel scheme
======================== =================================== ===========================================
"minmax"                 MinMaxObserver                      PerChannelMinMaxObserver
"moving_average_minmax"  MovingAverageMinMaxObserver         MovingAveragePerChannelMinMaxObserver
"histogram"              HistogramObserver                   (ConfigError: per tensor only)
"mse"                    MSEObserver                         MSEObserver
======================== =================================== ===========================================

>>> from qatcore.quantization.config import ObserverKind, QuantSpec
>>> spec = QuantSpec(signed=True, scheme="per_channel_symmetric", observer="minmax")
>>> make_observer(spec, "conv1.weight")
PerChannelMinMaxObserver(int8, per_channel_symmetric, axis=0, name='conv1.weight')
"""

from __future__ import annotations

from qatcore.errors import ConfigError
from qatcore.quantization.config import ObserverKind, QuantSpec
from qatcore.quantization.histogram_observer import HistogramObserver
from qatcore.quantization.mse_observer import MSEObserver
from qatcore.quantization.observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    Observer,
    PerChannelMinMaxObserver,
)
from qatcore.quantization.qscheme import QScheme

__all__ = ["OBSERVER_CLASSES", "make_observer"]

#: observer kind -> (per-tensor class, per-channel class)
OBSERVER_CLASSES: dict[ObserverKind, tuple[type[Observer] | None, type[Observer] | None]] = {
    ObserverKind.MINMAX: (MinMaxObserver, PerChannelMinMaxObserver),
    ObserverKind.MOVING_AVERAGE_MINMAX: (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver),
    ObserverKind.HISTOGRAM: (HistogramObserver, None),
    ObserverKind.MSE: (MSEObserver, MSEObserver),
}


def make_observer(spec: QuantSpec, name: str = "") -> Observer:
    """The observer for ``spec`` (see the table above), named ``name`` in its error messages."""
    if not isinstance(spec, QuantSpec):
        raise ConfigError(f"make_observer needs a QuantSpec, got {type(spec).__name__}")
    per_channel = spec.scheme.per_channel
    cls = OBSERVER_CLASSES[spec.observer][per_channel]
    if cls is None:
        where = f" (for {name!r})" if name else ""
        asked, other = ("per-channel", "per-tensor") if per_channel else ("per-tensor", "per-channel")
        schemes = ", ".join(s.value for s in QScheme if s.per_channel != per_channel)
        kinds = [repr(kind.value) for kind, classes in OBSERVER_CLASSES.items() if classes[per_channel] is not None]
        choices = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
        raise ConfigError(
            f"observer {spec.observer!r} supports {other} schemes only ({schemes}), not "
            f"{spec.scheme.value!r}{where}; for a {asked} scheme use {choices}"
        )
    return cls(spec, name)
