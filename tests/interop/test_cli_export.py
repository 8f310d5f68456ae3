"""``qatcore export``: a run folder, an int8 model file or a QAT checkpoint to ONNX."""

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from qatcore.cli import main  # noqa: E402
from qatcore.data import load_digits  # noqa: E402
from qatcore.pipeline import RunSettings  # noqa: E402
from qatcore.quantization.qat import QATPreparer, load_int8_model, save_qat_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert main(["run", "--model", "mlp", "--epochs", "2", "--qat-epochs", "1", "--output", str(folder),
                 "--quiet"]) == 0
    return folder


def test_export_a_run_folder_in_both_forms(run_folder, tmp_path, capsys, run_onnxruntime):
    x = load_digits()[2][:64]
    int8_model = load_int8_model(run_folder / "model.int8")
    for form in ("qdq", "qoperator"):
        path = tmp_path / f"{form}.onnx"
        assert main(["export", str(run_folder), "--format", form, "--output", str(path)]) == 0
        assert f"int8 model exported to {path} (ONNX, {form}" in capsys.readouterr().out
        assert np.mean(run_onnxruntime(path, x) == int8_model(x).data) >= 0.999


def test_export_the_qat_model_from_its_checkpoint(run_folder, tmp_path, capsys, run_onnxruntime):
    # the checkpoint knows its run was an MLP: no --model needed
    path = tmp_path / "qat.onnx"
    assert main(["export", str(run_folder / "qat.ckpt"), "--qat", "--output", str(path)]) == 0
    assert "QAT model exported" in capsys.readouterr().out
    import onnx

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Gemm"} <= ops
    assert run_onnxruntime(path, load_digits()[2][:8]).shape == (8, 10)
    # a QAT checkpoint without --qat exports the int8 model it converts to
    assert main(["export", str(run_folder / "qat.ckpt"), "--output", str(tmp_path / "int8.onnx")]) == 0
    assert "int8 model exported" in capsys.readouterr().out


@pytest.mark.parametrize("argv, reason", [
    (["float.qat"], "is a float checkpoint"),
    (["qat.ckpt", "--qat", "--format", "qoperator"], "--format qoperator is for int8 models"),
    (["absent.int8"], "does not exist"),
])
def test_export_bad_usage_exits_2_with_one_line(run_folder, argv, reason, tmp_path, capsys):
    argv = [str(run_folder / argv[0]), *argv[1:], "--output", str(tmp_path / "m.onnx")]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_export_a_cifar_model_with_its_3x32x32_input(tmp_path, capsys, run_onnxruntime):
    from qatcore.models import resnet20

    qat_model = QATPreparer().prepare_for_qat(resnet20())
    x = load_digits(image_size=32, channels=3)[2][:4]
    qat_model(x)  # the quantizers observe one batch
    save_qat_checkpoint(tmp_path / "qat.ckpt", qat_model, extra={"run_args": RunSettings(model="resnet20").to_dict()})
    path = tmp_path / "resnet20.onnx"
    assert main(["export", str(tmp_path / "qat.ckpt"), "--output", str(path)]) == 0  # the model from run_args
    assert "input (batch, 3, 32, 32)" in capsys.readouterr().out
    int8_model = QATPreparer().convert_to_quantized(qat_model)
    assert np.mean(run_onnxruntime(path, x) == int8_model(x).data) >= 0.999
