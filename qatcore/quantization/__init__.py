"""Quantization: integer types, schemes, parameters, configuration, observers and
fake quantization. The QAT engine lives in :mod:`qatcore.quantization.qat` and its
main names are re-exported here."""

from qatcore.errors import CheckpointError, ObserverError
from qatcore.quantization.config import QuantizationConfig, QuantMode, QuantSpec
from qatcore.quantization.dtypes import INT4, INT4_NARROW, INT8, INT8_NARROW, UINT4, UINT8, QuantDType
from qatcore.quantization.fake_quantize import fake_quantize, fake_quantize_learnable
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.histogram_observer import HistogramObserver
from qatcore.quantization.mse_observer import MSEObserver
from qatcore.quantization.observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    Observer,
    PerChannelMinMaxObserver,
    make_observer,
)
from qatcore.quantization.qat import (
    IQATPreparer,
    LayerOverride,
    LayerwiseConfig,
    QATPreparer,
    QATSchedule,
)
from qatcore.quantization.qat.checkpointing import (
    load_int8_model,
    load_qat_checkpoint,
    save_int8_model,
    save_qat_checkpoint,
)
from qatcore.quantization.qat.conversion import convert_to_quantized
from qatcore.quantization.qat.int8_serialization import int8_model_from_dict, int8_model_to_dict
from qatcore.quantization.qat.parity import ParityReport, parity_report
from qatcore.quantization.qparams import QParams
from qatcore.quantization.qscheme import QScheme

__all__ = [
    "QuantDType", "INT8", "INT8_NARROW", "UINT8", "INT4", "INT4_NARROW", "UINT4", "QScheme", "QParams",
    "QuantSpec", "QuantizationConfig", "QuantMode", "fake_quantize", "fake_quantize_learnable", "FakeQuantize",
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver", "HistogramObserver", "MSEObserver", "make_observer",
    "ObserverError", "IQATPreparer", "QATPreparer", "LayerwiseConfig", "LayerOverride", "QATSchedule",
    "convert_to_quantized", "parity_report", "ParityReport", "int8_model_to_dict", "int8_model_from_dict",
    "save_qat_checkpoint", "load_qat_checkpoint", "CheckpointError", "save_int8_model", "load_int8_model",
]
