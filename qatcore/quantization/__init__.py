"""Quantization: integer types, schemes, parameters, configuration, observers and
fake quantization.

The QAT engine (preparer, lifecycle, conversion, parity, checkpoints) builds on
this package and lives in :mod:`qatcore.quantization.qat`; importing this package
does not import it. The engine's names that used to be re-exported here
(``qatcore.quantization.QATPreparer``, ...) still resolve, importing the engine on
first use; new code imports them from :mod:`qatcore.quantization.qat`.
"""

from qatcore.errors import CheckpointError, ObserverError
from qatcore.lazy_exports import lazy_exports
from qatcore.quantization.config import (
    Learnable,
    ObserverKind,
    QuantizationConfig,
    QuantMode,
    QuantSpec,
    Requantization,
)
from qatcore.quantization.dtypes import INT4, INT4_NARROW, INT8, INT8_NARROW, UINT4, UINT8, QuantDType
from qatcore.quantization.fake_quantize import fake_quantize, fake_quantize_learnable
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.group_token_fake_quantize import (
    fake_quantize_per_group,
    fake_quantize_per_token,
    fake_quantize_ternary,
)
from qatcore.quantization.histogram_observer import HistogramObserver
from qatcore.quantization.mse_observer import MSEObserver
from qatcore.quantization.observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    Observer,
    PerChannelMinMaxObserver,
)
from qatcore.quantization.observer_factory import make_observer
from qatcore.quantization.qparams import QParams
from qatcore.quantization.qscheme import QScheme

__all__ = [
    "QuantDType", "INT8", "INT8_NARROW", "UINT8", "INT4", "INT4_NARROW", "UINT4", "QScheme", "QParams",
    "QuantSpec", "QuantizationConfig", "QuantMode", "ObserverKind", "Learnable", "Requantization", "fake_quantize",
    "fake_quantize_learnable", "fake_quantize_per_group", "fake_quantize_per_token", "fake_quantize_ternary",
    "FakeQuantize",
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver", "HistogramObserver", "MSEObserver", "make_observer",
    "ObserverError", "CheckpointError",
]

# Compatibility: the QAT engine's names, imported from qatcore.quantization.qat on first use.
__getattr__, __dir__ = lazy_exports(__name__, submodules=("qat",), names={"qatcore.quantization.qat": (
    "IQATPreparer", "QATPreparer", "LayerwiseConfig", "LayerOverride", "QATSchedule", "convert_to_quantized",
    "parity_report", "ParityReport", "int8_model_to_dict", "int8_model_from_dict", "save_qat_checkpoint",
    "load_qat_checkpoint", "save_int8_model", "load_int8_model",
)})
