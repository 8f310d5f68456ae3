"""Reference models used by the tests, the benchmarks and the command line.

Each model's module is imported on first use (``qatcore.models.MobileNetV2``), not
when the package is.
"""

from qatcore.lazy_exports import lazy_exports

__all__ = ["MLP", "DigitsCNN", "SmallResNet", "BasicBlock", "CifarResNet", "cifar_resnet", "resnet20",
           "CIFAR_RESNET_DEPTHS", "MobileNetV2", "InvertedResidual", "MOBILENET_V2_CIFAR_STAGES", "TinyGPT"]

__getattr__, __dir__ = lazy_exports(__name__, names={
    "qatcore.models.cifar_resnets": ("CIFAR_RESNET_DEPTHS", "CifarResNet", "cifar_resnet", "resnet20"),
    "qatcore.models.digits_cnn": ("DigitsCNN",),
    "qatcore.models.mlp": ("MLP",),
    "qatcore.models.mobilenet_v2": ("MOBILENET_V2_CIFAR_STAGES", "InvertedResidual", "MobileNetV2"),
    "qatcore.models.resnet": ("BasicBlock", "SmallResNet"),
    "qatcore.models.tiny_gpt": ("TinyGPT",),
})
