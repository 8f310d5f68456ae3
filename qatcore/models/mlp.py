"""A multilayer perceptron for flattened images."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qatcore.nn import Flatten, Linear, Module, ReLU, Sequential

__all__ = ["MLP"]


class MLP(Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear.

    The default fits the 8x8 digits: 64 inputs, hidden layers of 128 and 64, 10 classes.

    >>> import numpy as np
    >>> MLP()(np.zeros((2, 1, 8, 8), dtype=np.float32)).shape
    (2, 10)
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        layers: list[Module] = [Flatten()]
        width = in_features
        for h in hidden:
            layers += [Linear(width, h, rng=rng), ReLU()]
            width = h
        layers.append(Linear(width, num_classes, rng=rng))
        self.layers = Sequential(*layers)

    def forward(self, x):
        return self.layers(x)
