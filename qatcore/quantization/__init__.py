"""Quantization: integer types, schemes, parameters, configuration, observers and
fake quantization. The QAT engine lives in :mod:`qatcore.quantization.qat`."""

from qatcore.quantization.config import QuantizationConfig, QuantMode, QuantSpec
from qatcore.quantization.dtypes import INT4, INT4_NARROW, INT8, INT8_NARROW, UINT4, UINT8, QuantDType
from qatcore.quantization.qparams import QParams
from qatcore.quantization.qscheme import QScheme

__all__ = [
    "QuantDType", "INT8", "INT8_NARROW", "UINT8", "INT4", "INT4_NARROW", "UINT4", "QScheme", "QParams",
    "QuantSpec", "QuantizationConfig", "QuantMode",
]
