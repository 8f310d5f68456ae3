"""Collecting statistics while the QAT model trains.

The model's :class:`~qatcore.quantization.qat.training_integration.QATController`
tells the collector, before each training-mode forward pass, which step it is;
on a sample step (every ``config.every`` steps, when enabled) each FakeQuantize
hands the collector what it saw (input, output, qparams) and receives a callback
that the fake-quant op's backward calls with the gradients entering and leaving
it and the clipped counts. Nothing is computed on other steps, which keeps the
cost to a few percent of a training step.

Data-parallel runs
------------------
With a process group installed (``qatcore.process_group.current_group()``), rank r
sees n_r samples of a global batch of N = sum_r n_r (its contiguous share, in rank
order, as ``ShardedLoader`` gives it), and every recorded value describes the global
batch: every rank makes the same reductions in the same order and ends up with the
same statistics. On a sample step:

- ``begin_step`` sums the batch sizes (n_r is the model input's axis 0, read as
  ``DataParallel`` reads it): rank r's share w_r = n_r / N is the weight of its mean
  loss in the global one, L = sum_r w_r L_r.
- Weights, qparams and the observer's range are the same on every rank (the weights
  by ``DataParallel``, the observer's range once observers are synchronized), so the
  scale statistics, ``flip_rate`` and everything a *weight* quantizer records in the
  forward need no reduction.
- Activations, forward (3 to 5 reductions): the element counts of every rank (the
  offsets of each rank's values in the global batch, flattened in C order);
  ``batch_min``/``batch_max`` as a "min" reduction of (min, -max), a rank with no finite
  value sending +inf; the SQNR's signal and noise sums; the histogram (a common range,
  then summed counts: ``QuantizerStatistics.update_histogram``).
- Subsampling: in one process SQNR and the histogram read every ``stride``-th element,
  ``stride = max(1, size // SAMPLE_ELEMENTS)``. Ranks use the same rule on the *global*
  size and keep the global positions that are multiples of the stride, so together
  they read exactly the elements one process reads of the global batch.
- Backward, activations (1 reduction): the gradient of L with respect to rank r's
  activations is w_r times rank r's gradient g_r, so the global norm is
  sqrt(sum_r w_r^2 ||g_r||^2) (for dL/dy and dL/dx alike); ``clip_fraction`` is the
  summed clipped count over the summed size; ``scale_grad`` is mean |sum_r w_r ds_r|,
  the scale gradient ``DataParallel`` applies.
- Backward, weights (1 reduction, of weight-sized arrays, on sample steps only): the
  global gradient sum_r w_r g_r is reduced and its norm taken; the scale gradient
  likewise; ``clip_fraction`` depends on the weights alone, the same on every rank.

Equal to one process on the global batch, given the same values (the ranks' values
concatenated are the global batch's): ``batch_min``/``batch_max`` and their moving
averages, ``clip_fraction``, the histogram and percentiles, bit for bit. Equal up to
float rounding: SQNR (the same elements, float64 sums added in another order) and the
gradient norms and ``scale_grad`` (the global gradient is a weighted sum of the ranks'
float32 gradients instead of one computation over the batch).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from qatcore.errors import ConfigError
from qatcore.process_group import ProcessGroup, current_group
from qatcore.quantization.qat.statistics import QATStatistics, StatisticsConfig, sqnr_db

__all__ = ["StatisticsCollector", "SAMPLE_ELEMENTS"]

# SQNR and the activation histogram use at most this many elements of a tensor: a fixed
# stride through it (deterministic), which estimates them closely at a fraction of the cost.
SAMPLE_ELEMENTS = 16384


def _subsample(x: np.ndarray, y: np.ndarray | None, offset: int = 0,
               total: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Every ``stride``-th element of x (and y), stride = max(1, total // SAMPLE_ELEMENTS).
    ``x`` starts at position ``offset`` of a flattened whole of ``total`` elements (by
    default x itself); the positions kept are the multiples of the stride in that whole."""
    stride = max(1, (x.size if total is None else total) // SAMPLE_ELEMENTS)
    if stride == 1:
        return x, y
    first = -offset % stride
    flat_y = None if y is None else y.reshape(-1)[first::stride]
    return x.reshape(-1)[first::stride], flat_y


def _global_extremes(group: ProcessGroup, finite: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the finite values of every rank; None when no rank has one."""
    local = np.array([finite.min(), -finite.max()], dtype=np.float64) if finite.size else np.full(2, np.inf)
    low, negative_high = group.allreduce(local, "min")
    return (float(low), float(-negative_high)) if math.isfinite(low) else None


class StatisticsCollector:
    """Feeds one QATStatistics from the quantizers of one QAT model."""

    def __init__(self, config: StatisticsConfig | None = None) -> None:
        self.statistics = QATStatistics(config)
        self.sampling = False
        self.step = 0
        self.share = 1.0  # n_r / N of this sample step: this rank's weight in the global loss
        self.group = None  # the sample step's process group, if any

    @property
    def config(self) -> StatisticsConfig:
        return self.statistics.config

    def begin_step(self, step: int, batch_size: int | None = None) -> None:
        """Step ``step`` begins; ``batch_size`` is this rank's number of samples, needed in a
        data-parallel run (summed over the ranks on sample steps; module docstring)."""
        self.step = int(step)
        self.sampling = self.config.enabled and step % self.config.every == 0
        self.share = 1.0
        # the step's group: a QAT layer quantizes its weights outside it (they are the same on
        # every rank), but their gradients, recorded in backward, are the ranks' own
        self.group = group = current_group() if self.sampling else None
        if group is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
                raise ConfigError(
                    f"StatisticsCollector.begin_step: in a data-parallel run the local batch size must be given "
                    f"(a non-negative int, got {batch_size!r}); it weights each rank's gradients")
            total = float(group.allreduce(np.array([batch_size], dtype=np.float64), "sum")[0])
            self.share = batch_size / total if total > 0 else 0.0

    def record_forward(self, quantizer, kind: str, x: np.ndarray, y: np.ndarray | None) -> None:
        """What ``quantizer`` (a FakeQuantize) saw on this sample step."""
        values: dict = {}
        stats = self.statistics.quantizer(quantizer.name, kind)
        # a weight quantizer sees the same weights on every rank: only activations are reduced
        group = current_group() if kind == "activation" else None
        if quantizer.dynamic and bool(quantizer.qparams_ready.data):
            # the scales of this call: per group (weights) or per token (activations; of this
            # rank's tokens in a data-parallel run: the extremes below are the global batch's)
            scale, zero_point, integers = quantizer.block_qparams(x)
            integers = integers if kind == "weight" else None
        elif bool(quantizer.qparams_ready.data):
            qparams = quantizer.calculate_qparams()
            scale, zero_point = qparams.scale, qparams.zero_point
            integers = qparams.quantize(x).astype(np.int32) if kind == "weight" else None
        else:
            scale = zero_point = integers = None
        if scale is not None:
            values.update(scale_mean=float(np.mean(scale)), scale_min=float(np.min(scale)),
                          scale_max=float(np.max(scale)), zero_point_mean=float(np.mean(zero_point)))
            if self.config.per_channel_detail and scale.size > 1 and kind == "weight":
                values["scale"] = np.asarray(scale, dtype=np.float64).reshape(-1)
        if integers is not None:
            previous = stats.previous_integers
            if previous is not None and previous.shape == integers.shape:
                values["flip_rate"] = float(np.mean(previous != integers))
            stats.previous_integers = integers.astype(np.int16)
        observer = quantizer.observer
        if observer is not None and observer.has_observed:
            values.update(observed_min=float(np.min(observer.min_val.data)),
                          observed_max=float(np.max(observer.max_val.data)))
        finite = x[np.isfinite(x)]
        if group is None:
            extremes = (float(finite.min()), float(finite.max())) if finite.size else None
            sample_x, sample_y = _subsample(x, y)
        else:
            sizes = np.zeros(group.world_size, dtype=np.int64)
            sizes[group.rank] = x.size
            sizes = group.allreduce(sizes, "sum")
            extremes = _global_extremes(group, finite)
            sample_x, sample_y = _subsample(x, y, offset=int(sizes[:group.rank].sum()), total=int(sizes.sum()))
        if extremes is not None:
            low, high = extremes
            values.update(batch_min=low, batch_max=high, batch_min_ema=stats.moving_average("min", low),
                          batch_max_ema=stats.moving_average("max", high))
        if y is not None:
            values["sqnr_db"] = sqnr_db(sample_x, sample_y, group)
        if kind == "activation":
            stats.update_histogram(sample_x, group)
            values.update(stats.percentiles())
        self.statistics.record(quantizer.name, kind, self.step, values)

    def backward_callback(self, quantizer, kind: str) -> Callable:
        """The on_backward callback of the fake-quant op for this sample step."""
        step, name, share, group = self.step, quantizer.name, self.share, self.group

        def record(grad_in: np.ndarray, grad_out: np.ndarray, clipped: np.ndarray, grad_scale) -> None:
            if group is None:
                values = {
                    "grad_norm_in": float(np.linalg.norm(grad_in.astype(np.float64, copy=False).ravel())),
                    "grad_norm_out": float(np.linalg.norm(grad_out.astype(np.float64, copy=False).ravel())),
                    "clip_fraction": float(np.sum(clipped)) / max(grad_in.size, 1),
                }
                if grad_scale is not None:
                    values["scale_grad"] = float(np.mean(np.abs(grad_scale)))
            elif kind == "activation":
                values = _global_activation_gradients(group, share, grad_in, grad_out, clipped, grad_scale)
            else:
                values = _global_weight_gradients(group, share, grad_in, grad_out, clipped, grad_scale)
            self.statistics.record(name, kind, step, values)

        return record


def _global_activation_gradients(group: ProcessGroup, share: float, grad_in: np.ndarray, grad_out: np.ndarray,
                                 clipped: np.ndarray, grad_scale: np.ndarray | None) -> dict:
    """The gradient statistics of an activation quantizer over the global batch (module
    docstring): ||w_r g|| summed in squares, counts summed, sum_r w_r ds_r."""
    squares = [float(np.dot(g, g)) for g in (grad_in.astype(np.float64).ravel(), grad_out.astype(np.float64).ravel())]
    parts = [np.array([share * share * squares[0], share * share * squares[1], float(np.sum(clipped)),
                       float(grad_in.size)])]
    if grad_scale is not None:
        parts.append(share * grad_scale.astype(np.float64).ravel())
    total = group.allreduce(np.concatenate(parts), "sum")
    values = {"grad_norm_in": math.sqrt(total[0]), "grad_norm_out": math.sqrt(total[1]),
              "clip_fraction": float(total[2]) / max(float(total[3]), 1.0)}
    if grad_scale is not None:
        values["scale_grad"] = float(np.mean(np.abs(total[4:])))
    return values


def _global_weight_gradients(group: ProcessGroup, share: float, grad_in: np.ndarray, grad_out: np.ndarray,
                             clipped: np.ndarray, grad_scale: np.ndarray | None) -> dict:
    """The gradient statistics of a weight quantizer, of the global gradient sum_r w_r g_r
    (module docstring); the clipped count depends on the weights only."""
    parts = [grad_in.astype(np.float64).ravel(), grad_out.astype(np.float64).ravel()]
    if grad_scale is not None:
        parts.append(grad_scale.astype(np.float64).ravel())
    total = group.allreduce(share * np.concatenate(parts), "sum")
    values = {"grad_norm_in": float(np.linalg.norm(total[:grad_in.size])),
              "grad_norm_out": float(np.linalg.norm(total[grad_in.size:grad_in.size + grad_out.size])),
              "clip_fraction": float(np.sum(clipped)) / max(grad_in.size, 1)}
    if grad_scale is not None:
        values["scale_grad"] = float(np.mean(np.abs(total[grad_in.size + grad_out.size:])))
    return values
