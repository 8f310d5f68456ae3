"""``FakeQuantize``: an observer and a fake quantizer in one Module.

In training mode, with its observer enabled, it watches the values that pass
and (fixed mode) takes its scale and zero point from the observer; with fake
quantization enabled it returns ``fake_quantize(x)``, else ``x`` unchanged.
``eval()`` stops the observer: evaluation never moves the ranges.

Modes (``spec.learnable``):

- ``"fixed"``: scale and zero point are buffers set from the observer;
- ``"lsq"``: the scale is a Parameter trained by the LSQ gradient, initialised on
  the first batch to s = 2 * mean(|x|) / sqrt(qmax) (per channel: the mean over
  the channel);
- ``"lsq+"``: the zero point is a Parameter too, initialised from the observer.

:meth:`FakeQuantize.with_fixed_qparams` builds one whose scale and zero point are
given and never change (the observer is off for good).

Before anything was observed, a quantizer asked to fake-quantize raises
``ObserverError`` instead of silently using s = 1, z = 0.

>>> import numpy as np
>>> from qatcore.quantization.config import QuantSpec
>>> fq = FakeQuantize(QuantSpec(bits=8, signed=False), name="act")
>>> y = fq(np.array([0.0, 0.5, 1.0], dtype=np.float32))
>>> fq.calculate_qparams()
QParams(uint8, scale=0.00392157, zero_point=0)
"""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError, ObserverError
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter
from qatcore.process_group import current_group
from qatcore.quantization.config import Learnable, QuantSpec
from qatcore.quantization.fake_quantize import default_grad_factor, fake_quantize, fake_quantize_learnable
from qatcore.quantization.observer_factory import make_observer
from qatcore.quantization.qparams import FLOAT32_EPS, QParams
from qatcore.tensor import Tensor

__all__ = ["FakeQuantize"]


