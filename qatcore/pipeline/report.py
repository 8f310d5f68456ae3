"""The result of a run and its two human-readable forms.

:class:`RunResult` holds the numbers a run measured (``to_dict()`` is the record
written to ``result.json`` and printed by ``qatcore run --json``) and the models and
reports they came from. :func:`format_summary` is the table ``qatcore run`` prints;
:func:`format_report` is ``report.md``: that table, the parity report value by value,
and the statistics summary at the end of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from qatcore.nn import Module
from qatcore.quantization.qat import ParityReport, QATStatistics

__all__ = ["RunResult", "format_summary", "format_report"]


def _attached():
    """A RunResult field that is an object, not part of the record."""
    return field(repr=False, metadata={"record": False})


@dataclass(frozen=True, eq=False)
class RunResult:
    """What one run measured and made.

    The record (in this order): the settings that shaped it (model, dataset, seed, epochs,
    qat_epochs), the weight and activation bits of the config used (``bits``,
    ``activation_bits``: from ``--bits`` or the config file; 32 for float) and its ``scheme``
    in words, the split sizes, test accuracy of the float model, of the
    post-training quantized (PTQ) integer model, of the QAT model (None with ``qat_epochs``
    0) and of the run's integer model (``model.int8``: QAT's, or PTQ's with ``qat_epochs``
    0), the float and integer file sizes in bytes, the median inference time on the test set
    in ms, the parity of ``model.int8`` with its QAT model at the output (fraction exact,
    largest difference in output steps, top-1 agreement), the PTQ model's parity
    with its calibrated model (output fraction exact, largest difference, and whether
    every value at every layer is exact), the number of calibration samples, the wall
    time, the run folder and whether ``statistics.png`` was drawn. Attached: the float,
    QAT and integer models, the ``ParityReport``, the ``QATStatistics`` and the PTQ
    models and parity report.
    """

    model: str
    dataset: str
    seed: int
    epochs: int
    qat_epochs: int
    bits: int
    activation_bits: int
    scheme: str
    train_samples: int
    test_samples: int
    float_accuracy: float
    ptq_accuracy: float
    qat_accuracy: float | None
    int8_accuracy: float
    float_model_bytes: int
    int8_model_bytes: int
    float_inference_ms: float
    int8_inference_ms: float
    parity_exact: float
    parity_max_lsb: float
    top1_agreement: float | None
    ptq_parity_exact: float
    ptq_parity_max_lsb: float
    ptq_parity_passes: bool
    calibration_samples: int
    wall_time_s: float
    output: str
    plots: bool
    float_model: Module = _attached()
    qat_model: Module = _attached()
    int8_model: Module = _attached()
    parity: ParityReport = _attached()
    statistics: QATStatistics = _attached()
    ptq_model: Module = _attached()
    ptq_int8_model: Module = _attached()
    ptq_parity: ParityReport = _attached()

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data, led by ``"command": "run"`` (``result.json``)."""
        return {"command": "run", **{f.name: getattr(self, f.name) for f in fields(self)
                                     if f.metadata.get("record", True)}}


def integer_label(result: RunResult) -> str:
    """"int8" when weights and activations are 8-bit, else "integer" (a 4-bit model is not int8)."""
    return "int8" if (result.bits, result.activation_bits) == (8, 8) else "integer"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_summary(result: RunResult) -> str:
    """The table ``qatcore run`` prints: the scheme, accuracy (PTQ next to QAT), size, speed,
    parity and time (the converted model is called "int8" only when it is 8-bit, else "integer")."""
    label = integer_label(result)
    ptq_parity = (f"{100 * result.ptq_parity_exact:.3f}% exact, max {result.ptq_parity_max_lsb:g} LSB, "
                  f"{'passes' if result.ptq_parity_passes else 'FAILS'} (calibrated on "
                  f"{result.calibration_samples} training images)")
    if result.qat_accuracy is None:  # --qat-epochs 0: post-training quantization only
        accuracy = [(f"accuracy (float / PTQ {label})", f"{_percent(result.float_accuracy)} / "
                                                        f"{_percent(result.ptq_accuracy)}")]
        parity = [(f"PTQ {label} vs calibrated model", ptq_parity)]
    else:
        accuracy = [(f"accuracy (float / QAT / {label})", f"{_percent(result.float_accuracy)} / "
                                                          f"{_percent(result.qat_accuracy)} / "
                                                          f"{_percent(result.int8_accuracy)}"),
                    (f"accuracy without QAT (PTQ {label})", _percent(result.ptq_accuracy))]
        parity = [(f"{label} vs QAT outputs", f"{100 * result.parity_exact:.3f}% exact, max "
                                              f"{result.parity_max_lsb:g} LSB, top-1 agreement "
                                              f"{100 * (result.top1_agreement or 0):.2f}%"),
                  (f"PTQ {label} vs calibrated model", ptq_parity)]
    rows = [
        ("quantization", result.scheme),
        *accuracy,
        (f"model size (float / {label})", f"{result.float_model_bytes:,} / {result.int8_model_bytes:,} bytes "
                                      f"({100 * result.int8_model_bytes / result.float_model_bytes:.1f}%)"),
        (f"inference on the test set (float / {label})", f"{result.float_inference_ms:.2f} / "
                                                     f"{result.int8_inference_ms:.2f} ms"),
        *parity,
        ("wall time", f"{result.wall_time_s:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    header = (f"qatcore run: {result.model} on {result.dataset} ({result.train_samples} train / "
              f"{result.test_samples} test), {result.epochs} float + {result.qat_epochs} QAT epochs")
    return "\n".join([header] + [f"  {name.ljust(width)}  {value}" for name, value in rows]
                     + [f"  files in {result.output}/"])


# report.md cites only files of the qatcore repository (tests check that they exist).
PARITY_NOTE = ("Each integer value of the int8 model next to the QAT model's, in steps of its grid; values are "
               "named by their module path, as in the statistics below (docs/numerics.md, \"Parity\").")


def format_report(result: RunResult) -> str:
    """``report.md``: the summary, the parity report (and, when QAT ran, the PTQ model's), and the
    statistics summary."""
    ptq = ("" if result.qat_accuracy is None else
           f"## Post-training quantization parity, value by value\n\n```text\n{result.ptq_parity}\n```\n\n")
    return (f"# qatcore run report\n\n```text\n{format_summary(result)}\n```\n\n## Parity, value by value\n\n"
            f"{PARITY_NOTE}\n\n```text\n{result.parity}\n```\n\n{ptq}## Statistics at the end of training\n\n"
            f"```text\n{result.statistics.summary()}\n```\n")
