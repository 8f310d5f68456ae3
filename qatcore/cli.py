"""The ``qatcore`` command line: it parses options, calls the library and prints.

``qatcore run`` is the main job, ``qatcore.pipeline.run_pipeline``: train a reference
model in float on the embedded digits (8x8; 32x32x3 for resnet20 and mobilenetv2) or
MNIST IDX files you have, prepare it for QAT, fine-tune, convert to an integer-only
int8 model, evaluate all three, and write a run folder (float.qat, qat.ckpt,
model.int8, statistics.json and .qat, report.md, result.json; see
``qatcore.pipeline.run``). It prints the summary table, the result record as one
JSON line (``--json``) or the int8 accuracy (``--quiet``); progress goes to stderr
when that is a terminal (or with ``--progress``).

Ctrl-C stops at the end of the current training step and saves ``resume.ckpt`` in
the run folder; ``qatcore run --resume FOLDER`` continues to the same result an
uninterrupted run gives. ``qatcore stats``, ``qatcore convert``, ``qatcore export``
and ``qatcore bench`` inspect checkpoints, convert them, export runs and models to
ONNX (with the onnx extra) and run the benchmarks.

Exit codes a script can rely on: 0 success, 2 bad usage or bad input (one line on
stderr saying why, no traceback), 130 interrupted (resumable), 1 internal error.

>>> args = build_parser().parse_args(["run", "--model", "mlp", "--epochs", "3"])
>>> args.model, args.epochs, args.lr
('mlp', 3, 0.05)
>>> run_settings(args).qat_epochs
3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from qatcore.errors import ConfigError, QATCoreError, RunInterrupted
from qatcore.pipeline import (
    MODELS,
    RunSettings,
    format_summary,
    make_model,
    model_input,
    resume_pipeline,
    run_pipeline,
)

__all__ = ["main", "build_parser", "run_settings"]


class _ProgressLine:
    """Progress on stderr as one line rewritten in place; silent when off."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled = stream, enabled

    def update(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    def log(self, text: str) -> None:
        """A line that stays (an epoch's summary); the next update is written below it."""
        if self.enabled:
            self.stream.write("\r\033[K" + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ---- argument parsing ----------------------------------------------------------------------
DEFAULTS = RunSettings()  # the `qatcore run` defaults are the pipeline's


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qatcore",
                                     description="Quantization-aware training on a small autograd core.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="float training, QAT fine-tuning, int8 conversion and evaluation")
    run.add_argument("--model", choices=tuple(MODELS), default=DEFAULTS.model,
                     help=f"reference model (default: {DEFAULTS.model})")
    run.add_argument("--config", type=Path, help="layer-wise QAT config, JSON or TOML (see docs/getting_started.md)")
    run.add_argument("--bits", type=int, default=DEFAULTS.bits,
                     help=f"weight bits of the default config, 2-8 (default: {DEFAULTS.bits})")
    run.add_argument("--epochs", type=_positive_int, default=DEFAULTS.epochs,
                     help=f"float training epochs (default: {DEFAULTS.epochs})")
    run.add_argument("--qat-epochs", type=_non_negative_int, default=DEFAULTS.qat_epochs,
                     help=f"QAT fine-tuning epochs; 0: post-training quantization only (calibrate and convert) "
                          f"(default: {DEFAULTS.qat_epochs})")
    run.add_argument("--lr", type=_positive_float, default=DEFAULTS.lr,
                     help=f"SGD learning rate (default: {DEFAULTS.lr})")
    run.add_argument("--batch-size", type=_positive_int, default=DEFAULTS.batch_size,
                     help=f"batch size (default: {DEFAULTS.batch_size})")
    run.add_argument("--seed", type=int, default=DEFAULTS.seed,
                     help=f"seed of every random choice (default: {DEFAULTS.seed})")
    run.add_argument("--output", type=Path, default=DEFAULTS.output,
                     help=f"run folder (default: {DEFAULTS.output})")
    run.add_argument("--mnist", type=Path, help="a folder with MNIST IDX files to use instead of the digits")
    run.add_argument("--resume", type=Path, help="continue the interrupted run in this folder")
    run.add_argument("--json", action="store_true", help="print one JSON result object on stdout")
    run.add_argument("--quiet", action="store_true", help="print only the result")
    run.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a terminal")
    stats = sub.add_parser("stats", help="summarise the statistics in a QAT checkpoint or statistics file")
    stats.add_argument("path", type=Path)
    stats.add_argument("--plot", type=Path, help="also write the statistics plot to this PNG (needs matplotlib)")
    convert = sub.add_parser("convert", help="convert a QAT checkpoint to an int8 model file")
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("--model", choices=tuple(MODELS), default="cnn", help="the float model the checkpoint is of")
    convert.add_argument("--image-size", type=_positive_int,
                         help="input side, for the cnn and mlp (default: the run's: 28 for MNIST runs, else the "
                              "model's digits side)")
    convert.add_argument("--output", type=Path, default=Path("model.int8"))
    export = sub.add_parser("export", help="export a run, an int8 model or a QAT checkpoint to ONNX "
                                           "(needs the onnx extra)")
    export.add_argument("source", type=Path,
                        help="a run folder, an int8 model file (model.int8) or a QAT checkpoint (qat.ckpt)")
    export.add_argument("--output", type=Path, default=Path("model.onnx"), help="(default: model.onnx)")
    export.add_argument("--format", choices=("qdq", "qoperator"), default="qdq",
                        help="int8 operators as DequantizeLinear/op/QuantizeLinear (qdq, default) or "
                             "QLinearConv/QLinearMatMul (qoperator)")
    export.add_argument("--qat", action="store_true",
                        help="export the QAT model (float, with QDQ pairs) instead of the int8 model")
    export.add_argument("--model", choices=tuple(MODELS),
                        help="the float model a QAT checkpoint is of (default: the run's, else cnn)")
    export.add_argument("--image-size", type=_positive_int,
                        help="input side (default: the run's: 28 for MNIST runs, else the model's digits side, "
                             "8 or 32)")
    bench = sub.add_parser("bench", help="run the benchmark suite and write one JSON file")
    bench.add_argument("--output", type=Path, default=Path("benchmarks.json"))
    bench.add_argument("--quick", action="store_true", help="a smoke run with few repetitions")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# ---- the commands --------------------------------------------------------------------------------
def run_settings(args: argparse.Namespace) -> RunSettings:
    """The RunSettings of parsed ``qatcore run`` options (ConfigError names a bad option)."""
    return RunSettings(model=args.model, config=args.config, bits=args.bits, epochs=args.epochs,
                       qat_epochs=args.qat_epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                       output=args.output, mnist=args.mnist)


def _run(args) -> int:
    progress = _ProgressLine(sys.stderr, args.progress or (not args.quiet and not args.json and sys.stderr.isatty()))
    if args.resume is not None:  # the folder's saved settings, not the options, shape a resumed run
        result = resume_pipeline(args.resume, on_progress=progress.update, on_epoch=progress.log)
    else:
        result = run_pipeline(run_settings(args), on_progress=progress.update, on_epoch=progress.log)
    progress.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    elif args.quiet:
        print(f"{result.int8_accuracy:.4f}")
    else:
        print(format_summary(result))
    return 0


def _stats(args) -> int:
    from qatcore.quantization.qat import QATStatistics
    from qatcore.quantization.qat.checkpointing import read_qat_checkpoint

    if not args.path.is_file():
        raise ConfigError(f"{args.path} does not exist")
    try:
        statistics = QATStatistics.load(args.path)
    except QATCoreError:
        payload = read_qat_checkpoint(args.path)
        if payload["format"] == "float":
            raise ConfigError(f"{args.path} is a float checkpoint: it holds no QAT statistics") from None
        statistics = QATStatistics.from_dict(payload["statistics"])
    print(statistics.summary())
    if args.plot is not None:
        statistics.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _convert(args) -> int:
    from qatcore.quantization.qat import QATPreparer, save_int8_model

    if not args.checkpoint.is_file():
        raise ConfigError(f"{args.checkpoint} does not exist")
    channels, image_size = model_input(args.model, mnist=bool(_run_args(args.checkpoint).get("mnist")))
    float_model = make_model(args.model, np.random.default_rng(0), args.image_size or image_size, channels)
    qat_model, _ = QATPreparer.from_checkpoint(args.checkpoint, float_model)
    int8_model = QATPreparer().convert_to_quantized(qat_model)
    save_int8_model(args.output, int8_model)
    print(f"int8 model written to {args.output}")
    return 0


def _run_args(checkpoint: Path) -> dict:
    """The ``qatcore run`` settings saved in a QAT checkpoint, or {} (another file, or none saved)."""
    from qatcore.quantization.qat.checkpointing import read_qat_checkpoint

    if not checkpoint.is_file():
        return {}
    with contextlib.suppress(QATCoreError, KeyError, TypeError):
        return dict(read_qat_checkpoint(checkpoint)["extra"]["run_args"])
    return {}


def _export_source(args) -> tuple[Any, tuple[int, int]]:
    """The model to export and its input (channels, side): the run's (1 x 28 for MNIST runs, else
    the model's digits shape), --image-size replacing the side."""
    from qatcore.errors import CheckpointError
    from qatcore.quantization.qat import QATPreparer, load_int8_model
    from qatcore.quantization.qat.checkpointing import read_qat_checkpoint

    source = args.source
    if source.is_dir():
        source = source / ("qat.ckpt" if args.qat or not (source / "model.int8").is_file() else "model.int8")
    if not source.is_file():
        raise ConfigError(f"{source} does not exist")
    settings = _run_args(source if source.name != "model.int8" else source.with_name("qat.ckpt"))
    model_name = args.model or settings.get("model", "cnn")
    channels, image_size = model_input(model_name, mnist=bool(settings.get("mnist")))
    shape = (channels, args.image_size or image_size)
    if not args.qat:
        with contextlib.suppress(CheckpointError):
            return load_int8_model(source), shape
    payload = read_qat_checkpoint(source)
    if payload["format"] == "float":
        raise ConfigError(f"{source} is a float checkpoint; export takes a QAT checkpoint or an int8 model")
    float_model = make_model(model_name, np.random.default_rng(0), shape[1], channels)
    qat_model, _ = QATPreparer.from_checkpoint(source, float_model)
    return (qat_model if args.qat else QATPreparer().convert_to_quantized(qat_model)), shape


def _export(args) -> int:
    from qatcore.interop.onnx import export_onnx

    if args.qat and args.format != "qdq":
        raise ConfigError("--qat exports the QAT model in QDQ form; --format qoperator is for int8 models")
    model, (channels, image_size) = _export_source(args)
    example = np.zeros((1, channels, image_size, image_size), dtype=np.float32)
    export_onnx(model.eval(), args.output, example, format=args.format)
    kind = "QAT" if args.qat else "int8"
    print(f"{kind} model exported to {args.output} (ONNX, {args.format}, "
          f"input (batch, {channels}, {image_size}, {image_size}))")
    return 0


def _bench(args) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise ConfigError("qatcore bench runs the scripts in the source repository's benchmarks/ folder, "
                          "which this installation does not have")
    import subprocess

    command = [sys.executable, str(script), "--output", str(args.output)] + (["--quick"] if args.quick else [])
    return subprocess.run(command).returncode


COMMANDS = {"run": _run, "stats": _stats, "convert": _convert, "export": _export, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed the reason (exit 2) or the help (exit 0)
        return int(exit_.code or 0)
    try:
        return COMMANDS[args.command](args)
    except RunInterrupted as e:
        print(f"qatcore: interrupted; the run is saved: qatcore run --resume {e.folder}", file=sys.stderr)
        return 130
    except (QATCoreError, OSError) as e:
        print(f"qatcore: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
