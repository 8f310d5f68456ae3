"""The command line as a new user meets it, each command run in a subprocess as from a shell:
run folders accepted wherever a file from one is, models rebuilt from a checkpoint's run
settings, errors of one line naming the option that fixes them, outputs in the run folder,
a labelled --quiet line, a quiet exit into a closed pipe, --version, one-line usage errors,
one spelling of value names, no folder left by a failed check, report.md citing only files
of the repository."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qatcore
from qatcore.data import load_digits
from qatcore.models import DigitsCNN, SmallResNet
from qatcore.pipeline import RunSettings
from qatcore.quantization.qat import QATPreparer, load_int8_model, save_qat_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--model", "mlp", "--epochs", "1", "--qat-epochs", "1"]
HAS_ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def qatcore_command(*argv, cwd=None, **options):
    """``qatcore ARGV...`` as a user types it: the completed process, its output as text."""
    return subprocess.run([sys.executable, "-m", "qatcore", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, **options)


def one_line_error(process) -> str:
    """The error of a failed command: exit 2, one line on stderr, nothing on stdout, no traceback."""
    assert process.returncode == 2, (process.stdout, process.stderr)
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in process.stderr and "usage:" not in process.stderr, process.stderr
    assert process.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A small run's folder, made by `qatcore run`; tests that write copy it first."""
    folder = tmp_path_factory.mktemp("user") / "qatcore-run"
    process = qatcore_command("run", *SMALL, "--output", folder, "--quiet")
    assert process.returncode == 0, process.stderr
    return folder


@pytest.fixture()
def own_run(run_folder, tmp_path):
    """A copy of the run folder this test may write into."""
    return Path(shutil.copytree(run_folder, tmp_path / "qatcore-run"))


def resnet_checkpoint(folder: Path, image_size: int = 8, run_settings: RunSettings | None = None) -> Path:
    """A QAT checkpoint of the reference `resnet` (SmallResNet) in ``folder``, as `qatcore run
    --model resnet` saves it when ``run_settings`` are given (without training: fast)."""
    qat_model = QATPreparer().prepare_for_qat(SmallResNet())
    qat_model(load_digits(image_size=image_size)[2][:8])  # the quantizers observe one batch
    folder.mkdir(parents=True, exist_ok=True)
    extra = {"run_args": run_settings.to_dict()} if run_settings is not None else {}
    save_qat_checkpoint(folder / "qat.ckpt", qat_model, extra=extra)
    return folder / "qat.ckpt"


# ---- 1. a run folder wherever a file from one is; the model from the run settings ------------------
def test_stats_reads_a_run_folder_its_statistics_json_and_its_checkpoint(run_folder):
    summaries = {}
    for source in (run_folder, run_folder / "statistics.json", run_folder / "statistics.qat",
                   run_folder / "qat.ckpt"):
        process = qatcore_command("stats", source)
        assert process.returncode == 0, process.stderr
        summaries[source.name] = process.stdout
    assert "layers.1.weight" in summaries["qatcore-run"]
    assert len(set(summaries.values())) == 1, summaries  # the same statistics, however named


def test_convert_takes_a_run_folder_and_rebuilds_the_run_model_without_model_option(tmp_path):
    folder = tmp_path / "resnet-run"
    resnet_checkpoint(folder, run_settings=RunSettings(model="resnet", output=folder))
    process = qatcore_command("convert", folder)  # no --model: the run settings say resnet
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == f"int8 model written to {folder / 'model.int8'} (resnet, input (batch, 1, 8, 8))"
    assert load_int8_model(folder / "model.int8")(load_digits()[2][:4]).shape == (4, 10)


def test_convert_recognises_a_reference_model_in_a_checkpoint_without_run_settings(tmp_path):
    checkpoint = resnet_checkpoint(tmp_path / "mine")  # saved from Python: no run settings
    process = qatcore_command("convert", checkpoint)
    assert process.returncode == 0, process.stderr
    assert "(resnet, input (batch, 1, 8, 8))" in process.stdout


