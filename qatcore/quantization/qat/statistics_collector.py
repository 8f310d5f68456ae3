"""Collecting statistics while the QAT model trains.

The model's :class:`~qatcore.quantization.qat.training_integration.QATController`
tells the collector, before each training-mode forward pass, which step it is;
on a sample step (every ``config.every`` steps, when enabled) each FakeQuantize
hands the collector what it saw (input, output, qparams) and receives a callback
that the fake-quant op's backward calls with the gradients entering and leaving
it and the clipped counts. Nothing is computed on other steps, which keeps the
cost to a few percent of a training step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qatcore.quantization.qat.statistics import QATStatistics, StatisticsConfig, sqnr_db

__all__ = ["StatisticsCollector", "SAMPLE_ELEMENTS"]

# SQNR and the activation histogram use at most this many elements of a tensor: a fixed
# stride through it (deterministic), which estimates them closely at a fraction of the cost.
SAMPLE_ELEMENTS = 16384


def _subsample(x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    stride = max(1, x.size // SAMPLE_ELEMENTS)
    if stride == 1:
        return x, y
    flat_y = None if y is None else y.reshape(-1)[::stride]
    return x.reshape(-1)[::stride], flat_y


class StatisticsCollector:
    """Feeds one QATStatistics from the quantizers of one QAT model."""

    def __init__(self, config: StatisticsConfig | None = None) -> None:
        self.statistics = QATStatistics(config)
        self.sampling = False
        self.step = 0

    @property
    def config(self) -> StatisticsConfig:
        return self.statistics.config

    def begin_step(self, step: int) -> None:
        self.step = int(step)
        self.sampling = self.config.enabled and step % self.config.every == 0

    def record_forward(self, quantizer, kind: str, x: np.ndarray, y: np.ndarray | None) -> None:
        """What ``quantizer`` (a FakeQuantize) saw on this sample step."""
        values: dict = {}
        stats = self.statistics.quantizer(quantizer.name, kind)
        if bool(quantizer.qparams_ready.data):
            qparams = quantizer.calculate_qparams()
            values.update(scale_mean=float(np.mean(qparams.scale)), scale_min=float(np.min(qparams.scale)),
                          scale_max=float(np.max(qparams.scale)),
                          zero_point_mean=float(np.mean(qparams.zero_point)))
            if self.config.per_channel_detail and qparams.scale.size > 1:
                values["scale"] = qparams.scale.astype(np.float64)
            if kind == "weight":
                integers = qparams.quantize(x).astype(np.int32)
                previous = stats.previous_integers
                if previous is not None and previous.shape == integers.shape:
                    values["flip_rate"] = float(np.mean(previous != integers))
                stats.previous_integers = integers.astype(np.int16)
        observer = quantizer.observer
        if observer.has_observed:
            values.update(observed_min=float(np.min(observer.min_val.data)),
                          observed_max=float(np.max(observer.max_val.data)))
        finite = x[np.isfinite(x)]
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            values.update(batch_min=low, batch_max=high, batch_min_ema=stats.moving_average("min", low),
                          batch_max_ema=stats.moving_average("max", high))
        sample_x, sample_y = _subsample(x, y)
        if y is not None:
            values["sqnr_db"] = sqnr_db(sample_x, sample_y)
        if kind == "activation":
            stats.update_histogram(sample_x)
            values.update(stats.percentiles())
        self.statistics.record(quantizer.name, kind, self.step, values)

    def backward_callback(self, quantizer, kind: str) -> Callable:
        """The on_backward callback of the fake-quant op for this sample step."""
        step, name = self.step, quantizer.name

        def record(grad_in: np.ndarray, grad_out: np.ndarray, clipped: np.ndarray, grad_scale) -> None:
            values = {
                "grad_norm_in": float(np.linalg.norm(grad_in.astype(np.float64, copy=False).ravel())),
                "grad_norm_out": float(np.linalg.norm(grad_out.astype(np.float64, copy=False).ravel())),
                "clip_fraction": float(np.sum(clipped)) / max(grad_in.size, 1),
            }
            if grad_scale is not None:
                values["scale_grad"] = float(np.mean(np.abs(grad_scale)))
            self.statistics.record(name, kind, step, values)

        return record
