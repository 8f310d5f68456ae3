"""The command line: the main job end to end, interruption and resume, exit codes."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qatcore.cli import build_parser, main, run_settings
from qatcore.pipeline import RunSettings
from qatcore.quantization.qat.checkpointing import read_qat_checkpoint

SMALL = ["--model", "mlp", "--epochs", "2", "--qat-epochs", "1"]


def test_run_options_are_the_pipeline_settings():
    assert run_settings(build_parser().parse_args(["run"])) == RunSettings()  # the same defaults
    args = build_parser().parse_args(["run", "--model", "mlp", "--qat-epochs", "5", "--output", "x", "--json"])
    assert run_settings(args) == RunSettings(model="mlp", qat_epochs=5, output="x")


def test_run_json_and_files(tmp_path, capsys):
    assert main(["run", *SMALL, "--output", str(tmp_path / "run"), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["model"] == "mlp" and result["dataset"] == "digits"
    for key in ("float_accuracy", "qat_accuracy", "int8_accuracy"):
        assert 0.5 < result[key] <= 1.0
    assert result["int8_model_bytes"] < result["float_model_bytes"]
    assert result["parity_exact"] >= 0.999 and result["parity_max_lsb"] <= 1
    folder = tmp_path / "run"
    for name in ("float.qat", "qat.ckpt", "model.int8", "statistics.json", "statistics.qat", "report.md",
                 "result.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "result.json").read_text())["int8_accuracy"] == result["int8_accuracy"]
    assert "int8 vs QAT outputs" in (folder / "report.md").read_text()
    assert not (folder / "resume.ckpt").exists()


def test_stats_and_convert_commands(tmp_path, capsys):
    folder = tmp_path / "run"
    assert main(["run", *SMALL, "--output", str(folder), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["stats", str(folder / "qat.ckpt")]) == 0
    assert "layers.1.weight" in capsys.readouterr().out
    assert main(["stats", str(folder / "statistics.qat")]) == 0
    assert main(["convert", str(folder / "qat.ckpt"), "--model", "mlp", "--output", str(tmp_path / "m.int8")]) == 0
    assert (tmp_path / "m.int8").is_file()


def test_convert_builds_a_cifar_model_for_its_digits_shape(tmp_path, capsys):
    from qatcore.data import load_digits
    from qatcore.models import resnet20
    from qatcore.quantization.qat import QATPreparer, load_int8_model, save_qat_checkpoint

    qat_model = QATPreparer().prepare_for_qat(resnet20())
    x = load_digits(image_size=32, channels=3)[2][:2]
    qat_model(x)  # the quantizers observe one batch
    save_qat_checkpoint(tmp_path / "qat.ckpt", qat_model, extra={"run_args": RunSettings(model="resnet20").to_dict()})
    output = tmp_path / "m.int8"
    assert main(["convert", str(tmp_path / "qat.ckpt"), "--model", "resnet20", "--output", str(output)]) == 0
    assert load_int8_model(output)(x).shape == (2, 10)  # 3 x 32 x 32 inputs


@pytest.mark.parametrize("argv, reason", [
    (["run", "--model", "vgg"], "invalid choice"),
    (["run", "--config", "/nonexistent/config.json"], "does not exist"),
    (["run", "--mnist", "/nonexistent/folder"], "/nonexistent/folder"),
    (["run", "--bits", "12"], "--bits"),
    (["stats", "/nonexistent/file"], "does not exist"),
    (["fly"], "invalid choice"),
])
def test_bad_usage_exits_2_with_one_line(argv, reason, capsys, tmp_path):
    assert main(argv + (["--output", str(tmp_path / "x")] if argv[0] == "run" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err
    assert "Traceback" not in err


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    ('{"overrides": [{"match": "nothing.here", "enabled": false}]}', "matches no layer"),
    ('{"global": {"weight": {"bits": 99}}}', "bits"),
])
def test_bad_config_files_exit_2(tmp_path, capsys, content, reason):
    config = tmp_path / "config.json"
    config.write_text(content)
    assert main(["run", *SMALL, "--config", str(config), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and len(err.splitlines()) == 1


def test_toml_config_with_overrides(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text('[[overrides]]\nmatch = "layers.5"\nenabled = false\n')
    assert main(["run", *SMALL, "--config", str(config), "--output", str(tmp_path / "r"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["int8_accuracy"] > 0.5


def _model_state(folder):
    return read_qat_checkpoint(folder / "qat.ckpt")["model"]


def test_interrupt_and_resume_reach_the_same_result(tmp_path):
    base = [sys.executable, "-m", "qatcore", "run", "--model", "cnn", "--epochs", "6", "--qat-epochs", "2",
            "--json"]
    straight = subprocess.run(base + ["--output", str(tmp_path / "straight")], capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr
    folder = tmp_path / "interrupted"
    process = subprocess.Popen(base + ["--output", str(folder), "--progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    seen = b""
    deadline = time.time() + 300
    while b"float epoch 3/6" not in seen and time.time() < deadline:
        chunk = process.stderr.read1(4096)
        if not chunk:
            break
        seen += chunk
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, (seen + err).decode()[-500:]
    assert b"--resume" in err and (folder / "resume.ckpt").is_file()
    resumed = subprocess.run([sys.executable, "-m", "qatcore", "run", "--resume", str(folder), "--json"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(straight.stdout), json.loads(resumed.stdout)
    for key in ("float_accuracy", "qat_accuracy", "int8_accuracy", "int8_model_bytes", "parity_exact"):
        assert a[key] == b[key], key
    state_a, state_b = _model_state(tmp_path / "straight"), _model_state(folder)
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)
    assert not (folder / "resume.ckpt").exists()


def test_console_entry_point_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qatcore", "run", *SMALL, "--quiet", "--output", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    label, accuracy = proc.stdout.strip().rsplit(" ", 1)
    assert label == "int8 accuracy" and 0.0 < float(accuracy) <= 1.0  # --quiet: one labelled line
    assert proc.stderr == ""  # no progress display when stderr is not a terminal


def _doc_configs():
    """Every TOML or JSON config block of the docs and the README, as (file, index, suffix, text)."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    found = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for i, (kind, text) in enumerate(re.findall(r"```(toml|json)\n(.*?)```", path.read_text(), re.S)):
            found.append((path.name, i, kind, text))
    return found