class FakeQuantize(Module):
    """Observer + fake quantization for one tensor (see the module docstring)."""

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise ConfigError(f"FakeQuantize needs a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.name = name
        # (collector, kind) while a QAT model collects statistics (set by its QATController)
        self.recorder = None
        self.observer = make_observer(spec, name)
        self.register_buffer("fake_quant_enabled", np.ones((), dtype=np.bool_))
        self.register_buffer("observer_enabled", np.ones((), dtype=np.bool_))
        # set once qparams exist (observed, initialised, or given)
        self.register_buffer("qparams_ready", np.zeros((), dtype=np.bool_))
        self.register_buffer("qparams_fixed", np.zeros((), dtype=np.bool_))
        if spec.learnable is Learnable.FIXED:
            self.register_buffer("scale", np.ones(1, dtype=np.float32))
            self.register_buffer("zero_point", np.zeros(1, dtype=np.int32))
        else:
            self.scale = Parameter(np.ones(1, dtype=np.float32))
            if spec.learnable is Learnable.LSQ_PLUS:
                self.zero_point = Parameter(np.zeros(1, dtype=np.float32))
            else:  # LSQ learns the scale only; the zero point is a constant
                self.register_buffer("zero_point", np.zeros(1, dtype=np.float32))
        # one entry until the first batch shows how many channels there are
        self.mark_resizable("scale")
        self.mark_resizable("zero_point")

    # ---- construction helpers ----------------------------------------------------------
    @classmethod
    def with_fixed_qparams(cls, spec: QuantSpec, scale, zero_point, name: str = "") -> FakeQuantize:
        """A quantizer with given, unchanging parameters (e.g. a sigmoid's known output range)."""
        if spec.learnable is not Learnable.FIXED:
            raise ConfigError("with_fixed_qparams needs spec.learnable == 'fixed'")
        fq = cls(spec, name)
        qparams = QParams(scale, zero_point, spec.dtype, spec.axis if spec.scheme.per_channel else None)
        fq._set_buffers(qparams)
        fq.qparams_fixed.data[...] = True
        fq.observer_enabled.data[...] = False
        return fq

    # ---- switches ------------------------------------------------------------------------
    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantize:
        self.fake_quant_enabled.data[...] = enabled
        return self

    def disable_fake_quant(self) -> FakeQuantize:
        return self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> FakeQuantize:
        if enabled and bool(self.qparams_fixed.data):
            raise ConfigError(f"FakeQuantize {self.name!r} has fixed qparams; its observer stays off")
        self.observer_enabled.data[...] = enabled
        return self

    def disable_observer(self) -> FakeQuantize:
        return self.enable_observer(False)

    @property
    def learns_scale(self) -> bool:
        """Whether the scale is a trained Parameter (``spec.learnable`` is LSQ or LSQ+)."""
        return self.spec.learnable is not Learnable.FIXED

    @property
    def dynamic(self) -> bool:
        """False: the scale comes from the observer (or is learned); the dynamic schemes'
        quantizer is ``BlockFakeQuantize``."""
        return False

    @property
    def axis(self) -> int | None:
        return self.spec.axis if self.spec.scheme.per_channel else None

    # ---- qparams ---------------------------------------------------------------------------
    def _set_buffers(self, qparams: QParams) -> None:
        self._set_scale_zero_point(qparams.scale, qparams.zero_point)

    def _set_scale_zero_point(self, scale: np.ndarray, zero_point: np.ndarray) -> None:
        if self.learns_scale:
            raise ConfigError("learnable quantizers keep their scale in Parameters")
        if self.scale.data.shape != scale.shape:
            self.scale = np.array(scale)
            self.zero_point = np.array(zero_point)
        else:
            self.scale.data[...] = scale
            self.zero_point.data[...] = zero_point
        self.qparams_ready.data[...] = True

    def _initialize_learnable(self, x: np.ndarray) -> None:
        """LSQ init s = 2 * mean(|x|) / sqrt(qmax) per channel; LSQ+ zero point from the observer.
        In a data-parallel run the mean is the global batch's (``qatcore.process_group``)."""
        qmax = self.spec.qmax
        axis = self.axis
        others = None if axis is None else tuple(a for a in range(x.ndim) if a != axis)
        group = current_group()
        if group is None:
            mean_abs = np.mean(np.abs(x), axis=others, dtype=np.float64).reshape(-1)
        else:  # the global batch's mean: sums and counts over the ranks
            sums = np.sum(np.abs(x), axis=others, dtype=np.float64).reshape(-1)
            count = x.size // (1 if axis is None else x.shape[axis])
            total = group.allreduce(np.append(sums, np.float64(count)), "sum")
            mean_abs = total[:-1] / max(total[-1], 1.0)
        scale = np.maximum(2 * mean_abs / np.sqrt(qmax), float(FLOAT32_EPS)).astype(np.float32)
        zero_point = np.zeros(scale.shape, np.float32)
        if self.spec.learnable is Learnable.LSQ_PLUS and self.observer.has_observed:
            zero_point = self.observer.calculate_qparams().zero_point.astype(np.float32)
        # Parameters keep their identity (optimizers hold them): replace the arrays
        self.scale.data = scale
        self.zero_point.data = zero_point
        self.scale.grad = None
        self.zero_point.grad = None
        self.qparams_ready.data[...] = True

    def calculate_qparams(self) -> QParams:
        """The scale and zero point in use now, validated."""
        if not bool(self.qparams_ready.data):
            raise ObserverError(
                f"FakeQuantize {self.name!r}: no quantization parameters yet (nothing was observed); "
                f"run training-mode batches through the model first"
            )
        scale = np.maximum(self.scale.data, FLOAT32_EPS)
        zero_point = np.clip(np.rint(self.zero_point.data), self.spec.qmin, self.spec.qmax)
        return QParams(scale, zero_point.astype(np.int32), self.spec.dtype, self.axis)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x):
        array = x.data if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
        if self.training and bool(self.observer_enabled.data):
            self.observer.observe(array)
            if self.learns_scale:
                if not bool(self.qparams_ready.data):
                    self._initialize_learnable(array)
            else:
                self._set_scale_zero_point(*self.observer.scale_zero_point())
        if not bool(self.fake_quant_enabled.data):
            recorder = self.recorder
            if recorder is not None and self.training and recorder[0].sampling:
                recorder[0].record_forward(self, recorder[1], array, None)
            return x
        if not bool(self.qparams_ready.data):
            raise ObserverError(
                f"FakeQuantize {self.name!r}: fake quantization is on but nothing was observed yet "
                f"(run a training-mode batch first, or disable fake quantization)"
            )
        qmin, qmax = self.spec.qmin, self.spec.qmax
        recorder = self.recorder
        sampling = recorder is not None and self.training and recorder[0].sampling
        on_backward = recorder[0].backward_callback(self, recorder[1]) if sampling else None
        if self.learns_scale:
            np.maximum(self.scale.data, FLOAT32_EPS, out=self.scale.data)  # a learned scale stays positive
            tensor = x if isinstance(x, Tensor) else Tensor._from_array(array, False)
            grad_factor = self.spec.grad_factor or default_grad_factor(_global_size(array.size), qmax)
            y = fake_quantize_learnable(tensor, self.scale, self.zero_point, qmin, qmax, self.axis, grad_factor,
                                        on_backward)
        else:
            y = fake_quantize(x, self.scale.data, self.zero_point.data, qmin, qmax, self.axis, on_backward)
        if sampling:
            recorder[0].record_forward(self, recorder[1], array, y.data if isinstance(y, Tensor) else y)
        return y

    def extra_repr(self) -> str:
        spec = self.spec
        return (f"{spec.dtype.name}, {spec.scheme.value}, observer={spec.observer}, learnable={spec.learnable}, "
                f"fake_quant={bool(self.fake_quant_enabled.data)}, observer_on={bool(self.observer_enabled.data)}")


def _global_size(size: int) -> int:
    """The number of elements of the global batch: ``size`` summed over the ranks of a
    data-parallel run (the LSQ gradient scale is the global batch's), else ``size``."""
    group = current_group()
    if group is None:
        return size
    return int(group.allreduce(np.array([size], dtype=np.int64), "sum")[0])
