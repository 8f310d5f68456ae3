"""Parity between the QAT model (eval mode) and its int8 conversion, layer by layer.

Every integer value of the int8 model reproduces the output of one FakeQuantize of
the QAT model (``int8_model.value_sources``). ``parity_report`` runs both on the
same inputs and compares each pair in units of that value's output step (LSB):
for dequantized values a and b on the same grid, the distance is |a - b| / s.

The QAT model's eval forward without gradients computes the int8 arithmetic itself
(:mod:`qatcore.quantization.qat.integer_eval`), so the two agree exactly: ``ParityReport.passes``
checks that every value, at every layer and at the output, is 100.000% exact
(docs/numerics.md, "Parity").

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
from qatcore.quantization.qat.int8_model import Int8Model
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


def parity_report(qat_model: GraphModule, int8_model: GraphModule, inputs) -> ParityReport:
    """Compare ``int8_model`` (from ``convert_to_quantized``) with ``qat_model`` in eval mode
    on ``inputs`` (an array or Tensor, or a tuple of them for several inputs)."""
    if not isinstance(int8_model, Int8Model):
        raise ConfigError("parity_report: the second model is not the result of convert_to_quantized")
    sources = int8_model.value_sources
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    reference: dict[str, np.ndarray] = {}
    training = qat_model.training
    qat_model.eval()
    try:
        with no_grad():
            qat_out = qat_model.run(args, {}, lambda node, value: reference.__setitem__(
                node.name, value.data if isinstance(value, Tensor) else value))
    finally:
        qat_model.train(training)
    candidates: dict[str, tuple[np.ndarray, float]] = {}

    def observe(node, value) -> None:
        if node.name in sources and isinstance(value, np.ndarray):
            record = sources[node.name]
            scale, zero = float(record.scale), int(record.zero_point)
            candidates[node.name] = ((value.astype(np.int64) - zero) * np.float64(scale), scale)

    with no_grad():
        int8_out = int8_model.run(args, {}, observe)
    layers = []
    for name, (values, scale) in candidates.items():
        label = sources[name].source
        source = label.split(" ")[0]
        if source in reference:
            layers.append(_compare(label, np.asarray(reference[source], dtype=np.float64), values, scale))
    qat_array = qat_out.data if isinstance(qat_out, Tensor) else np.asarray(qat_out)
    int8_array = int8_out.data if isinstance(int8_out, Tensor) else np.asarray(int8_out)
    # the model output is the last integer value, dequantized: compare on its grid
    last_scale = next((scale for name, (_, scale) in reversed(list(candidates.items()))), 1.0)
    output = _compare("output", qat_array, int8_array, last_scale)
    top1 = None
    if qat_array.ndim == 2 and qat_array.shape[1] > 1:
        top1 = float(np.mean(np.argmax(qat_array, axis=1) == np.argmax(int8_array, axis=1)))
    return ParityReport(tuple(layers), output, top1)
