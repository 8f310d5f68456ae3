"""The ``qatcore`` command line.

``qatcore run`` trains a reference model in float on the embedded 8x8 digits and
prints its test accuracy (the QAT, conversion and reporting stages join this
command as they land). Exit codes a script can rely on: 0 success, 2 bad usage
or bad input (one line on stderr saying why), 1 internal error.

>>> args = build_parser().parse_args(["run", "--model", "mlp", "--epochs", "3"])
>>> args.model, args.epochs, args.lr
('mlp', 3, 0.05)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence, TextIO

import numpy as np

from qatcore.errors import QATCoreError

__all__ = ["main", "build_parser", "run_float"]

MODELS = ("mlp", "cnn", "resnet")


class _Progress:
    """A one-line progress display on a terminal stream; silent otherwise."""

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatcore", description="Quantization-aware training on a small autograd core."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a reference model on the embedded digits and evaluate it")
    run.add_argument("--model", choices=MODELS, default="cnn", help="reference model (default: cnn)")
    run.add_argument("--epochs", type=_positive_int, default=12, help="training epochs (default: 12)")
    run.add_argument("--lr", type=_positive_float, default=0.05, help="SGD learning rate (default: 0.05)")
    run.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default: 64)")
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    run.add_argument("--json", action="store_true", help="print one JSON result object on stdout")
    run.add_argument("--quiet", action="store_true", help="print nothing but the result")
    run.add_argument("--progress", action="store_true",
                     help="show progress on stderr even when it is not a terminal")
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


def _make_model(name: str, rng: np.random.Generator):
    from qatcore import models

    return {"mlp": models.MLP, "cnn": models.DigitsCNN, "resnet": models.SmallResNet}[name](rng=rng)


def run_float(model_name: str, epochs: int, lr: float, batch_size: int, seed: int,
              progress: _Progress | None = None, return_model: bool = False) -> dict:
    """Train ``model_name`` in float on the digits; return the result record (with the
    trained model under "trained_model" when ``return_model``)."""
    from qatcore.data import DataLoader, load_digits
    from qatcore.optim import SGD, CosineAnnealingLR
    from qatcore.training import evaluate_accuracy, train_one_epoch

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits(seed=seed)
    rng = np.random.default_rng(seed)
    model = _make_model(model_name, rng)
    optimizer = SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = CosineAnnealingLR(optimizer, T_max=epochs)
    loader = DataLoader(x_train, y_train, batch_size, shuffle=True, rng=rng)
    loss = float("nan")
    for epoch in range(epochs):
        def on_step(step: int, value: float, epoch: int = epoch) -> None:
            if progress is not None:
                progress.update(
                    f"epoch {epoch + 1}/{epochs}  batch {step + 1}/{len(loader)}  loss {value:.4f}"
                )

        loss = train_one_epoch(model, loader, optimizer, on_step=on_step)
        schedule.step()
    if progress is not None:
        progress.update("evaluating")
        progress.close()
    accuracy = evaluate_accuracy(model, x_test, y_test)
    extra = {"trained_model": model} if return_model else {}
    return {
        **extra,
        "command": "run",
        "model": model_name,
        "dataset": "digits",
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "train_samples": int(len(x_train)),
        "test_samples": int(len(x_test)),
        "final_train_loss": loss,
        "float_accuracy": accuracy,
        "wall_time_s": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the reason
        return int(exit_.code or 0)
    try:
        show = args.progress or (not args.quiet and not args.json and sys.stderr.isatty())
        result = run_float(args.model, args.epochs, args.lr, args.batch_size, args.seed,
                           _Progress(sys.stderr, show))
    except QATCoreError as e:
        print(f"qatcore: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qatcore: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    elif args.quiet:
        print(f"{result['float_accuracy']:.4f}")
    else:
        print(
            f"model {result['model']} on digits ({result['train_samples']} train / "
            f"{result['test_samples']} test), {result['epochs']} epochs: float test accuracy "
            f"{100 * result['float_accuracy']:.2f}%  ({result['wall_time_s']:.1f} s)"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
