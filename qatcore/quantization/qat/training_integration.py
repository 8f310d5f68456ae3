"""Training integration: the QAT lifecycle, advanced by the training loop itself.

A QAT model is an ordinary Module: the optimizer, the loop and the loss function
are unchanged. What changes over training is *which quantization machinery is
on*, by a :class:`QATSchedule` of steps:

    step < start_observers_at        float training; observers off, fake quant off
    start_observers_at <= step       observers collect ranges (warm-up) ...
    start_fake_quant_at <= step      ... and fake quantization is on (quant delay)
    freeze_observers_at <= step      ranges stop moving (observers off)
    freeze_bn_at <= step             folded BatchNorms use running statistics

A *step* is one training-mode forward pass of the QAT model, counted by a
forward pre-hook (so a standard loop needs no change); with ``auto_step=False``
call :meth:`QATController.step` yourself once per optimizer step instead.
``eval()`` stops observers (a FakeQuantize observes only in training mode). The
step count is a buffer, so it is saved in ``state_dict()`` and resumes exactly.

At the first training step (a training-mode forward pass with gradients enabled)
the controller also checks that an optimizer holds every learned scale and zero
point (``quantizer_parameters.check_optimized``), unless ``check_optimizers`` is
False.

>>> schedule = QATSchedule(start_fake_quant_at=10, freeze_observers_at=100, freeze_bn_at=80)
>>> schedule.state_at(5)
{'observers': True, 'fake_quant': False, 'bn_frozen': False}
>>> schedule.state_at(90)
{'observers': True, 'fake_quant': True, 'bn_frozen': True}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np

from qatcore.autograd.grad_mode import is_grad_enabled
from qatcore.errors import ConfigError, QATCoreError
from qatcore.nn.module import Module
from qatcore.process_group import local_batch_size
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.qat.qat_layers import QAT_LAYER_TYPES, FoldedBatchNorm
from qatcore.quantization.qat.quantizer_parameters import check_optimized
from qatcore.quantization.qat.statistics import QATStatistics, StatisticsConfig
from qatcore.quantization.qat.statistics_collector import StatisticsCollector

__all__ = ["QATSchedule", "QATController", "controller_of"]


@dataclass(frozen=True)
class QATSchedule:
    """When each part of QAT switches on or off, in training steps (None: never)."""

    start_observers_at: int = 0
    start_fake_quant_at: int = 0
    freeze_observers_at: int | None = None
    freeze_bn_at: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name.startswith("freeze"):
                continue
            if type(value) is not int or value < 0:
                extra = " or None" if f.name.startswith("freeze") else ""
                raise ConfigError(f"QATSchedule.{f.name} must be a non-negative int{extra}, got {value!r}")
        if self.start_fake_quant_at < self.start_observers_at:
            raise ConfigError(
                "QATSchedule.start_fake_quant_at must not come before start_observers_at: fake quantization "
                "needs observed ranges"
            )
        if self.freeze_observers_at is not None and self.freeze_observers_at < self.start_observers_at:
            raise ConfigError("QATSchedule.freeze_observers_at must not come before start_observers_at")

    def state_at(self, step: int) -> dict[str, bool]:
        observers = step >= self.start_observers_at and (
            self.freeze_observers_at is None or step < self.freeze_observers_at
        )
        return {
            "observers": observers,
            "fake_quant": step >= self.start_fake_quant_at,
            "bn_frozen": self.freeze_bn_at is not None and step >= self.freeze_bn_at,
        }

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> QATSchedule:
        if not isinstance(data, dict):
            raise ConfigError(f"QATSchedule: expected a mapping of its fields, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"QATSchedule: unknown fields {unknown}")
        return cls(**data)


class QATController(Module):
    """Applies a QATSchedule to the quantizers and folded BatchNorms of one QAT model.

    It is registered in the QAT model as ``qat_controller`` (its step count is in
    the state_dict) but takes no part in forward. With ``check_optimizers`` (the
    default) its first training step raises ConfigError if no optimizer holds one
    of the model's learned quantization parameters (module docstring).
    """

    def __init__(self, schedule: QATSchedule, auto_step: bool = True,
                 statistics: StatisticsConfig | None = None, check_optimizers: bool = True) -> None:
        super().__init__()
        if not isinstance(schedule, QATSchedule):
            raise ConfigError(f"QATController needs a QATSchedule, got {type(schedule).__name__}")
        if type(check_optimizers) is not bool:
            raise ConfigError(f"QATController.check_optimizers must be True or False, got {check_optimizers!r}")
        self.schedule = schedule
        self.collector = StatisticsCollector(statistics)
        self.auto_step = bool(auto_step)
        self.check_optimizers = check_optimizers
        self._optimizers_checked = False  # not saved: a resumed run checks its own optimizer again
        self._calibrating = False  # inside calibration(): forwards are not training steps
        self._quantizers = []
        self._conv_bn_layers = []
        self._excluded = []
        self.step_hook = None  # the RemovableHandle of the forward pre-hook attach registers
        self.register_buffer("step_count", np.zeros((), dtype=np.int64))

    def attach(self, model: Module) -> None:
        """Find the model's quantizers and folded conv-bn layers; count its training steps."""
        quantizers = [m for m in model.modules() if isinstance(m, FakeQuantize)]
        self._quantizers[:] = [m for m in quantizers if m not in self._excluded]
        self._conv_bn_layers[:] = [m for m in model.modules() if isinstance(m, FoldedBatchNorm)]
        weight_quantizers = {id(layer.weight_fake_quant) for layer in model.modules()
                             if isinstance(layer, QAT_LAYER_TYPES) and layer.weight_fake_quant is not None}
        for quantizer in quantizers:
            kind = "weight" if id(quantizer) in weight_quantizers else "activation"
            quantizer.recorder = (self.collector, kind)
        # kept so that a copy of the model that must not count steps can drop it (Module.remove_hook)
        self.step_hook = model.register_forward_pre_hook(self._before_forward)
        self.apply_schedule()

    def exclude(self, quantizer: FakeQuantize) -> None:
        """Take a quantizer out of the schedule and switch it off (user disabled it)."""
        if quantizer in self._quantizers:
            self._quantizers.remove(quantizer)
        self._excluded.append(quantizer)
        quantizer.fake_quant_enabled.data[...] = False
        quantizer.observer_enabled.data[...] = False

    def include(self, quantizer: FakeQuantize) -> None:
        """Put an excluded quantizer back under the schedule."""
        if quantizer in self._excluded:
            self._excluded.remove(quantizer)
        if quantizer not in self._quantizers:
            self._quantizers.append(quantizer)
        self.apply_schedule()

    def _before_forward(self, model: Module, args: tuple) -> None:
        if not model.training or self._calibrating:
            return
        if self.check_optimizers and not self._optimizers_checked and is_grad_enabled():
            check_optimized(model)  # before counting: a step refused is not a step taken
            self._optimizers_checked = True
        self.collector.begin_step(self.current_step, local_batch_size(args))
        if self.auto_step:
            self.apply_schedule()
            self.step_count.data += 1

    @property
    def statistics(self) -> QATStatistics:
        """The statistics collected so far (live: training adds to them)."""
        return self.collector.statistics

    @property
    def current_step(self) -> int:
        return int(self.step_count.data)

    def step(self, count: int = 1) -> None:
        """Advance the schedule by ``count`` steps (for ``auto_step=False``)."""
        if type(count) is not int or count < 1:
            raise ConfigError(f"QATController.step: count must be a positive int, got {count!r}")
        self.step_count.data += count
        self.apply_schedule()

    @contextlib.contextmanager
    def calibration(self) -> Iterator[None]:
        """Post-training calibration (``qatcore.quantization.qat.calibration``). Inside the
        block, training-mode forwards are not training steps (no step counted, no schedule
        applied, no statistics, no optimizer check) and every scheduled quantizer observes
        with fake quantization off, so the observers see the float model's values, as in
        post-training quantization. On leaving it, every scheduled quantizer has its
        observer off and fake quantization on: the model computes its quantized form, the
        one ``convert_to_quantized`` converts. Training afterwards applies the schedule at
        the current step again."""
        if self._calibrating:
            raise ConfigError("QATController.calibration: this model is already calibrating")
        self._calibrating = True
        sampling, self.collector.sampling = self.collector.sampling, False  # calibration records no statistics
        try:
            for quantizer in self._quantizers:
                quantizer.fake_quant_enabled.data[...] = False
                if not bool(quantizer.qparams_fixed.data):
                    quantizer.observer_enabled.data[...] = True
            yield
        finally:
            self._calibrating = False
            self.collector.sampling = sampling
            for quantizer in self._quantizers:
                quantizer.fake_quant_enabled.data[...] = True
                quantizer.observer_enabled.data[...] = False

    def apply_schedule(self) -> None:
        """Set every quantizer and folded BatchNorm to the state of the current step.
        Quantizers with fixed qparams keep their observer off."""
        state = self.schedule.state_at(self.current_step)
        for quantizer in self._quantizers:
            quantizer.fake_quant_enabled.data[...] = state["fake_quant"]
            if not bool(quantizer.qparams_fixed.data):
                quantizer.observer_enabled.data[...] = state["observers"]
        for layer in self._conv_bn_layers:
            layer.bn_frozen.data[...] = state["bn_frozen"]

    def extra_repr(self) -> str:
        return f"step={self.current_step}, schedule={self.schedule}"


def controller_of(qat_model: Module) -> QATController:
    """The QATController that preparation registered in ``qat_model`` as ``qat_controller``
    (ConfigError if the model was not prepared)."""
    try:
        controller = qat_model.get_submodule("qat_controller") if isinstance(qat_model, Module) else None
    except QATCoreError:  # no such submodule
        controller = None
    if not isinstance(controller, QATController):
        raise ConfigError("this model was not prepared by QATPreparer.prepare_for_qat")
    return controller
