"""How exactly ONNX Runtime reproduces a converted int8 model, value by value.

:func:`onnxruntime_agreement` exports the int8 model (``export_onnx``), makes every integer
value of the int8 model an output of the ONNX graph as well, runs the file in ONNX Runtime's
CPU execution provider with its default graph optimizations (which fuse the QDQ form into
ONNX Runtime's integer kernels) and compares each value with qatcore's int8 runtime: the
fraction of equal integers and the largest difference in output steps.

With ``QuantizationConfig(requantization="float32")`` every value agrees exactly
(docs/interop.md, "Agreement with ONNX Runtime"); with the default fixed-point arithmetic, a
few values a million differ by one step where a product lies within float32 precision of a
rounding boundary.

>>> import numpy as np
>>> from qatcore import no_grad
>>> from qatcore.models import DigitsCNN
>>> from qatcore.quantization.config import QuantizationConfig
>>> from qatcore.quantization.qat import QATPreparer
>>> preparer = QATPreparer()
>>> qat = preparer.prepare_for_qat(DigitsCNN(), QuantizationConfig(requantization="float32"))
>>> x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
>>> with no_grad():
...     _ = qat(x)
>>> report = onnxruntime_agreement(preparer.convert_to_quantized(qat), x)
>>> report.exact, len(report.values) > 3
(True, True)
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from qatcore.autograd.grad_mode import no_grad
from qatcore.errors import InteropError
from qatcore.interop.onnx import FORMATS, _require_onnx, export_onnx
from qatcore.quantization.qat.int8_model import Int8Model

__all__ = ["ValueAgreement", "AgreementReport", "onnxruntime_agreement"]


@dataclass(frozen=True)
class ValueAgreement:
    """One integer value: its int8-model node, how many integers, the fraction equal, the
    largest difference (in output steps)."""

    name: str
    elements: int
    equal: float
    max_steps: int


@dataclass(frozen=True)
class AgreementReport:
    """Per-value agreement, in graph order, and the model output's (float, compared exactly)."""

    format: str
    values: tuple[ValueAgreement, ...]
    output_equal: float

    @property
    def exact(self) -> bool:
        """Every integer value and the output equal, everywhere."""
        return self.output_equal == 1.0 and all(v.equal == 1.0 for v in self.values)

    def __str__(self) -> str:
        lines = [f"{'value':<44} {'elements':>10} {'equal':>10} {'max steps':>9}"]
        lines += [f"{v.name:<44} {v.elements:>10} {v.equal:>10.6f} {v.max_steps:>9}" for v in self.values]
        lines.append(f"{'output':<44} {'':>10} {self.output_equal:>10.6f}")
        return "\n".join(lines)


def onnxruntime_agreement(int8_model: Int8Model, inputs, format: str = "qdq") -> AgreementReport:  # noqa: A002
    """Run ``int8_model`` (from ``convert_to_quantized``) and its ONNX export on ``inputs`` (a
    float array with a batch axis) and compare every integer value (module docstring).

    Raises:
        InteropError: the onnx extra is missing, the model is not an Int8Model, or an unknown
            format.
    """
    onnx = _require_onnx()
    import onnxruntime

    if not isinstance(int8_model, Int8Model):
        raise InteropError(f"onnxruntime_agreement: expected an Int8Model (convert_to_quantized), "
                           f"got {type(int8_model).__name__}")
    if format not in FORMATS:
        raise InteropError(f"onnxruntime_agreement: format must be one of {FORMATS}, got {format!r}")
    x = np.asarray(getattr(inputs, "data", inputs), dtype=np.float32)
    ours: dict[str, np.ndarray] = {}

    def observe(node, value) -> None:
        if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
            ours[node.name] = value

    with no_grad():
        output = int8_model.run((x,), {}, observe)
    with tempfile.TemporaryDirectory() as folder:
        proto = export_onnx(int8_model, os.path.join(folder, "model.onnx"), x[:1], format=format)
    # the last ONNX value each int8 node writes (its node name is the prefix of the ONNX names)
    written: dict[str, str] = {}
    for node in proto.graph.node:
        for name in node.output:
            prefix = name.split("/")[0]
            if prefix in ours:
                written[prefix] = name
    outputs = {o.name for o in proto.graph.output}
    for name in written.values():
        if name not in outputs:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    theirs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))
    values = []
    for node, name in written.items():
        a, b = ours[node].astype(np.int64), theirs[name].astype(np.int64)
        if a.shape != b.shape:
            raise InteropError(f"onnxruntime_agreement: value {node!r} has shape {b.shape} in ONNX Runtime, "
                               f"{a.shape} in qatcore")
        steps = int(np.abs(a - b).max()) if a.size else 0
        values.append(ValueAgreement(node, int(a.size), float(np.mean(a == b)) if a.size else 1.0, steps))
    out = getattr(output, "data", output)
    output_equal = float(np.mean(np.asarray(theirs[names[0]]) == out))
    return AgreementReport(format, tuple(values), output_equal)
