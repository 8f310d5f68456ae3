"""Loss layers over :mod:`qatcore.nn.functional`."""

from __future__ import annotations

from qatcore.nn import functional as F
from qatcore.nn.module import Module

__all__ = ["CrossEntropyLoss", "MSELoss"]


class CrossEntropyLoss(Module):
    """Softmax cross-entropy with integer targets (see F.cross_entropy)."""

    def __init__(self, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.reduction, self.label_smoothing = reduction, label_smoothing

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, self.reduction, self.label_smoothing)


class MSELoss(Module):
    """Mean squared error (see F.mse_loss)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, prediction, target):
        return F.mse_loss(prediction, target, self.reduction)
