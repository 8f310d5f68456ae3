"""The CIFAR ResNets of He et al. 2016 (ResNet-20, -32, -44, -56) for 32x32 inputs.

"Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2: a 3x3
stem convolution with 16 filters, then three stages of ``n`` BasicBlocks (two
3x3 convolutions each) at widths 16, 32 and 64 on feature maps of 32x32, 16x16
and 8x8, global average pooling and a fully connected layer: ``6n + 2`` weighted
layers in all.

===========  ==================  ==================  =====================
stage        output (32x32 in)   blocks              first block
===========  ==================  ==================  =====================
stem         16 x 32 x 32        conv3x3-bn-relu     stride 1
layer1       16 x 32 x 32        n x BasicBlock(16)  stride 1
layer2       32 x 16 x 16        n x BasicBlock(32)  stride 2, 1x1 shortcut
layer3       64 x 8 x 8          n x BasicBlock(64)  stride 2, 1x1 shortcut
pool, fc     num_classes         global avg pool     Linear(64, num_classes)
===========  ==================  ==================  =====================

Where a stage starts with a stride-2 block and the width doubles, the shortcut is
a 1x1 convolution with stride 2 followed by BatchNorm (the paper's option B, as in
most PyTorch CIFAR ResNet code); the paper's CIFAR experiments used option A
(identity with zero padding), which has no weights. With option B ResNet-20 has
272,474 parameters (269,722 with option A, the paper's "0.27M"). The layers keep
their default initialisation (PyTorch's), not the paper's He-normal one.
"""

from __future__ import annotations

import numbers

import numpy as np

from qatcore.errors import ConfigError
from qatcore.models.resnet import BasicBlock
from qatcore.nn import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, Module, ReLU, Sequential

__all__ = ["CifarResNet", "cifar_resnet", "resnet20", "CIFAR_RESNET_DEPTHS"]

# The depths of the paper's CIFAR table that qatcore builds: depth = 6n + 2.
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56)

_STAGE_WIDTHS = (16, 32, 64)


class CifarResNet(Module):
    """A CIFAR ResNet with ``blocks_per_stage`` (n) BasicBlocks in each of its three
    stages, ``6n + 2`` layers deep (module docstring); ``cifar_resnet(depth)`` builds
    the paper's depths.

    ReLU follows each residual add (``BasicBlock``). Every layer draws its weights
    from ``rng`` (default ``np.random.default_rng(0)``), in the order of the layers,
    so two constructions with equal generators are identical.

    >>> import numpy as np
    >>> model = CifarResNet(blocks_per_stage=1)
    >>> model(np.zeros((2, 3, 32, 32), dtype=np.float32)).shape
    (2, 10)
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        if (isinstance(blocks_per_stage, bool) or not isinstance(blocks_per_stage, numbers.Integral)
                or blocks_per_stage < 1):
            raise ConfigError(f"CifarResNet: blocks_per_stage must be a positive integer, got {blocks_per_stage!r}")
        rng = np.random.default_rng(0) if rng is None else rng
        self.conv1 = Conv2d(in_channels, _STAGE_WIDTHS[0], 3, padding=1, bias=False, rng=rng)
        self.bn1 = BatchNorm2d(_STAGE_WIDTHS[0])
        self.relu = ReLU()
        width = _STAGE_WIDTHS[0]
        stages = []
        for index, stage_width in enumerate(_STAGE_WIDTHS):
            first_stride = 1 if index == 0 else 2
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(width, stage_width, stride=first_stride if block == 0 else 1, rng=rng))
                width = stage_width
            stages.append(Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = AdaptiveAvgPool2d(1)
        self.flatten = Flatten()
        self.fc = Linear(width, num_classes, rng=rng)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3,
                 rng: np.random.Generator | None = None) -> CifarResNet:
    """He et al.'s CIFAR ResNet-``depth``: ``CifarResNet((depth - 2) // 6, ...)``.

    Args:
        depth: 20, 32, 44 or 56 (``CIFAR_RESNET_DEPTHS``); n = (depth - 2) / 6 blocks a stage.
        num_classes: outputs of the final Linear layer.
        in_channels: channels of the input images (3 for RGB).
        rng: the generator every layer draws from (default ``np.random.default_rng(0)``).

    Raises:
        ConfigError: ``depth`` is not one of ``CIFAR_RESNET_DEPTHS``.

    >>> sum(p.data.size for p in cifar_resnet(20).parameters())
    272474
    """
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth not in CIFAR_RESNET_DEPTHS:
        raise ConfigError(f"cifar_resnet: depth must be one of {list(CIFAR_RESNET_DEPTHS)} (6n + 2), got {depth!r}")
    return CifarResNet((int(depth) - 2) // 6, num_classes=num_classes, in_channels=in_channels, rng=rng)


def resnet20(num_classes: int = 10, in_channels: int = 3, rng: np.random.Generator | None = None) -> CifarResNet:
    """ResNet-20 (``cifar_resnet(20, ...)``): 3 BasicBlocks a stage, 272,474 parameters
    with 10 classes and 3 input channels.

    >>> import numpy as np
    >>> resnet20()(np.zeros((1, 3, 32, 32), dtype=np.float32)).shape
    (1, 10)
    """
    return cifar_resnet(20, num_classes=num_classes, in_channels=in_channels, rng=rng)
