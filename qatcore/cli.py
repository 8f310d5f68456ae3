"""The ``qatcore`` command line: it parses options, calls the library and prints.

``qatcore run`` is the main job, ``qatcore.pipeline.run_pipeline``: train a reference
model in float on the embedded digits (8x8; 32x32x3 for resnet20 and mobilenetv2) or
MNIST IDX files you have, prepare it for QAT, fine-tune, convert to an integer-only
int8 model, evaluate all three, and write a run folder (float.qat, qat.ckpt,
model.int8, statistics.json and .qat, report.md, result.json; see
``qatcore.pipeline.run``). It prints the summary table, the result record as one
JSON line (``--json``) or one labelled line, ``int8 accuracy 0.9805`` (``--quiet``);
progress goes to stderr when that is a terminal (or with ``--progress``).

Ctrl-C stops at the end of the current training step and saves ``resume.ckpt`` in
the run folder (the run also saves it after every epoch); ``qatcore run --resume
FOLDER`` continues to the same result an uninterrupted run gives. ``mpiexec -n 4
qatcore run --distributed`` (or ``qatcore run --workers 4``) trains data-parallel on
four ranks (``docs/distributed.md``). ``qatcore stats``, ``qatcore convert``, ``qatcore export``
and ``qatcore bench`` inspect statistics, convert checkpoints, export runs and models
to ONNX (with the onnx extra) and run the benchmarks. Each takes a run folder where it
takes a file from one, rebuilds a checkpoint's model from the run settings saved in it
(``qatcore.pipeline.run_folder``) and writes into the folder of its source (the run
folder) unless ``--output`` says otherwise.

Exit codes a script can rely on: 0 success (also when the reader of stdout stops
early, as ``| head`` does), 2 bad usage or bad input (one line on stderr saying why,
no usage block, no traceback; ``--help`` shows the usage), 130 interrupted
(resumable), 1 internal error.

>>> args = build_parser().parse_args(["run", "--model", "mlp", "--epochs", "3"])
>>> args.model, args.epochs, args.lr
('mlp', 3, 0.05)
>>> run_settings(args).qat_epochs
3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence, TextIO

import numpy as np

import qatcore
from qatcore.errors import ConfigError, QATCoreError, RunInterrupted, ShapeError
from qatcore.pipeline import (
    MODELS,
    RunSettings,
    format_summary,
    load_run_checkpoint,
    load_statistics,
    model_input,
    output_path,
    resume_pipeline,
    run_file,
    run_pipeline,
    run_settings_of,
)
from qatcore.pipeline.gpt_experiment import SCHEMES, GPTSettings, format_gpt_summary, run_gpt_experiment

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
GPT_DEFAULTS = GPTSettings()  # and, for --model gpt, the transformer experiment's


class _OneLineErrors(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2); the usage block
    is for ``--help``. ``error`` is argparse's documented hook for this (its subparsers are
    made of the same class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="qatcore", description="Quantization-aware training on a small autograd core.")
    parser.add_argument("--version", action="version", version=f"qatcore {qatcore.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="float training, QAT fine-tuning, int8 conversion and evaluation")
    run.add_argument("--model", choices=(*MODELS, "gpt"), default=DEFAULTS.model,
                     help=f"reference model (default: {DEFAULTS.model}); gpt: the TinyGPT experiment on Tiny "
                          f"Shakespeare (float, PTQ and QAT perplexity; qatcore.pipeline.gpt_experiment)")
    run.add_argument("--scheme", choices=tuple(SCHEMES), default=None,
                     help=f"--model gpt: the quantization scheme (default: {GPT_DEFAULTS.scheme})")
    run.add_argument("--steps", type=_positive_int, default=None,
                     help=f"--model gpt: float pretraining steps (default: {GPT_DEFAULTS.steps})")
    run.add_argument("--qat-lr", type=_positive_float, default=None,
                     help="--model gpt: the peak learning rate of both fine-tunings (default: --lr / 40)")
    run.add_argument("--qat-steps", type=_positive_int, default=None,
                     help=f"--model gpt: fine-tuning steps of the float baseline and of QAT, each "
                          f"(default: {GPT_DEFAULTS.qat_steps})")
    run.add_argument("--config", type=Path, help="layer-wise QAT config, JSON or TOML (see docs/getting_started.md)")
    run.add_argument("--bits", type=int, default=DEFAULTS.bits,
                     help=f"weight bits of the default config, 2-8; below 8 the weight scales are learned "
                          f"(LSQ). Not with --config, whose file sets its bits (default: {DEFAULTS.bits})")
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
    run.add_argument("--quiet", action="store_true", help="print only the int8 accuracy, as 'int8 accuracy 0.9805'")
    run.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a terminal")
    run.add_argument("--distributed", action="store_true",
                     help="this process is one rank of an MPI job (mpiexec -n 4 qatcore run --distributed): "
                          "data-parallel training on shares of each global batch; rank 0 writes the run folder "
                          "and prints (needs the distributed extra; docs/distributed.md)")
    run.add_argument("--workers", type=_positive_int,
                     help="start this many ranks with mpiexec and run data-parallel, as --distributed "
                          "(needs the distributed extra)")
    run.add_argument("--rank-timeout", type=_positive_float, default=60.0,
                     help="seconds a rank waits for the others before it stops the run, naming the ranks "
                          "that did not answer (default: 60)")
    stats = sub.add_parser("stats", help="summarise the statistics of a run: its folder, statistics.qat, "
                                         "statistics.json or a QAT checkpoint")
    stats.add_argument("path", type=Path, help="a run folder, statistics.qat, statistics.json or qat.ckpt")
    stats.add_argument("--plot", type=Path, help="also write the statistics plot to this PNG (needs matplotlib)")
    convert = sub.add_parser("convert", help="convert a run's QAT checkpoint to an int8 model file")
    convert.add_argument("checkpoint", type=Path, help="a run folder or a QAT checkpoint (qat.ckpt)")
    convert.add_argument("--model", choices=tuple(MODELS),
                         help="the float model the checkpoint is of (default: the run's, saved in the checkpoint)")
    convert.add_argument("--image-size", type=_positive_int,
                         help="input side, for the cnn and mlp (default: the run's: 28 for MNIST runs, else the "
                              "model's digits side)")
    convert.add_argument("--output", type=Path,
                         help="the int8 model file (default: model.int8 in the run folder, next to the checkpoint)")
    export = sub.add_parser("export", help="export a run, an int8 model or a QAT checkpoint to ONNX "
                                           "(needs the onnx extra)")
    export.add_argument("source", type=Path,
                        help="a run folder, an int8 model file (model.int8) or a QAT checkpoint (qat.ckpt)")
    export.add_argument("--output", type=Path,
                        help="the ONNX file (default: model.onnx, with --qat qat.onnx, in the run folder, next "
                             "to the source)")
    export.add_argument("--format", choices=("qdq", "qoperator"), default="qdq",
                        help="int8 operators as DequantizeLinear/op/QuantizeLinear (qdq, default) or "
                             "QLinearConv/QLinearMatMul (qoperator)")
    export.add_argument("--qat", action="store_true",
                        help="export the QAT model (float, with QDQ pairs) instead of the int8 model")
    export.add_argument("--model", choices=tuple(MODELS),
                        help="the float model a QAT checkpoint is of (default: the run's, saved in the checkpoint)")
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


# the options of the image runs that the gpt experiment does not take
_NOT_FOR_GPT = ("--config", "--bits", "--epochs", "--qat-epochs", "--mnist", "--resume", "--distributed", "--workers",
                "--quiet")
_GPT_ONLY = ("--scheme", "--steps", "--qat-steps", "--qat-lr")


def _given(args) -> set[str]:
    """The long options on the command line (``--lr=0.1`` counts as ``--lr``)."""
    return {item.split("=", 1)[0] for item in getattr(args, "argv", []) if item.startswith("--")}


def gpt_settings(args: argparse.Namespace) -> GPTSettings:
    """The GPTSettings of parsed ``qatcore run --model gpt`` options; an option of the image
    runs is refused by name (ConfigError)."""
    given = _given(args)
    refused = [option for option in _NOT_FOR_GPT if option in given]
    if refused:
        raise ConfigError(f"{', '.join(refused)}: not an option of --model gpt (it takes --scheme, --steps, "
                          f"--qat-steps, --qat-lr, --lr, --batch-size, --seed, --output, --json, --progress)")
    values = {"scheme": args.scheme, "steps": args.steps, "qat_steps": args.qat_steps, "qat_lr": args.qat_lr,
              "seed": args.seed,
              "output": args.output if "--output" in given else Path("qatcore-gpt-run"),
              "lr": args.lr if "--lr" in given else None,
              "batch_size": args.batch_size if "--batch-size" in given else None}
    return GPTSettings(**{k: v for k, v in values.items() if v is not None})


def _run(args) -> int:
    if args.model == "gpt":
        return _run_gpt(args)
    given = [option for option in _GPT_ONLY if option in _given(args)]
    if given:
        raise ConfigError(f"{', '.join(given)}: options of --model gpt, not of --model {args.model}")
    if args.workers is not None:
        return _launch_workers(args)
    if args.distributed:
        return _run_rank(args)
    return _run_here(args, printing=True)


def _run_here(args, printing: bool) -> int:
    show = printing and (args.progress or (not args.quiet and not args.json and sys.stderr.isatty()))
    progress = _ProgressLine(sys.stderr, show)
    if args.resume is not None:  # the folder's saved settings, not the options, shape a resumed run
        result = resume_pipeline(args.resume, on_progress=progress.update, on_epoch=progress.log)
    else:
        result = run_pipeline(run_settings(args), on_progress=progress.update, on_epoch=progress.log)
    progress.close()
    if not printing:
        return 0
    if args.json:
        print(json.dumps(result.to_dict()))
    elif args.quiet:
        print(f"int8 accuracy {result.int8_accuracy:.4f}")
    else:
        print(format_summary(result))
    return 0


def _run_gpt(args) -> int:
    """``qatcore run --model gpt``: the experiment of ``qatcore.pipeline.gpt_experiment``."""
    settings = gpt_settings(args)
    show = args.progress or (not args.json and sys.stderr.isatty())
    progress = _ProgressLine(sys.stderr, show)
    result = run_gpt_experiment(settings, on_progress=progress.update)
    progress.close()
    print(json.dumps(result.to_dict()) if args.json else format_gpt_summary(result))
    return 0


def _launch_workers(args) -> int:
    """``--workers N``: this process starts N ranks of ``qatcore run --distributed`` with the
    same options and returns mpiexec's exit code (the ranks print)."""
    from qatcore.distributed import launch_workers

    if args.distributed:
        raise ConfigError("--workers starts the ranks itself; --distributed is for a process that mpiexec "
                          "started: give one of them")
    argv, skip = [], False
    for item in args.argv:
        if skip:
            skip = False
        elif item == "--workers":
            skip = True
        elif not item.startswith("--workers="):
            argv.append(item)
    return launch_workers(args.workers, ["-m", "qatcore", *argv, "--distributed"])


