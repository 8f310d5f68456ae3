"""Shape-only layers: Flatten and Identity."""

from __future__ import annotations

from qatcore.nn import functional as F
from qatcore.nn.module import Module

__all__ = ["Flatten", "Identity"]


class Flatten(Module):
    """Merge axes start_dim..end_dim (default: everything but the batch axis)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return F.flatten(x, self.start_dim, self.end_dim)


class Identity(Module):
    """Returns its input (a placeholder where a layer was removed, e.g. a folded BatchNorm)."""

    def forward(self, x):
        return x
