"""Progress a user sees: epoch lines (loss, training accuracy, time) kept on stderr by
``qatcore run --progress`` while the step line is rewritten in place."""

import re
import subprocess
import sys


def test_run_progress_keeps_a_line_per_epoch_on_stderr(tmp_path):
    run = subprocess.run([sys.executable, "-m", "qatcore", "run", "--model", "mlp", "--epochs", "2", "--qat-epochs",
                          "1", "--output", "run", "--progress"], capture_output=True, timeout=300, cwd=tmp_path)
    stderr = run.stderr.decode()  # bytes: text mode would turn each carriage return into a newline
    assert run.returncode == 0, stderr
    # what stays on the terminal: each line's text after its last carriage return and erase
    kept = [line.split("\r\x1b[K")[-1] for line in stderr.split("\n") if line]
    epoch_lines = [line for line in kept if re.fullmatch(
        r"(float|QAT) epoch \d/\d  loss \d+\.\d{4}  train accuracy \d+\.\d\d%  \d+\.\d s", line)]
    assert [line.split("  loss")[0] for line in epoch_lines] == ["float epoch 1/2", "float epoch 2/2",
                                                                  "QAT epoch 1/1"]
    assert "accuracy without QAT (PTQ int8)" in run.stdout.decode()
