"""Reference models used by the tests, the benchmarks and the command line."""

from qatcore.models.digits_cnn import DigitsCNN
from qatcore.models.mlp import MLP
from qatcore.models.resnet import BasicBlock, SmallResNet

__all__ = ["MLP", "DigitsCNN", "SmallResNet", "BasicBlock"]
