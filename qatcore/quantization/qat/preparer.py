"""``QATPreparer``: prepares models for QAT and manages their lifecycle.

>>> import numpy as np
>>> from qatcore.models import DigitsCNN
>>> from qatcore.quantization import QuantizationConfig
>>> from qatcore.quantization.qat import QATPreparer
>>> preparer = QATPreparer()
>>> qat_model = preparer.prepare_for_qat(DigitsCNN(), QuantizationConfig())
>>> out = qat_model(np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32))
>>> out.shape
(4, 10)
>>> print(preparer.describe(qat_model).splitlines()[2][:40].rstrip())
conv1  Conv2d  QATConvBn2d  bn1, relu1
"""

from __future__ import annotations

from dataclasses import replace

from qatcore.errors import CheckpointError, ConfigError, QATCoreError, TraceError
from qatcore.nn.module import Module
from qatcore.quantization.config import QuantizationConfig
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.qat.calibration import calibrate
from qatcore.quantization.qat.checkpointing import FORMAT, load_qat_checkpoint, read_qat_checkpoint
from qatcore.quantization.qat.conversion import convert_to_quantized
from qatcore.quantization.qat.interface import IQATPreparer
from qatcore.quantization.qat.layerwise_config import LayerwiseConfig
from qatcore.quantization.qat.preparation import LayerRecord, prepare_eager_mode, prepare_graph_mode
from qatcore.quantization.qat.qat_layers import QAT_LAYER_TYPES
from qatcore.quantization.qat.quantizer_parameters import add_to_optimizers
from qatcore.quantization.qat.statistics import QATStatistics, StatisticsConfig
from qatcore.quantization.qat.training_integration import QATController, QATSchedule, controller_of
from qatcore.text_table import text_table

__all__ = ["QATPreparer"]

MODES = ("auto", "graph", "eager")


