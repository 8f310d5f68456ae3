"""float32 requantization against ONNX Runtime, value by value, on both export forms.

ONNX Runtime's u8 x s8 GEMM accumulates exactly with VNNI instructions (AVX-512 VNNI or
AVX-VNNI); on an AVX2 CPU without them it adds products in int16 pairs that saturate
(docs/interop.md, "Agreement with ONNX Runtime"), so the exact comparisons run only where the
accumulation is exact."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from qatcore.errors import InteropError  # noqa: E402
from qatcore.interop.onnxruntime_agreement import onnxruntime_agreement  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "requantization_modes", Path(__file__).parents[1] / "qat" / "test_requantization_modes.py")
modes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(modes)


def _exact_accumulation() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


needs_vnni = pytest.mark.skipif(not _exact_accumulation(), reason="ONNX Runtime accumulates u8 x s8 exactly only "
                                                                  "with VNNI (x86 AVX-512 VNNI or AVX-VNNI)")


@needs_vnni
@pytest.mark.parametrize("form", ["qdq", "qoperator"])
def test_float32_requantization_equals_onnxruntime_at_every_value(form):
    _, int8_model = modes.residual_model("float32")
    x = np.random.default_rng(1).normal(size=(256, 3, 16, 16)).astype(np.float32)
    report = onnxruntime_agreement(int8_model, x, format=form)
    kinds = {type(int8_model.get_submodule(v.name)).__name__ for v in report.values}
    assert {"Quantize", "Int8Conv2d", "Int8Add", "Int8AvgPool2d", "Int8Linear"} <= kinds
    assert report.exact, str(report)


@needs_vnni
def test_fixed_point_differs_from_onnxruntime_by_a_step_here_and_there():
    _, int8_model = modes.residual_model("fixed_point")
    x = np.random.default_rng(1).normal(size=(256, 3, 16, 16)).astype(np.float32)
    report = onnxruntime_agreement(int8_model, x)
    assert not report.exact
    assert all(v.equal > 0.99 and v.max_steps <= 2 for v in report.values), str(report)


def test_only_int8_models_and_known_forms():
    qat, int8_model = modes.residual_model("float32")
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(InteropError, match="expected an Int8Model"):
        onnxruntime_agreement(qat, x)
    with pytest.raises(InteropError, match="format must be one of"):
        onnxruntime_agreement(int8_model, x, format="qlinear")
