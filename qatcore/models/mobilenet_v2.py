"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs: inverted residual blocks.

"MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018), Table 2, with
the strides of the usual CIFAR variant: the stem convolution and the first
24-channel stage keep stride 1 (both are stride 2 on ImageNet), so the network
downsamples 8x instead of 32x and a 32x32 input ends at 4x4, where ImageNet's
224x224 ends at 7x7. At ``width_mult=1.0``:

=======================  =====  ====  ==  ======  ===================
stage                    t      c     n   stride  output (32x32 in)
=======================  =====  ====  ==  ======  ===================
stem conv3x3-bn-relu6    -      32    1   1       32 x 32 x 32
inverted residual        1      16    1   1       16 x 32 x 32
inverted residual        6      24    2   1 (*)   24 x 32 x 32
inverted residual        6      32    3   2       32 x 16 x 16
inverted residual        6      64    4   2       64 x 8 x 8
inverted residual        6      96    3   1       96 x 8 x 8
inverted residual        6      160   3   2       160 x 4 x 4
inverted residual        6      320   1   1       320 x 4 x 4
head conv1x1-bn-relu6    -      1280  1   1       1280 x 4 x 4
global avg pool, linear  -      k     -   -       k
=======================  =====  ====  ==  ======  ===================

(t: expansion factor, c: output channels, n: blocks, stride: of the first block
of the stage, the others have stride 1; (*) and the stem: 2 on ImageNet.)

``width_mult`` scales every c but the head's and rounds it to a multiple of 8 (not
below 90% of the scaled value); the head keeps 1280 channels unless ``width_mult``
exceeds 1, as torchvision does. Parameters with 10 classes and 3 input channels:
2,236,682 at ``width_mult=1.0``, the default (torchvision's ``mobilenet_v2`` with 10
classes has the same number; only the strides differ), 700,490 at 0.5 and 250,922 at
0.25. The default is small enough for CPU tests on a few images. The classifier has
no dropout (torchvision's has dropout 0.2; the common CIFAR code has none).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, Module, ReLU6, Sequential

__all__ = ["InvertedResidual", "MobileNetV2", "MOBILENET_V2_CIFAR_STAGES"]

# (expansion t, output channels c, blocks n, stride of the first block s): Table 2 of the
# paper with the second stage's stride 2 -> 1 for 32x32 inputs (the stem's too, below).
MOBILENET_V2_CIFAR_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_CHANNEL_MULTIPLE = 8


def _scaled_channels(channels: float) -> int:
    """``channels`` rounded to the nearest multiple of 8, at least 8 and not below 90% of
    ``channels`` (torchvision's ``_make_divisible``)."""
    rounded = max(_CHANNEL_MULTIPLE, int(channels + _CHANNEL_MULTIPLE / 2) // _CHANNEL_MULTIPLE * _CHANNEL_MULTIPLE)
    return rounded + _CHANNEL_MULTIPLE if rounded < 0.9 * channels else rounded


class InvertedResidual(Module):
    """expand (1x1 conv-bn-relu6, to ``in_channels * expansion`` channels; left out when
    ``expansion`` is 1), depthwise (3x3 conv with one group per channel, ``stride``,
    bn-relu6), project (1x1 conv-bn, linear: no activation); the input is added to the
    result when ``stride`` is 1 and the channel counts match.

    >>> import numpy as np
    >>> block = InvertedResidual(16, 16, stride=1, expansion=6, rng=np.random.default_rng(0))
    >>> block.use_residual, block(np.zeros((2, 16, 8, 8), dtype=np.float32)).shape
    (True, (2, 16, 8, 8))
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        if expansion == 1:
            self.expand = None
        else:
            self.expand = Sequential(Conv2d(in_channels, hidden, 1, bias=False, rng=rng), BatchNorm2d(hidden),
                                     ReLU6())
        self.depthwise = Sequential(
            Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False, rng=rng),
            BatchNorm2d(hidden), ReLU6())
        self.project = Sequential(Conv2d(hidden, out_channels, 1, bias=False, rng=rng), BatchNorm2d(out_channels))

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        return x + out if self.use_residual else out


class MobileNetV2(Module):
    """MobileNetV2 for 32x32 inputs (the stage table in the module docstring).

    Args:
        num_classes: outputs of the final Linear layer.
        in_channels: channels of the input images (3 for RGB).
        width_mult: scales the channels of the stem and every stage (a positive number).
        rng: the generator every layer draws from, in the order of the layers
            (default ``np.random.default_rng(0)``), so equal generators give equal models.

    Raises:
        ConfigError: ``width_mult`` is not a positive finite number.

    >>> import numpy as np
    >>> model = MobileNetV2(width_mult=0.25)
    >>> model(np.zeros((2, 3, 32, 32), dtype=np.float32)).shape
    (2, 10)
    >>> sum(p.data.size for p in model.parameters())
    250922
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        if (isinstance(width_mult, bool) or not isinstance(width_mult, numbers.Real)
                or not math.isfinite(width_mult) or width_mult <= 0):
            raise ConfigError(f"MobileNetV2: width_mult must be a positive finite number, got {width_mult!r}")
        rng = np.random.default_rng(0) if rng is None else rng
        channels = _scaled_channels(_STEM_CHANNELS * width_mult)
        self.stem = Sequential(Conv2d(in_channels, channels, 3, padding=1, bias=False, rng=rng),
                               BatchNorm2d(channels), ReLU6())
        blocks = []
        for expansion, stage_channels, num_blocks, first_stride in MOBILENET_V2_CIFAR_STAGES:
            out_channels = _scaled_channels(stage_channels * width_mult)
            for index in range(num_blocks):
                blocks.append(InvertedResidual(channels, out_channels, first_stride if index == 0 else 1, expansion,
                                               rng=rng))
                channels = out_channels
        self.blocks = Sequential(*blocks)
        head_channels = _scaled_channels(_HEAD_CHANNELS * max(1.0, width_mult))
        self.head = Sequential(Conv2d(channels, head_channels, 1, bias=False, rng=rng), BatchNorm2d(head_channels),
                               ReLU6())
        self.pool = AdaptiveAvgPool2d(1)
        self.flatten = Flatten()
        self.fc = Linear(head_channels, num_classes, rng=rng)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.flatten(self.pool(x)))