def _run_rank(args) -> int:
    """``--distributed``: one rank of an MPI job. Every rank runs the pipeline on its share of
    each global batch; rank 0 alone writes the run folder and prints. A failure on any rank
    stops every rank (``qatcore.distributed.failing_fast``)."""
    from qatcore.distributed import MPIGroup, failing_fast
    from qatcore.process_group import set_group

    group = MPIGroup.world(timeout=args.rank_timeout)
    set_group(group)
    interrupted = None
    with failing_fast(group):
        try:
            _run_here(args, printing=group.rank == 0)
        except RunInterrupted as e:  # every rank stops at the same step (the stop is agreed)
            interrupted = e
    if interrupted is not None:
        raise interrupted
    return 0


def _stats(args) -> int:
    statistics = load_statistics(args.path)
    print(statistics.summary())
    if args.plot is not None:
        statistics.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _convert(args) -> int:
    from qatcore.quantization.qat import QATPreparer, save_int8_model

    checkpoint = load_run_checkpoint(args.checkpoint, args.model, args.image_size)
    int8_model = QATPreparer().convert_to_quantized(checkpoint.qat_model)
    output = args.output if args.output is not None else output_path(args.checkpoint, "model.int8")
    save_int8_model(output, int8_model)
    print(f"int8 model written to {output} ({checkpoint.model}, input (batch, {checkpoint.channels}, "
          f"{checkpoint.image_size}, {checkpoint.image_size}))")
    return 0