def test_a_checkpoint_of_another_model_names_the_model_option_in_one_line(tmp_path):
    checkpoint = resnet_checkpoint(tmp_path / "run", run_settings=RunSettings(model="resnet"))
    error = one_line_error(qatcore_command("convert", checkpoint, "--model", "cnn"))
    assert error == (f"qatcore: error: {checkpoint} is not a checkpoint of cnn: its tensors are those of resnet; "
                     f"pass --model resnet")
    assert not (tmp_path / "run" / "model.int8").exists()


def test_a_checkpoint_of_another_image_size_names_the_image_size_option(tmp_path):
    qat_model = QATPreparer().prepare_for_qat(DigitsCNN(image_size=16))
    qat_model(np.zeros((2, 1, 16, 16), dtype=np.float32))
    save_qat_checkpoint(tmp_path / "qat.ckpt", qat_model)
    error = one_line_error(qatcore_command("convert", tmp_path))  # taken as the digits' 8 x 8
    assert "pass --image-size" in error and "cnn" in error
    process = qatcore_command("convert", tmp_path, "--image-size", "16")
    assert process.returncode == 0, process.stderr


@pytest.mark.parametrize("command", ["stats", "convert", "export"])
def test_a_folder_that_is_not_a_run_says_how_to_make_or_finish_one(command, tmp_path):
    error = one_line_error(qatcore_command(command, tmp_path))
    assert error.endswith(f"(qatcore run --output {tmp_path} makes one)"), error
    (tmp_path / "resume.ckpt").write_bytes(b"")  # an interrupted run
    error = one_line_error(qatcore_command(command, tmp_path))
    assert error.endswith(f"finish it with qatcore run --resume {tmp_path}"), error


def test_a_float_checkpoint_says_which_file_to_give(run_folder):
    for command in ("stats", "convert"):
        error = one_line_error(qatcore_command(command, run_folder / "float.qat"))
        assert "float checkpoint" in error and "qat.ckpt" in error


