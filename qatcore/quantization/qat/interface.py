"""``IQATPreparer``: the QAT engine's interface (spec section 1).

Three operations make up the QAT workflow:

- ``prepare_for_qat(model, config)``: a model that simulates quantization while it
  trains (fake quantization), trained with the unchanged optimizer, loop and loss;
- ``convert_to_quantized(qat_model)``: the trained model as a true integer-only
  int8 model;
- ``get_qat_statistics(qat_model)``: what quantization did while it trained.
"""

from __future__ import annotations

import abc
from typing import Any

from qatcore.nn.module import Module

__all__ = ["IQATPreparer"]


class IQATPreparer(abc.ABC):
    """Abstract QAT engine; :class:`qatcore.quantization.qat.QATPreparer` implements it."""

    @abc.abstractmethod
    def prepare_for_qat(self, model: Module, config: Any = None) -> Module:
        """Return the QAT model for ``model`` under ``config`` (a QuantizationConfig or
        a LayerwiseConfig)."""

    @abc.abstractmethod
    def convert_to_quantized(self, qat_model: Module) -> Module:
        """Return the integer-only int8 model for a trained QAT model."""

    @abc.abstractmethod
    def get_qat_statistics(self, qat_model: Module) -> Any:
        """Return the statistics collected while ``qat_model`` trained."""
