"""The QAT engine (spec sections 1-8): preparer, preparation, layer-wise config,
training integration, statistics, conversion to int8, parity and checkpoints.

It builds on :mod:`qatcore.quantization` (observers, FakeQuantize, configs) and
:mod:`qatcore.graph`; nothing below it imports it.
"""

from qatcore.quantization.qat.calibration import calibrate
from qatcore.quantization.qat.checkpointing import (
    LoadedCheckpoint,
    load_int8_model,
    load_qat_checkpoint,
    read_qat_checkpoint,
    save_int8_model,
    save_qat_checkpoint,
)
from qatcore.quantization.qat.conversion import convert_to_quantized
from qatcore.quantization.qat.eager_conversion import Int8Island
from qatcore.quantization.qat.int8_model import Int8Model, ValueSource
from qatcore.quantization.qat.int8_serialization import int8_model_from_dict, int8_model_to_dict
from qatcore.quantization.qat.interface import IQATPreparer
from qatcore.quantization.qat.layerwise_config import LayerOverride, LayerwiseConfig, ResolvedLayer
from qatcore.quantization.qat.operators.lowbit import LowBitEmbedding, LowBitLinear
from qatcore.quantization.qat.parity import ParityReport, parity_report
from qatcore.quantization.qat.preparer import QATPreparer
from qatcore.quantization.qat.qat_layers import QATConv2d, QATConvBn2d, QATLinear, QATLinearBn1d
from qatcore.quantization.qat.quantizer_parameters import learnable_quantizer_parameters
from qatcore.quantization.qat.statistics import QATStatistics, Series, StatisticsConfig
from qatcore.quantization.qat.training_integration import QATController, QATSchedule

__all__ = ["IQATPreparer", "QATPreparer", "LayerwiseConfig", "LayerOverride", "ResolvedLayer", "QATSchedule",
           "QATController", "QATLinear", "QATConv2d", "QATConvBn2d", "QATLinearBn1d", "QATStatistics",
           "StatisticsConfig", "Series",
           "calibrate", "convert_to_quantized", "parity_report", "ParityReport", "int8_model_to_dict",
           "int8_model_from_dict",
           "save_qat_checkpoint", "load_qat_checkpoint", "read_qat_checkpoint", "LoadedCheckpoint",
           "save_int8_model", "load_int8_model", "Int8Model", "ValueSource", "learnable_quantizer_parameters",
           "Int8Island", "LowBitLinear", "LowBitEmbedding"]
