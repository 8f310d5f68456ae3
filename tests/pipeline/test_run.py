"""The whole run from Python: the folder it writes, silence unless asked, a stop in either
training stage and a resume that reaches the uninterrupted result; the epoch loop and the
Ctrl-C stop request."""

import importlib.util
import json
import os
import re
import signal

import numpy as np
import pytest

from qatcore.errors import ConfigError, RunInterrupted
from qatcore.pipeline import RunSettings, format_report, format_summary, resume_pipeline, run_pipeline
from qatcore.pipeline.training_loop import stop_on_sigint
from qatcore.quantization.qat.checkpointing import read_qat_checkpoint

TIMINGS = ("wall_time_s", "float_inference_ms", "int8_inference_ms")
STEPS_PER_EPOCH = 23  # the digits' 1438 training images in batches of 64


def _small(folder, **changes):
    return RunSettings(**{"model": "mlp", "epochs": 2, "qat_epochs": 2, "output": folder, **changes})


def _record(result):
    return {key: value for key, value in result.to_dict().items() if key not in TIMINGS + ("output",)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted small run: (its result, its folder)."""
    folder = tmp_path_factory.mktemp("straight")
    return run_pipeline(_small(folder)), folder


def test_run_writes_the_folder_and_prints_nothing(tmp_path, capsys):
    lines = []
    result = run_pipeline(_small(tmp_path / "run", qat_epochs=1), on_progress=lines.append)
    assert capsys.readouterr() == ("", "")
    folder = tmp_path / "run"
    plots = importlib.util.find_spec("matplotlib") is not None  # the plot is drawn when it can be
    assert sorted(path.name for path in folder.iterdir()) == sorted([
        "float.qat", "model.int8", "qat.ckpt", "report.md", "result.json", "statistics.json", "statistics.qat",
        *(["statistics.png"] if plots else [])])
    assert json.loads((folder / "result.json").read_text()) == result.to_dict()
    assert (folder / "report.md").read_text() == format_report(result)
    assert format_summary(result) in format_report(result) and "int8 vs QAT outputs" in format_summary(result)
    record = result.to_dict()
    assert list(record)[:2] == ["command", "model"] and "int8_model" not in record
    assert record["output"] == str(folder) and record["dataset"] == "digits" and record["plots"] == plots
    assert result.int8_model_bytes < result.float_model_bytes and result.parity_max_lsb <= 1
    assert result.parity.output.max_lsb == result.parity_max_lsb
    # a line per step, per finished epoch, before calibration and before conversion
    assert len(lines) == 3 * STEPS_PER_EPOCH + 3 + 2 and lines[-1] == "converting and evaluating"
    assert re.fullmatch(r"float epoch 1/2  loss \d\.\d{4}  train accuracy \d+\.\d\d%  \d+\.\d s",
                        lines[STEPS_PER_EPOCH])
    assert lines[STEPS_PER_EPOCH + 1].startswith("float epoch 2/2  batch 1/23  loss ")
    assert lines[2 * STEPS_PER_EPOCH + 2] == "calibrating (post-training quantization)"
    assert lines[2 * STEPS_PER_EPOCH + 3].startswith("QAT epoch 1/1  batch 1/23  loss ")
    assert lines[-2].startswith("QAT epoch 1/1  loss ")
    assert read_qat_checkpoint(folder / "qat.ckpt")["extra"]["run_args"] == _small(folder, qat_epochs=1).to_dict()


def test_run_leaves_the_sigint_handler_as_it_was(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    run_pipeline(_small(tmp_path / "run", epochs=1, qat_epochs=1))
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("stop_after_steps, stage", [
    (STEPS_PER_EPOCH + 5, "float"),           # in the second float epoch
    (2 * STEPS_PER_EPOCH + 7, "qat"),         # in the first QAT epoch
    (3 * STEPS_PER_EPOCH + 7, "qat"),         # in the second: the schedule has moved the learning rate
])
def test_stop_and_resume_reach_the_uninterrupted_result(tmp_path, straight, stop_after_steps, stage):
    steps = []
    folder = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted) as interrupted:
        run_pipeline(_small(folder), on_progress=steps.append, should_stop=lambda: len(steps) >= stop_after_steps)
    assert interrupted.value.folder == folder and "resume_pipeline" in str(interrupted.value)
    assert len(steps) == stop_after_steps and (folder / "resume.ckpt").is_file()
    assert (folder / "float.qat").is_file() == (stage == "qat")
    resumed = resume_pipeline(folder)
    expected, straight_folder = straight
    assert _record(resumed) == _record(expected)
    assert resumed.output == str(folder) and not (folder / "resume.ckpt").exists()
    state, expected_state = (read_qat_checkpoint(f / "qat.ckpt")["model"] for f in (folder, straight_folder))
    for key in expected_state:
        np.testing.assert_array_equal(state[key], expected_state[key], err_msg=key)


def test_resume_needs_an_interrupted_run(tmp_path):
    with pytest.raises(ConfigError, match="no resume.ckpt there"):
        resume_pipeline(tmp_path)
    (tmp_path / "resume.ckpt").write_bytes(b"")
    with pytest.raises(Exception, match="resume.ckpt"):
        resume_pipeline(tmp_path)


def test_unusable_input_creates_no_folder(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(ConfigError, match="does not exist"):
        run_pipeline(_small(folder, config=tmp_path / "missing.json"))
    assert not folder.exists()


def test_ctrl_c_becomes_a_stop_request():
    with stop_on_sigint() as should_stop:
        assert not should_stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert should_stop()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


class _Crash(Exception):
    """Stands for a crash: not a stop request, nothing saved on the way out."""


@pytest.mark.parametrize("crash_in_epoch_line, stage", [(2, "float"), (4, "qat")])
def test_a_crash_loses_at_most_the_epoch_in_progress(tmp_path, straight, crash_in_epoch_line, stage):
    """The run saves resume.ckpt after every epoch: a crash in the middle of the next one (an
    exception out of the progress callback) leaves the last epoch's, and resuming from it
    reaches the uninterrupted result."""
    folder = tmp_path / "crashed"
    epochs, steps = [], []

    def progress(line):
        steps.append(line)
        if len(epochs) == crash_in_epoch_line - 1 and len(steps) > 5 + len(epochs) * STEPS_PER_EPOCH:
            raise _Crash()

    with pytest.raises(_Crash):
        run_pipeline(_small(folder), on_progress=progress, on_epoch=epochs.append)
    assert (folder / "resume.ckpt").is_file() and (folder / "float.qat").is_file() == (stage == "qat")
    resumed = resume_pipeline(folder)
    assert _record(resumed) == _record(straight[0]) and not (folder / "resume.ckpt").exists()