# ---- 2. outputs in the run folder, --output overriding --------------------------------------------
def test_convert_writes_into_the_run_folder_not_the_current_folder(own_run, tmp_path):
    (own_run / "model.int8").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for source in (own_run, own_run / "qat.ckpt"):
        process = qatcore_command("convert", source, cwd=elsewhere)
        assert process.returncode == 0, process.stderr
        assert (own_run / "model.int8").is_file() and not list(elsewhere.iterdir())
        (own_run / "model.int8").unlink()
    process = qatcore_command("convert", own_run, "--output", tmp_path / "chosen.int8", cwd=elsewhere)
    assert process.returncode == 0 and (tmp_path / "chosen.int8").is_file()
    assert not (own_run / "model.int8").exists()


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra is not installed")
def test_export_writes_into_the_run_folder_not_the_current_folder(own_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for argv, name in ((["export", own_run], "model.onnx"), (["export", own_run / "qat.ckpt", "--qat"], "qat.onnx")):
        process = qatcore_command(*argv, cwd=elsewhere)
        assert process.returncode == 0, process.stderr
        assert process.stdout.split(" (ONNX")[0].endswith(f"exported to {own_run / name}")
        assert (own_run / name).is_file()
    assert not list(elsewhere.iterdir())
    process = qatcore_command("export", own_run, "--output", tmp_path / "chosen.onnx", cwd=elsewhere)
    assert process.returncode == 0 and (tmp_path / "chosen.onnx").is_file()


# ---- 3. the small things: --quiet, pipes, --version, usage errors, names, folders, citations -------
def test_quiet_prints_one_labelled_line(tmp_path):
    process = qatcore_command("run", *SMALL, "--output", tmp_path / "run", "--quiet")
    assert process.returncode == 0, process.stderr
    assert re.fullmatch(r"int8 accuracy [01]\.\d{4}\n", process.stdout), process.stdout


def test_a_closed_pipe_ends_the_command_quietly(run_folder):
    # `qatcore stats ... | head -1`: the reader has gone before the command writes
    process = subprocess.Popen([sys.executable, "-m", "qatcore", "stats", str(run_folder)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0 and err == b"", err.decode()


def test_version():
    process = qatcore_command("--version")
    assert process.returncode == 0 and process.stdout == f"qatcore {qatcore.__version__}\n"


@pytest.mark.parametrize("argv, reason", [
    ([], "the following arguments are required: command"),
    (["fly"], "invalid choice: 'fly'"),
    (["run", "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["run", "--model", "vgg"], "argument --model: invalid choice: 'vgg'"),
    (["run", "--colour"], "unrecognized arguments: --colour"),
    (["stats"], "the following arguments are required: path"),
    (["convert", "x", "--image-size", "big"], "argument --image-size: invalid"),
])
def test_every_usage_error_is_one_line(argv, reason, tmp_path):
    error = one_line_error(qatcore_command(*argv, cwd=tmp_path))
    assert reason in error and error.endswith("--help)"), error
    assert not list(tmp_path.iterdir())


def test_help_shows_the_usage():
    process = qatcore_command("run", "--help")
    assert process.returncode == 0 and process.stdout.startswith("usage: qatcore run")


def _table_names(report: str, heading: str) -> set[str]:
    """The first column of the text table under ``heading`` in report.md."""
    table = report.split(heading, 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    return {line.split()[0] for line in table.splitlines()[2:] if line and not line.startswith(("top-1", "last step"))}


def test_parity_and_statistics_tables_spell_value_names_alike(run_folder):
    report = (run_folder / "report.md").read_text()
    parity = _table_names(report, "## Parity, value by value")
    statistics = _table_names(report, "## Statistics at the end of training")
    assert "activation_fake_quant.x" in parity & statistics and "layers.1.output" in parity & statistics
    # besides the model output, only the flattened input (module layers.0, no quantizer of its own) is not
    # a quantizer of the statistics table
    assert parity - statistics == {"output", "layers.0"}, parity
    assert "_x " not in report and "(output)" not in report


def test_report_cites_only_files_of_the_repository(run_folder):
    report = (run_folder / "report.md").read_text()
    cited = re.findall(r"\b(?:docs|qatcore|tests|benchmarks)/[\w./-]+\.\w+", report)
    assert "docs/numerics.md" in cited
    for path in cited:
        assert (ROOT / path).is_file(), path
    section = re.search(r'docs/numerics\.md, "([^"]+)"', report).group(1)
    assert f"\n## {section}\n" in (ROOT / "docs" / "numerics.md").read_text()


@pytest.mark.parametrize("argv", [
    ["run", "--bits", "12"],
    ["run", "--config", "missing.json"],
    ["run", "--mnist", "missing-folder"],
    ["run", "--epochs", "0"],
    ["run", "--resume", "missing-run"],
])
def test_a_failed_check_leaves_no_folder(argv, tmp_path):
    one_line_error(qatcore_command(*argv, "--output", "new-run", cwd=tmp_path))
    assert not list(tmp_path.iterdir())


def test_a_failed_conversion_writes_no_file_and_no_folder(tmp_path):
    checkpoint = resnet_checkpoint(tmp_path / "run")
    one_line_error(qatcore_command("convert", checkpoint, "--model", "mlp", "--output", tmp_path / "new" / "m.int8"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["qat.ckpt"]


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra is not installed")
def test_export_of_a_lone_int8_file_of_another_input_names_the_options(tmp_path):
    from qatcore.models import resnet20
    from qatcore.quantization.qat import save_int8_model

    qat_model = QATPreparer().prepare_for_qat(resnet20())
    qat_model(load_digits(image_size=32, channels=3)[2][:4])
    save_int8_model(tmp_path / "r20.int8", QATPreparer().convert_to_quantized(qat_model))  # no run beside it
    error = one_line_error(qatcore_command("export", tmp_path / "r20.int8"))
    assert "does not take the cnn's 1 x 8 x 8 input" in error and error.endswith("pass --model or --image-size")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r20.int8"]
    process = qatcore_command("export", tmp_path / "r20.int8", "--model", "resnet20")
    assert process.returncode == 0 and (tmp_path / "model.onnx").is_file()
