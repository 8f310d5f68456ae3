"""Dropout layer with its own explicit random generator."""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.nn.module import Module
from qatcore.random import generator_or_default, spawn_generator

__all__ = ["Dropout"]


class Dropout(Module):
    """In training, zero each element with probability p and scale the rest by
    1 / (1 - p); identity in eval. The mask is drawn from ``rng``, kept by the layer;
    without one the layer spawns its own generator from qatcore's default generator
    (:func:`qatcore.manual_seed` fixes it)."""

    def __init__(self, p: float = 0.5, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p
        self.rng = spawn_generator() if rng is None else generator_or_default(rng, "Dropout: rng")

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.rng)

    def extra_repr(self) -> str:
        return f"p={self.p}"