class QATPreparer(IQATPreparer):
    """Prepares models for QAT (graph mode, or eager mode for untraceable models).

    Args:
        mode: "auto" (graph mode; eager mode when tracing fails), "graph" or "eager".
        statistics: how statistics are collected while training (StatisticsConfig(enabled=False)
            turns collection off).
        schedule: the QATSchedule of observer warm-up, quant delay and freezing.
        auto_step: count training-mode forward passes as steps (else call ``step``).
        inplace: eager mode only: swap the given model's own layers instead of a copy.
        check_optimizers: at the first training step, raise ConfigError if no optimizer holds
            a learned scale or zero point (``quantizer_parameters``); False for a loop that
            updates them with its own rule.

    Preparation adds each new learned scale (LSQ) and zero point (LSQ+) to the optimizers
    that already hold its layer's weight, in that weight's param group, so an optimizer
    built before preparation trains them too (``quantizer_parameters``).
    """

    def __init__(self, mode: str = "auto", schedule: QATSchedule | None = None, auto_step: bool = True,
                 inplace: bool = False, statistics: StatisticsConfig | None = None,
                 check_optimizers: bool = True) -> None:
        if mode not in MODES:
            raise ConfigError(f"QATPreparer.mode must be one of {list(MODES)}, got {mode!r}")
        for name, flag in (("inplace", inplace), ("auto_step", auto_step), ("check_optimizers", check_optimizers)):
            if type(flag) is not bool:
                raise ConfigError(f"QATPreparer.{name} must be True or False, got {flag!r}")
        if schedule is not None and not isinstance(schedule, QATSchedule):
            raise ConfigError(f"QATPreparer.schedule must be a QATSchedule (QATSchedule.from_dict reads a dict), "
                              f"got {type(schedule).__name__}")
        if inplace and mode == "graph":
            raise ConfigError(
                "QATPreparer: inplace=True needs mode 'eager' or 'auto'; graph mode always returns a new "
                "GraphModule (which shares the model's Parameters, so nothing is copied anyway)"
            )
        self.mode = mode
        self.schedule = schedule if schedule is not None else QATSchedule()
        self.auto_step = auto_step
        self.inplace = inplace
        self.check_optimizers = check_optimizers
        self.statistics = statistics if statistics is not None else StatisticsConfig()
        if not isinstance(self.statistics, StatisticsConfig):
            raise ConfigError(f"QATPreparer.statistics must be a StatisticsConfig, got {type(statistics).__name__}")

    # ---- IQATPreparer ------------------------------------------------------------------------
    def prepare_for_qat(self, model: Module, config: QuantizationConfig | LayerwiseConfig | None = None) -> Module:
        """The QAT model for ``model`` (see qatcore.quantization.qat.preparation)."""
        if not isinstance(model, Module):
            raise ConfigError(f"prepare_for_qat needs a qatcore Module, got {type(model).__name__}")
        if any(isinstance(m, (FakeQuantize, QATController)) for m in model.modules()):
            raise ConfigError("prepare_for_qat: this model is already prepared for QAT")
        layerwise = LayerwiseConfig.from_config(config if config is not None else QuantizationConfig())
        fallback_reason = None
        if self.mode == "eager" or (self.mode == "auto" and self.inplace):
            qat_model, records = prepare_eager_mode(model, layerwise, self.inplace)
            used = "eager"
        else:
            try:
                qat_model, records = prepare_graph_mode(model, layerwise)
                used = "graph"
            except TraceError as e:
                if self.mode == "graph":
                    raise
                fallback_reason = str(e)
                qat_model, records = prepare_eager_mode(model, layerwise, False)
                used = "eager"
        controller = QATController(self.schedule, self.auto_step, self.statistics, self.check_optimizers)
        qat_model.add_module("qat_controller", controller)
        controller.layers = tuple(records)
        controller.preparation_mode = used
        controller.fallback_reason = fallback_reason
        controller.layerwise_config = layerwise
        controller.attach(qat_model)
        add_to_optimizers(qat_model)
        return qat_model

    def calibrate(self, qat_model: Module, batches, num_batches: int | None = None) -> int:
        """Post-training calibration: run ``batches`` through ``qat_model`` with observers on,
        no gradients and no training step, leaving it ready for ``convert_to_quantized``
        (qatcore.quantization.qat.calibration). Returns the number of samples seen."""
        self.controller(qat_model)
        return calibrate(qat_model, batches, num_batches)

    def convert_to_quantized(self, qat_model: Module) -> Module:
        """The integer-only int8 model of a trained QAT model (qatcore.quantization.qat.conversion);
        calling it on a float array or Tensor returns dequantized float outputs."""
        self.controller(qat_model)
        return convert_to_quantized(qat_model)

    def get_qat_statistics(self, qat_model: Module) -> QATStatistics:
        """The statistics collected while ``qat_model`` trained (qatcore.quantization.qat.statistics):
        the live record, which further training extends."""
        return self.controller(qat_model).statistics

    @classmethod
    def from_checkpoint(cls, path, float_model: Module, make_optimizer=None, generators=None):
        """Rebuild a QAT model from the float model definition and a checkpoint alone.

        The checkpoint says how the model was prepared (mode, schedule, statistics,
        layer-wise config); ``make_optimizer(parameters)``, if given, builds the optimizer
        whose state the checkpoint restores. Returns (qat_model, LoadedCheckpoint), the
        optimizer in ``LoadedCheckpoint.optimizer``.
        """
        payload = read_qat_checkpoint(path)
        if payload["format"] != FORMAT:
            raise CheckpointError(f"{path} is a float checkpoint: prepare the model, then load_qat_checkpoint it")
        settings = payload["preparer"]
        try:
            preparer = cls(mode=settings["mode"], schedule=QATSchedule.from_dict(settings["schedule"]),
                           auto_step=settings["auto_step"], statistics=StatisticsConfig(**settings["statistics"]),
                           check_optimizers=settings.get("check_optimizers", True))
            layerwise = LayerwiseConfig.from_dict(settings["layerwise_config"])
        except (QATCoreError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: the checkpoint's preparation settings are unusable: {e}") from e
        qat_model = preparer.prepare_for_qat(float_model, layerwise)
        optimizer = make_optimizer(qat_model.parameters()) if make_optimizer is not None else None
        info = load_qat_checkpoint(path, qat_model, optimizer, generators)
        return qat_model, replace(info, optimizer=optimizer)

    # ---- lifecycle -------------------------------------------------------------------------
    @staticmethod
    def controller(qat_model: Module) -> QATController:
        """The model's QATController (ConfigError if the model was not prepared)."""
        return controller_of(qat_model)

    def step(self, qat_model: Module, count: int = 1) -> None:
        """Advance the lifecycle schedule explicitly (with auto_step=False)."""
        self.controller(qat_model).step(count)

    def _target(self, qat_model: Module, name: str) -> Module:
        controller = self.controller(qat_model)
        try:
            module = qat_model.get_submodule(name)
        except QATCoreError:
            module = None
        if not isinstance(module, (*QAT_LAYER_TYPES, FakeQuantize)):
            names = [r.name for r in controller.layers] + [
                n for n, m in qat_model.named_modules() if isinstance(m, FakeQuantize) and n.startswith("activation")
            ]
            raise ConfigError(f"{name!r} is not a quantized layer or quantizer of this QAT model; known: {names}")
        return module

    def disable(self, qat_model: Module, name: str) -> None:
        """Turn quantization off for a layer (it computes in float) or an activation quantizer."""
        module = self._target(qat_model, name)
        if isinstance(module, FakeQuantize):
            self.controller(qat_model).exclude(module)
        else:
            module.set_enabled(False)

    def enable(self, qat_model: Module, name: str) -> None:
        """Turn quantization back on for a layer or an activation quantizer."""
        module = self._target(qat_model, name)
        if isinstance(module, FakeQuantize):
            self.controller(qat_model).include(module)
        else:
            module.set_enabled(True)

    def describe(self, qat_model: Module) -> str:
        """Each layer, what it became, its effective config and the rule that chose it."""
        controller = self.controller(qat_model)
        header = ["layer", "float", "qat", "fused", "weights", "activations", "mode", "rule"]
        rows = [header]
        for record in controller.layers:
            rows.append(_describe_row(record, qat_model))
        lines = text_table(rows)
        lines.append(f"preparation: {controller.preparation_mode} mode"
                     + (f" (tracing failed: {controller.fallback_reason})" if controller.fallback_reason else ""))
        return "\n".join(lines)


def _describe_row(record: LayerRecord, qat_model: Module) -> list[str]:
    config = record.resolved.config
    module = qat_model.get_submodule(record.name)
    enabled = record.resolved.enabled and (not isinstance(module, QAT_LAYER_TYPES) or module.enabled)
    embedding = record.float_type == "Embedding"
    if embedding:  # its weights follow the config's embedding spec; the lookup has no activation quantizer
        enabled = enabled and isinstance(module, QAT_LAYER_TYPES)
    if not enabled:
        weights = activations = "float"
    else:
        spec = config.embedding if embedding else config.weight
        weights = (f"{spec.dtype.name} {spec.scheme.value}" + (f" g{spec.group_size}" if spec.group_size else "")
                   + ("" if spec.learnable == "fixed" else f" {spec.learnable}")
                   if config.mode.weights else "float")
        activations = (f"{config.activation.dtype.name} {config.activation.scheme.value}"
                       if config.mode.activations and not embedding else "float")
    mode = ("weights_only" if embedding else config.mode.value) if enabled else ("float" if embedding else "disabled")
    return [record.name, record.float_type, record.qat_type, ", ".join(record.fused) or "-", weights, activations,
            mode, record.resolved.rule]
