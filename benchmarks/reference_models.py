"""The DigitsCNN models the benchmark scripts time (run as scripts, so this folder is on
sys.path and ``from reference_models import ...`` finds this file)."""

from __future__ import annotations

__all__ = ["digits_cnn_float_qat_int8", "CIFAR_MODELS", "build_cifar", "cifar_qat_model"]


def digits_cnn_float_qat_int8():
    """(x_train, x_test, float DigitsCNN in eval, its QAT model in eval, the int8 model):
    seed-0 weights, the QAT model observed on four training batches, then converted.
    Speed does not depend on training, so nothing is trained."""
    from qatcore.data import load_digits
    from qatcore.models import DigitsCNN
    from qatcore.quantization.qat import QATPreparer

    x_train, _, x_test, _ = load_digits()
    model = DigitsCNN().eval()
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(DigitsCNN())
    for start in range(0, 256, 64):
        qat(x_train[start:start + 64])
    int8_model = preparer.convert_to_quantized(qat)
    return x_train, x_test, model, qat.eval(), int8_model


# the realistic networks of docs/benchmarks.md, built from seed-0 weights for 32x32x3 inputs
CIFAR_MODELS = ("resnet20", "resnet56", "mobilenetv2")


def build_cifar(name: str):
    """The qatcore network ``name`` (one of ``CIFAR_MODELS``) with seed-0 weights."""
    import numpy as np

    from qatcore import models

    rng = np.random.default_rng(0)
    if name == "resnet20":
        return models.resnet20(rng=rng)
    if name == "resnet56":
        return models.cifar_resnet(56, rng=rng)
    if name == "mobilenetv2":
        return models.MobileNetV2(rng=rng)
    raise ValueError(f"unknown model {name!r}; one of {CIFAR_MODELS}")


def cifar_qat_model(name: str, config, steps: int, batch: int = 64):
    """(preparer, QAT model in eval mode, float model in eval mode): ``name`` prepared with
    ``config``, observed on one batch of the 32x32x3 digits, then ``steps`` SGD steps (lr 0.01,
    momentum 0.9) on the next batches; steps=0 is the model at random init (observed only)."""
    from qatcore.autograd import no_grad
    from qatcore.data import load_digits
    from qatcore.nn import functional as F
    from qatcore.optim import SGD
    from qatcore.quantization.qat import QATPreparer

    x_train, y_train, _, _ = load_digits(image_size=32, channels=3)
    float_model = build_cifar(name).eval()
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(build_cifar(name), config)
    with no_grad():
        qat(x_train[:batch])
    optimizer = SGD(qat.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps):
        rows = slice(batch * (step + 1), batch * (step + 2))
        optimizer.zero_grad()
        F.cross_entropy(qat(x_train[rows]), y_train[rows]).backward()
        optimizer.step()
    return preparer, qat.eval(), float_model
