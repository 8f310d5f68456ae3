"""The ``qatcore`` command line.

``qatcore run`` is the main job: train a reference model in float on the embedded
8x8 digits (or MNIST IDX files you have), prepare it for QAT, fine-tune, convert
to an integer-only int8 model, evaluate all three, and write a run folder:

    float.qat         the float model's state_dict          (qatcore.save)
    qat.ckpt          the QAT checkpoint                     (save_qat_checkpoint)
    model.int8        the int8 model                         (save_int8_model)
    statistics.json   what quantization did while training   (and statistics.qat)
    report.md         the summary; statistics.png with matplotlib installed
    result.json       the machine-readable result (also printed by --json)

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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from qatcore.errors import ConfigError, QATCoreError

__all__ = ["main", "build_parser", "run_float", "run_pipeline"]

MODELS = ("mlp", "cnn", "resnet")


class Interrupted(Exception):
    """Ctrl-C arrived; training stopped at a step boundary."""


class _Progress:
    """Progress on stderr as one line rewritten in place; silent when off."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled = stream, enabled

    def update(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


class _StopFlag:
    """SIGINT sets the flag; the training loop checks it after each step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading_main():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---- argument parsing ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qatcore",
                                     description="Quantization-aware training on a small autograd core.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="float training, QAT fine-tuning, int8 conversion and evaluation")
    run.add_argument("--model", choices=MODELS, default="cnn", help="reference model (default: cnn)")
    run.add_argument("--config", type=Path, help="layer-wise QAT config, JSON or TOML (see docs/getting_started.md)")
    run.add_argument("--bits", type=int, default=8, help="weight bits of the default config, 2-8 (default: 8)")
    run.add_argument("--epochs", type=_positive_int, default=12, help="float training epochs (default: 12)")
    run.add_argument("--qat-epochs", type=_positive_int, default=3, help="QAT fine-tuning epochs (default: 3)")
    run.add_argument("--lr", type=_positive_float, default=0.05, help="SGD learning rate (default: 0.05)")
    run.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default: 64)")
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    run.add_argument("--output", type=Path, default=Path("qatcore-run"), help="run folder (default: qatcore-run)")
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
    convert.add_argument("--model", choices=MODELS, default="cnn", help="the float model the checkpoint is of")
    convert.add_argument("--image-size", type=int, default=8, help="input side, for the cnn and mlp (default: 8)")
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
    export.add_argument("--model", choices=MODELS,
                        help="the float model a QAT checkpoint is of (default: the run's, else cnn)")
    export.add_argument("--image-size", type=_positive_int,
                        help="input side (default: the run's, 28 for MNIST runs, else 8)")
    bench = sub.add_parser("bench", help="run the benchmark suite and write one JSON file")
    bench.add_argument("--output", type=Path, default=Path("benchmarks.json"))
    bench.add_argument("--quick", action="store_true", help="a smoke run with few repetitions")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# ---- pieces of the pipeline -----------------------------------------------------------------
def _make_model(name: str, rng: np.random.Generator, image_size: int = 8):
    from qatcore import models

    if name == "mlp":
        return models.MLP(in_features=image_size * image_size, rng=rng)
    if name == "cnn":
        return models.DigitsCNN(rng=rng, image_size=image_size)
    return models.SmallResNet(rng=rng)


def _load_data(mnist: Path | None, seed: int):
    from qatcore.data import load_digits, load_mnist_idx

    if mnist is None:
        return "digits", load_digits(seed=seed)
    return "mnist", load_mnist_idx(mnist)


def load_config_file(path: Path, bits: int):
    """A LayerwiseConfig from a JSON or TOML file (or the default config with ``bits`` weights)."""
    from qatcore.quantization import QuantizationConfig
    from qatcore.quantization.qat import LayerwiseConfig

    if not 2 <= bits <= 8:
        raise ConfigError(f"--bits must be in [2, 8] (int8 runtime), got {bits}")
    if path is None:
        config = QuantizationConfig()
        if bits != 8:
            base = QuantizationConfig.lsq_4bit_weights()
            config = base.replace(weight=base.weight.replace(bits=bits))
        return LayerwiseConfig(global_config=config)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".toml" and sys.version_info < (3, 11):
        raise ConfigError(f"config file {path}: TOML needs Python 3.11 or newer (tomllib); write the config as JSON")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from e
    return LayerwiseConfig.from_dict(data)


def _train_epochs(model, loader, optimizer, schedule, first_epoch: int, epochs: int, stop: _StopFlag,
                  progress: _Progress, label: str, on_interrupt) -> None:
    from qatcore.training import train_one_epoch

    class _Stop(Exception):
        pass

    for epoch in range(first_epoch, epochs):
        def on_step(step: int, value: float, epoch: int = epoch) -> None:
            progress.update(f"{label} epoch {epoch + 1}/{epochs}  batch {step + 1}/{len(loader)}  loss {value:.4f}")
            if stop.raised:
                raise _Stop()

        try:
            train_one_epoch(model, loader, optimizer, on_step=on_step)
        except _Stop:
            on_interrupt(epoch)
            raise Interrupted() from None
        schedule.step()


def _inference_ms(model, x: np.ndarray, repeats: int = 5) -> float:
    from qatcore.autograd import no_grad

    model.eval()
    times = []
    with no_grad():
        model(x[:64])
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def run_float(model_name: str, epochs: int, lr: float, batch_size: int, seed: int,
              progress: _Progress | None = None, return_model: bool = False) -> dict:
    """Train ``model_name`` in float on the digits; return the result record (with the
    trained model under "trained_model" when ``return_model``)."""
    from qatcore.data import DataLoader, load_digits
    from qatcore.optim import SGD, CosineAnnealingLR
    from qatcore.training import evaluate_accuracy

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits(seed=seed)
    rng = np.random.default_rng(seed)
    model = _make_model(model_name, rng)
    optimizer = SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = CosineAnnealingLR(optimizer, T_max=epochs)
    loader = DataLoader(x_train, y_train, batch_size, shuffle=True, rng=rng)
    _train_epochs(model, loader, optimizer, schedule, 0, epochs, _StopFlag(), progress or _Progress(sys.stderr, False),
                  "float", lambda epoch: None)
    accuracy = evaluate_accuracy(model, x_test, y_test)
    extra = {"trained_model": model} if return_model else {}
    return {**extra, "model": model_name, "epochs": epochs, "float_accuracy": accuracy,
            "train_samples": int(len(x_train)), "test_samples": int(len(x_test)),
            "wall_time_s": time.perf_counter() - start}


def run_pipeline(args: argparse.Namespace, progress: _Progress) -> dict:
    """The whole `qatcore run` job (module docstring); returns the result record."""
    import qatcore
    from qatcore.data import DataLoader
    from qatcore.optim import SGD, CosineAnnealingLR
    from qatcore.quantization import QATPreparer, parity_report, save_int8_model, save_qat_checkpoint
    from qatcore.training import evaluate_accuracy

    start = time.perf_counter()
    folder = args.resume if args.resume is not None else args.output
    state: dict[str, Any] = {}
    if args.resume is not None:
        resume_path = folder / "resume.ckpt"
        if not resume_path.is_file():
            raise ConfigError(f"--resume {folder}: no resume.ckpt there (nothing was interrupted)")
        saved = qatcore.load(resume_path)
        if not isinstance(saved, dict) or saved.get("format") not in ("qatcore.run_float", "qatcore.qat_checkpoint"):
            raise ConfigError(f"--resume {folder}: resume.ckpt is not a qatcore run state")
        settings = saved["run_args"] if saved["format"] == "qatcore.run_float" else saved["extra"]["run_args"]
        for key, value in settings.items():
            setattr(args, key, Path(value) if key in ("config", "mnist", "output") and value else value)
        state = {"saved": saved}
    folder.mkdir(parents=True, exist_ok=True)
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k in ("model", "config", "bits", "epochs", "qat_epochs", "lr", "batch_size", "seed", "mnist",
                         "output")}
    layerwise = load_config_file(args.config, args.bits)
    dataset, (x_train, y_train, x_test, y_test) = _load_data(args.mnist, args.seed)
    image_size = int(x_train.shape[-1])
    rng = np.random.default_rng(args.seed)
    model = _make_model(args.model, rng, image_size)
    loader = DataLoader(x_train, y_train, args.batch_size, shuffle=True, rng=rng)
    optimizer = SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    schedule = CosineAnnealingLR(optimizer, T_max=args.epochs)
    stop = _StopFlag()
    saved = state.get("saved")
    float_accuracy = None
    first_epoch = 0
    if saved is not None and saved["format"] == "qatcore.run_float":
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        rng.bit_generator.state = saved["rng"]
        loader.load_state_dict(saved["loader"])
        first_epoch = int(saved["epoch"])

    def save_float_resume(epoch: int) -> None:
        qatcore.save({"format": "qatcore.run_float", "run_args": run_args, "epoch": epoch,
                      "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "schedule": schedule.state_dict(), "loader": loader.state_dict(),
                      "rng": rng.bit_generator.state}, folder / "resume.ckpt")

    with stop:
        preparer = QATPreparer()
        if saved is None or saved["format"] == "qatcore.run_float":
            _train_epochs(model, loader, optimizer, schedule, first_epoch, args.epochs, stop, progress, "float",
                          save_float_resume)
            float_accuracy = evaluate_accuracy(model, x_test, y_test)
            qatcore.save(model.state_dict(), folder / "float.qat")
            qat_model = preparer.prepare_for_qat(model, layerwise)
            qat_optimizer = SGD(qat_model.parameters(), lr=args.lr * 0.2, momentum=0.9, weight_decay=1e-4)
            qat_schedule = CosineAnnealingLR(qat_optimizer, T_max=args.qat_epochs)
            qat_first = 0
        else:
            model.load_state_dict(qatcore.load(folder / "float.qat"))
            qat_model, info = QATPreparer.from_checkpoint(
                folder / "resume.ckpt", model,
                lambda params: SGD(params, lr=args.lr * 0.2, momentum=0.9, weight_decay=1e-4),
                generators={"data": rng})
            qat_optimizer = info.optimizer
            qat_schedule = CosineAnnealingLR(qat_optimizer, T_max=args.qat_epochs)
            qat_schedule.load_state_dict(info.extra["schedule"])
            loader.load_state_dict(info.extra["loader"])
            float_accuracy = float(info.extra["float_accuracy"])
            qat_first = int(info.extra["epoch"])

        def save_qat_resume(epoch: int) -> None:
            save_qat_checkpoint(folder / "resume.ckpt", qat_model, qat_optimizer, preparer,
                                extra={"run_args": run_args, "epoch": epoch, "schedule": qat_schedule.state_dict(),
                                       "loader": loader.state_dict(), "float_accuracy": float_accuracy},
                                generators={"data": rng})

        _train_epochs(qat_model, loader, qat_optimizer, qat_schedule, qat_first, args.qat_epochs, stop, progress,
                      "QAT", save_qat_resume)
    progress.update("converting and evaluating")
    qat_accuracy = evaluate_accuracy(qat_model, x_test, y_test)
    save_qat_checkpoint(folder / "qat.ckpt", qat_model, qat_optimizer, extra={"run_args": run_args})
    int8_model = QATPreparer().convert_to_quantized(qat_model)
    save_int8_model(folder / "model.int8", int8_model)
    int8_accuracy = evaluate_accuracy(int8_model, x_test, y_test)
    parity = parity_report(qat_model, int8_model, x_test)
    statistics = QATPreparer.controller(qat_model).statistics
    statistics.save(folder / "statistics.qat")
    (folder / "statistics.json").write_text(statistics.to_json())
    plots = False
    try:
        statistics.plot(folder / "statistics.png")
        plots = True
    except QATCoreError:
        pass  # matplotlib not installed: the plot is optional
    float_ms, int8_ms = _inference_ms(model, x_test), _inference_ms(int8_model, x_test)
    progress.close()
    if (folder / "resume.ckpt").exists():
        (folder / "resume.ckpt").unlink()
    result = {
        "command": "run", "model": args.model, "dataset": dataset, "seed": args.seed,
        "epochs": args.epochs, "qat_epochs": args.qat_epochs, "bits": args.bits,
        "train_samples": int(len(x_train)), "test_samples": int(len(x_test)),
        "float_accuracy": float_accuracy, "qat_accuracy": qat_accuracy, "int8_accuracy": int8_accuracy,
        "float_model_bytes": (folder / "float.qat").stat().st_size,
        "int8_model_bytes": (folder / "model.int8").stat().st_size,
        "float_inference_ms": float_ms, "int8_inference_ms": int8_ms,
        "parity_exact": parity.output.exact, "parity_max_lsb": parity.output.max_lsb,
        "top1_agreement": parity.top1_agreement, "wall_time_s": time.perf_counter() - start,
        "output": str(folder), "plots": plots,
    }
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    (folder / "report.md").write_text(_report(result, parity, statistics.summary()))
    return result


def _table(result: dict) -> str:
    rows = [
        ("accuracy (float / QAT / int8)", f"{100 * result['float_accuracy']:.2f}% / "
                                          f"{100 * result['qat_accuracy']:.2f}% / "
                                          f"{100 * result['int8_accuracy']:.2f}%"),
        ("model size (float / int8)", f"{result['float_model_bytes']:,} / {result['int8_model_bytes']:,} "
                                      f"bytes "
                                      f"({100 * result['int8_model_bytes'] / result['float_model_bytes']:.1f}%)"),
        ("inference on the test set (float / int8)", f"{result['float_inference_ms']:.2f} / "
                                                     f"{result['int8_inference_ms']:.2f} ms"),
        ("int8 vs QAT outputs", f"{100 * result['parity_exact']:.3f}% exact, max {result['parity_max_lsb']:g} LSB, "
                                f"top-1 agreement {100 * (result['top1_agreement'] or 0):.2f}%"),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    header = (f"qatcore run: {result['model']} on {result['dataset']} ({result['train_samples']} train / "
              f"{result['test_samples']} test), {result['epochs']} float + {result['qat_epochs']} QAT epochs")
    return "\n".join([header] + [f"  {name.ljust(width)}  {value}" for name, value in rows]
                     + [f"  files in {result['output']}/"])


def _report(result: dict, parity, statistics_summary: str) -> str:
    return (f"# qatcore run report\n\n```text\n{_table(result)}\n```\n\n## Parity, value by value\n\n"
            f"```text\n{parity}\n```\n\n## Statistics at the end of training\n\n```text\n{statistics_summary}\n```\n")


# ---- the other commands ------------------------------------------------------------------------
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
    from qatcore.quantization import QATPreparer, save_int8_model

    if not args.checkpoint.is_file():
        raise ConfigError(f"{args.checkpoint} does not exist")
    qat_model, _ = QATPreparer.from_checkpoint(args.checkpoint, _make_model(args.model, np.random.default_rng(0),
                                                                            args.image_size))
    int8_model = QATPreparer().convert_to_quantized(qat_model)
    save_int8_model(args.output, int8_model)
    print(f"int8 model written to {args.output}")
    return 0


def _export_source(args) -> tuple[Any, int]:
    """The model to export and its input side (--image-size, else the run's: 28 for MNIST runs)."""
    from qatcore.errors import CheckpointError
    from qatcore.quantization import QATPreparer, load_int8_model
    from qatcore.quantization.qat.checkpointing import read_qat_checkpoint

    source = args.source
    if source.is_dir():
        source = source / ("qat.ckpt" if args.qat or not (source / "model.int8").is_file() else "model.int8")
    if not source.is_file():
        raise ConfigError(f"{source} does not exist")
    checkpoint = source if source.name != "model.int8" else source.with_name("qat.ckpt")
    settings: dict = {}
    if checkpoint.is_file():
        with contextlib.suppress(QATCoreError, KeyError, TypeError):
            settings = dict(read_qat_checkpoint(checkpoint)["extra"]["run_args"])
    image_size = args.image_size or (28 if settings.get("mnist") else 8)
    if not args.qat:
        with contextlib.suppress(CheckpointError):
            return load_int8_model(source), image_size
    payload = read_qat_checkpoint(source)
    if payload["format"] == "float":
        raise ConfigError(f"{source} is a float checkpoint; export takes a QAT checkpoint or an int8 model")
    float_model = _make_model(args.model or settings.get("model", "cnn"), np.random.default_rng(0), image_size)
    qat_model, _ = QATPreparer.from_checkpoint(source, float_model)
    return (qat_model if args.qat else QATPreparer().convert_to_quantized(qat_model)), image_size


def _export(args) -> int:
    from qatcore.interop.onnx import export_onnx

    if args.qat and args.format != "qdq":
        raise ConfigError("--qat exports the QAT model in QDQ form; --format qoperator is for int8 models")
    model, image_size = _export_source(args)
    example = np.zeros((1, 1, image_size, image_size), dtype=np.float32)
    export_onnx(model.eval(), args.output, example, format=args.format)
    kind = "QAT" if args.qat else "int8"
    print(f"{kind} model exported to {args.output} (ONNX, {args.format}, input (batch, 1, {image_size}, {image_size}))")
    return 0


def _bench(args) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise ConfigError("qatcore bench runs the scripts in the source repository's benchmarks/ folder, "
                          "which this installation does not have")
    import subprocess

    command = [sys.executable, str(script), "--output", str(args.output)] + (["--quick"] if args.quick else [])
    return subprocess.run(command).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed the reason (exit 2) or the help (exit 0)
        return int(exit_.code or 0)
    try:
        if args.command == "stats":
            return _stats(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "export":
            return _export(args)
        show = args.progress or (not args.quiet and not args.json and sys.stderr.isatty())
        result = run_pipeline(args, _Progress(sys.stderr, show))
    except Interrupted:
        folder = args.resume or args.output
        print(f"qatcore: interrupted; the run is saved: qatcore run --resume {folder}", file=sys.stderr)
        return 130
    except (QATCoreError, OSError) as e:
        print(f"qatcore: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.quiet:
        print(f"{result['int8_accuracy']:.4f}")
    else:
        print(_table(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