def _export_source(args) -> tuple[Any, tuple[int, int], bool]:
    """The model to export, its input (channels, side): the run's (1 x 28 for MNIST runs, else
    the model's digits shape), --image-size replacing the side, and whether that input is only
    the cnn's default (an int8 file without a run's checkpoint beside it, and no option)."""
    from qatcore.errors import CheckpointError
    from qatcore.quantization.qat import QATPreparer, load_int8_model

    wants_int8_file = not args.qat and (not args.source.is_dir() or (args.source / "model.int8").is_file())
    source = run_file(args.source, "model.int8" if wants_int8_file else "qat.ckpt")
    if not args.qat:
        try:
            int8_model = load_int8_model(source)
        except CheckpointError:
            int8_model = None  # not an int8 model file: a QAT checkpoint, converted below
        if int8_model is not None:
            settings = run_settings_of(source.with_name("qat.ckpt"))
            channels, image_size = model_input(args.model or settings.get("model", "cnn"),
                                               mnist=bool(settings.get("mnist")))
            default_input = not settings and args.model is None and args.image_size is None
            return int8_model, (channels, args.image_size or image_size), default_input
    checkpoint = load_run_checkpoint(source, args.model, args.image_size)
    model = checkpoint.qat_model if args.qat else QATPreparer().convert_to_quantized(checkpoint.qat_model)
    return model, (checkpoint.channels, checkpoint.image_size), False


