"""Post-training quantization in a run: ``qatcore run --qat-epochs 0`` calibrates and
converts (DigitsCNN on the digits, ResNet-20 on a tiny MNIST folder), and every run reports
PTQ next to QAT; the run seeds qatcore's default generator."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

import qatcore
from qatcore.data import load_digits
from qatcore.errors import ConfigError
from qatcore.pipeline import RunSettings, format_summary, run_pipeline
from qatcore.pipeline.post_training import calibration_indices
from qatcore.random import DEFAULT_SEED


def _qatcore(*args, cwd):
    run = subprocess.run([sys.executable, "-m", "qatcore", *args], capture_output=True, text=True, timeout=300,
                         cwd=cwd)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _tiny_mnist(folder, train: int = 64, test: int = 32):
    """MNIST-format files holding a few digits, each 8x8 image scaled up to 24x24 and framed to 28x28."""
    x_train, y_train, x_test, y_test = load_digits()
    folder.mkdir()
    for stem, images, labels in (("train", x_train[:train], y_train[:train]), ("t10k", x_test[:test], y_test[:test])):
        big = np.pad(np.kron(images[:, 0], np.ones((3, 3), np.float32)), ((0, 0), (2, 2), (2, 2)))
        _write_idx(folder / f"{stem}-images-idx3-ubyte.gz", np.round(255 * big))
        _write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)
    return folder


def _check_ptq_run(record: dict, folder) -> None:
    assert record["qat_epochs"] == 0 and record["qat_accuracy"] is None
    assert 0.0 <= record["ptq_accuracy"] <= 1.0 and record["int8_accuracy"] == record["ptq_accuracy"]
    assert record["ptq_parity_passes"] is True and record["ptq_parity_exact"] == 1.0
    assert record["ptq_parity_max_lsb"] == 0.0 and record["parity_exact"] == 1.0
    for name in ("float.qat", "qat.ckpt", "model.int8", "result.json", "report.md"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "result.json").read_text()) == {**record, "output": record["output"]}


def test_qat_epochs_0_calibrates_and_converts_the_digits_cnn(tmp_path):
    record = json.loads(_qatcore("run", "--model", "cnn", "--epochs", "2", "--qat-epochs", "0", "--output", "run",
                                 "--json", cwd=tmp_path))
    _check_ptq_run(record, tmp_path / "run")
    assert record["calibration_samples"] == 1438 and record["ptq_accuracy"] > 0.85
    summary = _qatcore("run", "--model", "cnn", "--epochs", "2", "--qat-epochs", "0", "--output", "again",
                       cwd=tmp_path)
    assert "2 float + 0 QAT epochs" in summary
    assert f"accuracy (float / PTQ int8)               {100 * record['float_accuracy']:.2f}% / " \
           f"{100 * record['ptq_accuracy']:.2f}%" in summary
    assert "PTQ int8 vs calibrated model              100.000% exact, max 0 LSB, passes" in summary
    # the run's qat.ckpt is the calibrated model: convert gives the same int8 model's accuracy
    assert "int8 model written" in _qatcore("convert", "run/qat.ckpt", "--output", "again.int8", cwd=tmp_path)


def test_qat_epochs_0_on_resnet20_reports_ptq_accuracy_and_parity(tmp_path):
    mnist = _tiny_mnist(tmp_path / "mnist")
    record = json.loads(_qatcore("run", "--model", "resnet20", "--epochs", "1", "--qat-epochs", "0",
                                 "--mnist", str(mnist), "--batch-size", "32", "--output", "run", "--json",
                                 cwd=tmp_path))
    _check_ptq_run(record, tmp_path / "run")
    assert record["model"] == "resnet20" and record["dataset"] == "mnist" and record["calibration_samples"] == 64


def test_a_normal_run_reports_ptq_next_to_qat_and_seeds_the_default_generator(tmp_path):
    qatcore.manual_seed(DEFAULT_SEED)
    result = run_pipeline(RunSettings(model="mlp", epochs=2, qat_epochs=1, seed=3, output=tmp_path / "run"))
    assert qatcore.initial_seed() == 3
    qatcore.manual_seed(DEFAULT_SEED)
    assert result.qat_accuracy is not None and result.ptq_parity_passes
    assert result.ptq_parity.passes and result.ptq_int8_model is not result.int8_model
    summary = format_summary(result)
    assert f"accuracy without QAT (PTQ int8)           {100 * result.ptq_accuracy:.2f}%" in summary
    assert "int8 vs QAT outputs" in summary and "PTQ int8 vs calibrated model" in summary
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"## Post-training quantization parity, value by value\n\n```text\n{result.ptq_parity}\n```" in report


def test_qat_epochs_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="--qat-epochs must be a non-negative integer"):
        RunSettings(qat_epochs=-1)
    run = subprocess.run([sys.executable, "-m", "qatcore", "run", "--qat-epochs", "-1"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and "must be a non-negative integer" in run.stderr
    assert not (tmp_path / "qatcore-run").exists()


def test_calibration_images_are_spread_over_the_training_split():
    indices = calibration_indices(60000)
    assert len(indices) == 2048 and indices[0] == 0 and indices[-1] == 59999
    assert np.all(np.diff(indices) > 0)
