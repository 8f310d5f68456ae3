"""A small ResNet-style network: residual adds and global average pooling."""

from __future__ import annotations

import numpy as np

from qatcore.nn import (
    AdaptiveAvgPool2d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    Linear,
    Module,
    ReLU,
    Sequential,
)

__all__ = ["BasicBlock", "SmallResNet"]


class BasicBlock(Module):
    """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is a
    1x1 conv + bn when the stride or width changes, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, rng=rng)
        self.bn1 = BatchNorm2d(out_channels)
        self.relu1 = ReLU()
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False, rng=rng)
        self.bn2 = BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = Sequential(
                Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, rng=rng),
                BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = None
        self.relu2 = ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + identity)


class SmallResNet(Module):
    """stem conv-bn-relu, BasicBlock(w, w), BasicBlock(w, 2w, stride 2), global
    average pool, linear. Default width 16 for (N, 1, 8, 8) digits.

    >>> import numpy as np
    >>> SmallResNet()(np.zeros((2, 1, 8, 8), dtype=np.float32)).shape
    (2, 10)
    """

    def __init__(self, in_channels: int = 1, width: int = 16, num_classes: int = 10,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        self.conv1 = Conv2d(in_channels, width, 3, padding=1, bias=False, rng=rng)
        self.bn1 = BatchNorm2d(width)
        self.relu = ReLU()
        self.layer1 = BasicBlock(width, width, rng=rng)
        self.layer2 = BasicBlock(width, 2 * width, stride=2, rng=rng)
        self.pool = AdaptiveAvgPool2d(1)
        self.flatten = Flatten()
        self.fc = Linear(2 * width, num_classes, rng=rng)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.flatten(self.pool(x)))
