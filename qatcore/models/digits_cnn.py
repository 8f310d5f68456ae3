"""The reference CNN for the 8x8 digits."""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn import BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU

__all__ = ["DigitsCNN"]


class DigitsCNN(Module):
    """conv3x3(in_channels->c1)-bn-relu, maxpool 2, conv3x3(c1->c2)-bn-relu, maxpool 2, linear.

    Input (N, in_channels, 8, 8) -> (N, c1, 4, 4) -> (N, c2, 2, 2) -> logits (N, num_classes);
    ``image_size=28`` fits MNIST (the linear layer then takes c2 * 7 * 7 features).
    Weights are drawn from ``rng`` (default: seed 0, so the model is reproducible).

    >>> import numpy as np
    >>> DigitsCNN()(np.zeros((3, 1, 8, 8), dtype=np.float32)).shape
    (3, 10)
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), num_classes: int = 10,
                 rng: np.random.Generator | None = None, image_size: int = 8, in_channels: int = 1) -> None:
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        c1, c2 = channels
        self.conv1 = Conv2d(in_channels, c1, 3, padding=1, bias=False, rng=rng)
        self.bn1 = BatchNorm2d(c1)
        self.relu1 = ReLU()
        self.pool1 = MaxPool2d(2)
        self.conv2 = Conv2d(c1, c2, 3, padding=1, bias=False, rng=rng)
        self.bn2 = BatchNorm2d(c2)
        self.relu2 = ReLU()
        self.pool2 = MaxPool2d(2)
        self.flatten = Flatten()
        side = image_size // 4  # two 2x2 max pools
        if side < 1:
            raise ConfigError(f"DigitsCNN: image_size must be at least 4, got {image_size}")
        self.fc = Linear(c2 * side * side, num_classes, rng=rng)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc(self.flatten(x))
