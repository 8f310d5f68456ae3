import json
import subprocess
import sys

import pytest

from qatcore.cli import main


def test_run_json_on_small_setting(capsys):
    assert main(["run", "--model", "mlp", "--epochs", "2", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert result["model"] == "mlp" and result["epochs"] == 2
    assert 0.5 < result["float_accuracy"] <= 1.0
    assert result["train_samples"] + result["test_samples"] == 1797


def test_run_is_deterministic(capsys):
    main(["run", "--model", "mlp", "--epochs", "1", "--quiet"])
    first = capsys.readouterr().out
    main(["run", "--model", "mlp", "--epochs", "1", "--quiet"])
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("argv", [["run", "--model", "vgg"], ["run", "--epochs", "0"], ["fly"], []])
def test_bad_usage_exits_2(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "qatcore", "run", "--model", "mlp", "--epochs", "1", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert 0.0 < float(proc.stdout.strip()) <= 1.0
    assert proc.stderr == ""  # no progress display when stderr is not a terminal
