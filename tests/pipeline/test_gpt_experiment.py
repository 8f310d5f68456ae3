"""The transformer experiment (``qatcore run --model gpt``): its stages, files, resume and options."""

from __future__ import annotations

import json
import math

import pytest

import qatcore
from qatcore.cli import build_parser, gpt_settings, main
from qatcore.errors import ConfigError
from qatcore.pipeline.gpt_experiment import SCHEMES, GPTSettings, format_gpt_summary, run_gpt_experiment

TINY = dict(steps=6, qat_steps=3, batch_size=4, block_size=16, n_layer=1, n_embd=32, n_head=2,
            validation_windows=16, warmup=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt")
    lines = []
    result = run_gpt_experiment(GPTSettings(output=out, **TINY), on_progress=lines.append)
    return out, result, lines


def test_the_experiment_reports_every_model_and_writes_its_folder(tiny_run):
    out, result, lines = tiny_run
    assert set(result.perplexity) == {"float", "ptq", "qat", "converted"}
    # the converted model (packed int4, integer kernels) computes the QAT model's eval exactly
    assert result.loss["converted"] == result.loss["qat"]
    for name, value in result.perplexity.items():
        assert value == pytest.approx(math.exp(result.loss[name]))
        assert 1.0 < value < 65.0  # even 6 steps beat the uniform guess over 65 characters (perplexity 65)
    lost = result.perplexity["ptq"] - result.perplexity["float"]
    if result.recovered is not None:
        assert result.recovered == pytest.approx((result.perplexity["ptq"] - result.perplexity["qat"]) / lost)
    assert result.loss["pretrained"] < math.log(65.0)
    assert result.validation_tokens == 16 * 16
    assert {p.name for p in out.iterdir()} >= {"float.qat", "qat.ckpt", "result.json", "report.md", "pretrained.qat",
                                               "gpt_settings.json", "statistics.json", "statistics.qat",
                                               "converted.int8"}
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(result.to_dict()))
    assert any(line.startswith("QAT fine-tuning: step 3/3") for line in lines)
    summary = format_gpt_summary(result)
    assert "PTQ" in summary and "QAT" in summary and "scheme 8da4w" in summary


def test_float_and_qat_fine_tune_from_the_same_snapshot(tiny_run):
    """The QAT model's float weights start where the float fine-tuning started: the snapshot."""
    out, result, _ = tiny_run
    snapshot = qatcore.load(out / "pretrained.qat")
    fine_tuned = qatcore.load(out / "float.qat")
    assert set(snapshot["model"]) == set(fine_tuned)
    assert any((snapshot["model"][k] != fine_tuned[k]).any() for k in fine_tuned)  # the float model moved on
    assert result.loss["pretrained"] > 0


def test_a_rerun_with_the_same_settings_skips_pretraining_and_gives_the_same_result(tiny_run):
    out, result, _ = tiny_run
    lines = []
    again = run_gpt_experiment(GPTSettings(output=out, **TINY), on_progress=lines.append)
    assert lines[0].startswith("pretraining: restored")
    assert again.loss == result.loss and again.perplexity == result.perplexity


def test_another_scheme_reuses_the_pretraining(tiny_run):
    out, result, _ = tiny_run
    lines = []
    other = run_gpt_experiment(GPTSettings(output=out, **{**TINY, "scheme": "4w", "qat_steps": 2}),
                               on_progress=lines.append)
    assert lines[0].startswith("pretraining: restored")
    assert other.loss["pretrained"] == result.loss["pretrained"]


def test_other_settings_do_not_reuse_the_snapshot(tmp_path, tiny_run):
    out, result, _ = tiny_run
    lines = []
    other = run_gpt_experiment(GPTSettings(output=out, **{**TINY, "seed": 1}), on_progress=lines.append)
    assert not lines[0].startswith("pretraining: restored")
    assert other.loss["pretrained"] != result.loss["pretrained"]


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "8da4w"])
def test_every_scheme_runs(scheme, tmp_path):
    result = run_gpt_experiment(GPTSettings(scheme=scheme, output=tmp_path, **{**TINY, "steps": 2, "qat_steps": 1,
                                                                               "validation_windows": 4}))
    assert result.scheme == scheme and all(math.isfinite(v) for v in result.loss.values())


@pytest.mark.parametrize("change, message", [
    (dict(scheme="int3"), "--scheme must be one of"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(n_embd=48, n_head=4), "multiple of 32"),
    (dict(n_embd=64, n_head=3), "multiple of n_head"),
    (dict(validation_windows=0), "validation_windows"),
])
def test_settings_are_validated(change, message):
    with pytest.raises(ConfigError, match=message):
        GPTSettings(**change)


def _args(*argv):
    args = build_parser().parse_args(["run", *argv])
    args.argv = ["run", *argv]
    return args


def test_cli_options_map_to_settings_with_the_gpt_defaults():
    settings = gpt_settings(_args("--model", "gpt", "--scheme", "2w", "--steps", "7", "--qat-steps", "3"))
    assert (settings.scheme, settings.steps, settings.qat_steps) == ("2w", 7, 3)
    assert settings.lr == GPTSettings().lr and settings.batch_size == GPTSettings().batch_size
    assert str(settings.output) == "qatcore-gpt-run"
    settings = gpt_settings(_args("--model", "gpt", "--lr=0.01", "--batch-size", "8", "--output", "x",
                                  "--qat-lr", "1e-4"))
    assert (settings.lr, settings.batch_size, str(settings.output), settings.qat_lr) == (0.01, 8, "x", 1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt", "--epochs", "3"], "--epochs: not an option of --model gpt"),
    (["--model", "gpt", "--bits", "4"], "--bits: not an option of --model gpt"),
    (["--model", "cnn", "--scheme", "4w"], "--scheme: options of --model gpt"),
    (["--model", "mlp", "--qat-steps", "4"], "--qat-steps: options of --model gpt"),
])
def test_cli_refuses_options_of_the_other_job(argv, message, capsys):
    assert main(["run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_qatcore_stats_reads_the_folder(tiny_run, capsys):
    out, _, _ = tiny_run
    assert main(["stats", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.fc_1.weight" in printed and "blocks.0.fc_1.input" in printed