@pytest.mark.parametrize("source, index, kind, text", _doc_configs(),
                         ids=[f"{name}-{i}" for name, i, _, _ in _doc_configs()])
def test_every_config_in_the_docs_runs_to_the_end_through_the_cli(tmp_path, source, index, kind, text):
    if kind == "toml":
        pytest.importorskip("tomllib", reason="TOML configs need Python 3.11+")
    config = tmp_path / f"config.{kind}"
    config.write_text(text)
    folder = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "qatcore", "run", "--model", "cnn", "--epochs", "1",
                             "--qat-epochs", "1", "--config", str(config), "--output", str(folder), "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (folder / "model.int8").is_file() and json.loads(result.stdout)["int8_accuracy"] > 0.5


def test_a_config_that_cannot_convert_is_refused_before_training(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"global": {"activation": {"bits": 12}}}')
    folder = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "qatcore", "run", "--model", "cnn", "--epochs", "30",
                             "--config", str(config), "--output", str(folder)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "set activation.bits to 8" in line and "nothing was trained" in line
    assert not folder.exists()  # refused before the float stage, which writes its checkpoints there


def test_bits_is_recorded_with_its_scheme_and_a_4_bit_model_is_not_called_int8(tmp_path):
    folder = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "qatcore", "run", "--model", "cnn", "--epochs", "1",
                             "--qat-epochs", "1", "--bits", "4", "--output", str(folder)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    record = json.loads((folder / "result.json").read_text())
    assert (record["bits"], record["activation_bits"]) == (4, 8)
    assert record["scheme"] == "weights int4 per-channel symmetric, LSQ; activations uint8 per-tensor affine"
    assert "accuracy (float / QAT / integer)" in result.stdout and "/ int8)" not in result.stdout
    assert record["scheme"] in result.stdout


def test_a_config_file_records_its_own_bits(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"global": {"weight": {"bits": 6, "signed": true, "narrow_range": true, '
                      '"scheme": "per_channel_symmetric", "axis": 0, "observer": "minmax"}}}')
    folder = tmp_path / "run"
    assert main(["run", *SMALL, "--config", str(config), "--output", str(folder), "--quiet"]) == 0
    record = json.loads((folder / "result.json").read_text())
    assert (record["bits"], record["activation_bits"]) == (6, 8) and "int6" in record["scheme"]


def test_bits_with_a_config_file_is_refused_in_one_line_naming_the_field(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{}")
    folder = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "qatcore", "run", "--bits", "4", "--config", str(config),
                             "--output", str(folder)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and not folder.exists()
    assert len(result.stderr.strip().splitlines()) == 1 and '"weight": {"bits": 4}' in result.stderr
