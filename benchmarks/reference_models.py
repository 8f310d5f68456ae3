"""The DigitsCNN models the benchmark scripts time (run as scripts, so this folder is on
sys.path and ``from reference_models import ...`` finds this file)."""

from __future__ import annotations

__all__ = ["digits_cnn_float_qat_int8"]


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
