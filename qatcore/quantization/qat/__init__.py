"""The QAT engine (spec sections 1-8): preparer, preparation, layer-wise config,
training integration; statistics, conversion and checkpointing build on these."""

from qatcore.quantization.qat.interface import IQATPreparer
from qatcore.quantization.qat.layerwise_config import LayerOverride, LayerwiseConfig, ResolvedLayer
from qatcore.quantization.qat.preparer import QATPreparer
from qatcore.quantization.qat.qat_layers import QATConv2d, QATConvBn2d, QATLinear
from qatcore.quantization.qat.statistics import QATStatistics, Series, StatisticsConfig
from qatcore.quantization.qat.training_integration import QATController, QATSchedule

__all__ = ["IQATPreparer", "QATPreparer", "LayerwiseConfig", "LayerOverride", "ResolvedLayer", "QATSchedule",
           "QATController", "QATLinear", "QATConv2d", "QATConvBn2d", "QATStatistics", "StatisticsConfig", "Series"]