def _export(args) -> int:
    from qatcore.interop.onnx import export_onnx

    if args.qat and args.format != "qdq":
        raise ConfigError("--qat exports the QAT model in QDQ form; --format qoperator is for int8 models")
    model, (channels, image_size), default_input = _export_source(args)
    output = args.output if args.output is not None else output_path(args.source,
                                                                      "qat.onnx" if args.qat else "model.onnx")
    example = np.zeros((1, channels, image_size, image_size), dtype=np.float32)
    try:
        export_onnx(model.eval(), output, example, format=args.format)
    except (ShapeError, ValueError) as e:
        if not default_input:
            raise
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{args.source} has no run settings beside it and does not take the cnn's "
                          f"{channels} x {image_size} x {image_size} input ({first_line}); pass --model or "
                          f"--image-size") from e
    kind = "QAT" if args.qat else "int8"
    print(f"{kind} model exported to {output} (ONNX, {args.format}, "
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --workers passes on to its ranks
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, in the handler below, rather than at exit
        return code
    except BrokenPipeError:  # the reader stopped early (| head): what it wanted it has; exit quietly
        _silence_stdout()
        return 0
    except RunInterrupted as e:
        print(f"qatcore: interrupted; the run is saved: qatcore run --resume {e.folder}", file=sys.stderr)
        return 130
    except (QATCoreError, OSError) as e:
        print(f"qatcore: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at the null device, so that flushing it at exit, into the closed pipe,
    raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
