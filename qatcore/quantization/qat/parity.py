"""Parity between the QAT model (eval mode) and its int8 conversion, layer by layer.

Every integer value of the int8 model reproduces the output of one FakeQuantize of
the QAT model (``int8_model.value_sources``). ``parity_report`` runs both on the
same inputs and compares each pair in units of that value's output step (LSB):
for dequantized values a and b on the same grid, the distance is |a - b| / s.
A value is named as the statistics name its quantizer: by its dotted module path
(``activation_fake_quant.x``, ``layers.0``), a layer's quantized output as
``<layer>.output`` (``conv1.output``); a value computed by a function, not a module,
by its graph node (``add_1``).

The QAT model's eval forward without gradients computes the int8 arithmetic itself
(:mod:`qatcore.quantization.qat.integer_eval`), so the two agree exactly: ``ParityReport.passes``
checks that every value, at every layer and at the output, is 100.000% exact
(docs/numerics.md, "Parity").

An eager-mode pair (the int8 model holds ``Int8Island`` modules,
:mod:`qatcore.quantization.qat.eager_conversion`) has no graph to walk: forward hooks record
each QAT layer's output and the integers of the island of the same name, call by call, and
each layer is compared on its output grid; a layer called a different number of times or
with another shape in the two models (a branch taken differently) counts as not exact.

>>> import numpy as np
>>> from qatcore.models import DigitsCNN
>>> from qatcore.quantization.qat import QATPreparer
>>> preparer = QATPreparer()
>>> qat = preparer.prepare_for_qat(DigitsCNN())
>>> x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
>>> _ = qat(x)
>>> report = parity_report(qat, preparer.convert_to_quantized(qat), x)
>>> report.passes, report.output.exact
(True, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qatcore.autograd import no_grad
from qatcore.errors import ConfigError
from qatcore.graph import GraphModule
from qatcore.nn.module import Module
from qatcore.quantization.qat.eager_conversion import Int8Island, holds_islands
from qatcore.quantization.qat.int8_model import Int8Model
from qatcore.quantization.qat.qat_layers import QATLayer
from qatcore.tensor import Tensor
from qatcore.text_table import text_table

__all__ = ["LayerParity", "ParityReport", "parity_report"]


@dataclass(frozen=True)
class LayerParity:
    """Agreement of one value: ``exact`` fraction of equal elements, the histogram of
    distances in steps (``within_one`` = fraction within one step), the largest distance."""

    name: str
    elements: int
    exact: float
    within_one: float
    max_lsb: float


@dataclass(frozen=True)
class ParityReport:
    layers: tuple[LayerParity, ...]
    output: LayerParity
    top1_agreement: float | None

    def __str__(self) -> str:
        header = ["value", "elements", "exact %", "<= 1 LSB %", "max LSB"]
        rows = [header] + [[p.name, str(p.elements), f"{100 * p.exact:.3f}", f"{100 * p.within_one:.3f}",
                            f"{p.max_lsb:g}"] for p in (*self.layers, self.output)]
        lines = text_table(rows)
        if self.top1_agreement is not None:
            lines.append(f"top-1 agreement: {100 * self.top1_agreement:.3f}%")
        return "\n".join(lines)

    @property
    def passes(self) -> bool:
        """Every element exact, at every layer and at the output (docs/numerics.md, "Parity")."""
        return self.output.exact == 1.0 and all(layer.exact == 1.0 for layer in self.layers)


def _compare(name: str, reference: np.ndarray, candidate: np.ndarray, scale: float) -> LayerParity:
    distance = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)) / scale
    steps = np.rint(distance)
    count = max(reference.size, 1)
    return LayerParity(name, int(reference.size), float(np.sum(steps == 0)) / count,
                       float(np.sum(steps <= 1)) / count, float(steps.max()) if reference.size else 0.0)


def _array(value) -> np.ndarray:
    return value.data if isinstance(value, Tensor) else np.asarray(value)


def _output_parity(qat_out, int8_out, scale: float) -> tuple[LayerParity, float | None]:
    """The model outputs compared on the grid of ``scale`` (the last integer value's), and the
    top-1 agreement of 2-D outputs."""
    qat_array, int8_array = _array(qat_out), _array(int8_out)
    output = _compare("output", qat_array, int8_array, scale)
    top1 = None
    if qat_array.ndim == 2 and qat_array.shape[1] > 1:
        top1 = float(np.mean(np.argmax(qat_array, axis=1) == np.argmax(int8_array, axis=1)))
    return output, top1


def _run_qat_eval(qat_model: Module, run):
    """``run()`` with ``qat_model`` in eval mode and gradients off (its integer eval forward)."""
    training = qat_model.training
    qat_model.eval()
    try:
        with no_grad():
            return run()
    finally:
        qat_model.train(training)


def parity_report(qat_model: Module, int8_model: Module, inputs) -> ParityReport:
    """Compare ``int8_model`` (from ``convert_to_quantized``) with ``qat_model`` in eval mode
    on ``inputs`` (an array or Tensor, or a tuple of them for several inputs)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if isinstance(int8_model, Int8Model):
        return _graph_parity(qat_model, int8_model, args)
    if isinstance(int8_model, Module) and holds_islands(int8_model):
        return _eager_parity(qat_model, int8_model, args)
    raise ConfigError("parity_report: the second model is not the result of convert_to_quantized")


def _graph_parity(qat_model: GraphModule, int8_model: Int8Model, args: tuple) -> ParityReport:
    sources = int8_model.value_sources
    reference: dict[str, np.ndarray] = {}

    def record(node, value) -> None:
        if isinstance(value, (Tensor, np.ndarray)):  # not a pair such as MultiheadAttention's (output, weights)
            reference[node.name] = _array(value)

    qat_out = _run_qat_eval(qat_model, lambda: qat_model.run(args, {}, record))
    candidates: dict[str, tuple[np.ndarray, float]] = {}

    def observe(node, value) -> None:
        if node.name in sources and isinstance(value, np.ndarray):
            record = sources[node.name]
            scale, zero = float(record.scale), int(record.zero_point)
            candidates[node.name] = ((value.astype(np.int64) - zero) * np.float64(scale), scale)

    with no_grad():
        int8_out = int8_model.run(args, {}, observe)
    module_paths = {node.name: node.target for node in qat_model.graph.nodes if node.op == "call_module"}
    layers = []
    for name, (values, scale) in candidates.items():
        label = sources[name].source  # "node" or "node (output)", node a QAT graph node's name
        source = label.split(" ")[0]
        if source in reference:
            value_name = module_paths.get(source, source) + (".output" if label.endswith(" (output)") else "")
            layers.append(_compare(value_name, np.asarray(reference[source], dtype=np.float64), values, scale))
    # the model output is the last integer value, dequantized: compare on its grid
    last_scale = next((scale for name, (_, scale) in reversed(list(candidates.items()))), 1.0)
    output, top1 = _output_parity(qat_out, int8_out, last_scale)
    return ParityReport(tuple(layers), output, top1)


def _eager_parity(qat_model: Module, int8_model: Module, args: tuple) -> ParityReport:
    reference: dict[str, list[np.ndarray]] = {}
    candidates: dict[str, list[np.ndarray]] = {}  # in the order the islands first ran
    grids: dict[str, tuple[float, int]] = {}

    def record_qat(name: str):
        return lambda module, inputs, output: reference.setdefault(name, []).append(
            np.array(_array(output), dtype=np.float64))

    def record_island(name: str, island: Int8Island):
        grids[name] = (float(island.layer.output_scale.data), int(island.layer.output_zero_point.data))
        return lambda module, inputs, output: candidates.setdefault(name, []).append(_array(output))

    handles = [module.register_forward_hook(record_qat(name)) for name, module in qat_model.named_modules()
               if isinstance(module, QATLayer)]
    handles += [island.layer.register_forward_hook(record_island(name, island))
                for name, island in int8_model.named_modules() if isinstance(island, Int8Island)]
    try:
        qat_out = _run_qat_eval(qat_model, lambda: qat_model(*args))
        with no_grad():
            int8_out = int8_model(*args)
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for name, outputs in candidates.items():
        scale, zero = grids[name]
        label = f"{name}.output"
        calls = reference.get(name, [])
        if len(calls) != len(outputs) or any(a.shape != b.shape for a, b in zip(calls, outputs)):
            elements = sum(b.size for b in outputs)
            layers.append(LayerParity(label, elements, 0.0, 0.0, float("inf")))
            continue
        values = np.concatenate([((b.astype(np.int64) - zero) * np.float64(scale)).ravel() for b in outputs])
        layers.append(_compare(label, np.concatenate([a.ravel() for a in calls]), values, scale))
    for name in grids:
        if name in reference and name not in candidates:  # the QAT model ran it, the int8 model did not
            layers.append(LayerParity(f"{name}.output", sum(a.size for a in reference[name]), 0.0, 0.0,
                                      float("inf")))
    last_scale = grids[next(reversed(candidates))][0] if candidates else 1.0
    output, top1 = _output_parity(qat_out, int8_out, last_scale)
    return ParityReport(tuple(layers), output, top1)
