"""End-to-end: the reference models learn the digits (accuracy asserted, never time)."""

from qatcore.pipeline import RunSettings, train_float


def test_digits_cnn_reaches_97_percent():
    result = train_float(RunSettings(model="cnn", epochs=12, lr=0.05, batch_size=64, seed=0))
    assert result.accuracy >= 0.97, result


def test_small_resnet_learns():
    # A cosine schedule lets the BatchNorm running statistics settle before evaluation.
    result = train_float(RunSettings(model="resnet", epochs=4, lr=0.05, batch_size=64, seed=0))
    assert result.accuracy >= 0.93, result


def test_mlp_learns():
    result = train_float(RunSettings(model="mlp", epochs=6, lr=0.05, batch_size=64, seed=0))
    assert result.accuracy >= 0.9, result
