"""The whole run: float training, QAT fine-tuning, int8 conversion, evaluation, and the
run folder, resumable after an interruption.

:func:`run_pipeline` writes, in ``settings.output``:

    float.qat         the float model's state_dict          (qatcore.save)
    qat.ckpt          the QAT checkpoint                     (save_qat_checkpoint)
    model.int8        the int8 model                         (save_int8_model)
    statistics.json   what quantization did while training   (and statistics.qat)
    report.md         the summary; statistics.png with matplotlib installed
    result.json       the record of the RunResult it returns

A stop requested while training (by default Ctrl-C; see ``should_stop``) ends the
current step, saves ``resume.ckpt`` in the folder and raises ``RunInterrupted``;
:func:`resume_pipeline` then finishes the run with the result an uninterrupted run
gives. The run also saves ``resume.ckpt`` after every training epoch, so a crash or a
killed process loses at most the epoch in progress; the finished run deletes it.

In a data-parallel run (a ``qatcore.process_group`` group installed, as ``qatcore run
--distributed`` does), every rank runs this function: the training stages train on the
rank's share of each global batch (``train_epochs``), everything else is computed on
every rank alike, and rank 0 alone writes the folder (the others wait for its files
where they read them). Nothing is printed: ``on_progress`` receives a line per training step, one per
finished epoch (loss, training accuracy, time; to ``on_epoch`` instead when given) and
one before each later stage.

The run draws its weights and batch orders from its own generator,
``np.random.default_rng(settings.seed)``, and also seeds qatcore's default generator
with ``settings.seed`` (``qatcore.manual_seed``), so nothing in it is left to chance.

>>> settings = RunSettings(model="mlp", epochs=2, qat_epochs=1, output="mlp-run")
>>> result = run_pipeline(settings)
>>> result.int8_accuracy > 0.5, result.parity_max_lsb <= 1
(True, True)
>>> sorted(path.name for path in settings.output.iterdir())[:3]
['float.qat', 'model.int8', 'qat.ckpt']
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

import qatcore
from qatcore.autograd import no_grad
from qatcore.errors import QATCoreError, RunInterrupted
from qatcore.nn import Module
from qatcore.pipeline.float_training import FloatTraining
from qatcore.pipeline.post_training import PTQResult, post_training_quantize
from qatcore.pipeline.qat_training import QATTraining, check_config_converts
from qatcore.pipeline.report import RunResult, format_report
from qatcore.pipeline.resume import (
    RESUME_FILE,
    ResumePoint,
    read_resume_point,
    restore_float,
    restore_qat,
    save_float_resume,
    save_qat_resume,
)
from qatcore.pipeline.settings import RunSettings, describe_scheme, load_dataset, load_layerwise_config, make_model
from qatcore.pipeline.training_loop import stop_on_sigint
from qatcore.process_group import current_group
from qatcore.quantization.qat import (
    LayerwiseConfig,
    QATPreparer,
    parity_report,
    save_int8_model,
    save_qat_checkpoint,
)
from qatcore.random import manual_seed
from qatcore.training import evaluate_accuracy

__all__ = ["run_pipeline", "resume_pipeline", "inference_ms"]

Progress = Callable[[str], None]


def run_pipeline(settings: RunSettings, *, on_progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None, on_epoch: Progress | None = None) -> RunResult:
    """Run the whole job for ``settings`` into the folder ``settings.output`` (module docstring).

    Args:
        on_progress: called with a one-line status after every training step, before
            calibration and before conversion; None for silence.
        on_epoch: called with a line after every training epoch, such as ``"float epoch
            2/12  loss 0.0812  train accuracy 97.50%  0.9 s"``; None: on_progress gets it.
        should_stop: asked after every training step; True interrupts the run. None: Ctrl-C
            (SIGINT, on the main thread) interrupts it while it trains.

    Raises:
        RunInterrupted: the run stopped and saved ``resume.ckpt`` (``resume_pipeline``).
        ConfigError, DataError, ...: a setting, config file or data set that cannot be used.
    """
    return _run(settings, settings.output, None, time.perf_counter(), on_progress, should_stop, on_epoch)


def resume_pipeline(folder: str | os.PathLike, *, on_progress: Progress | None = None,
                    should_stop: Callable[[], bool] | None = None, on_epoch: Progress | None = None) -> RunResult:
    """Finish the interrupted run in ``folder`` with the settings it was started with; the
    result is that of the uninterrupted run (timings aside). Arguments as ``run_pipeline``."""
    start = time.perf_counter()
    folder = Path(folder)
    point = read_resume_point(folder)
    return _run(point.settings, folder, point, start, on_progress, should_stop, on_epoch)


def inference_ms(model: Module, x: np.ndarray, repeats: int = 5) -> float:
    """The median time in ms of ``model(x)`` in eval mode over ``repeats`` calls, after a warm-up."""
    model.eval()
    times = []
    with no_grad():
        model(x[:64])
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _post_training(settings: RunSettings, dataset, layerwise, folder: Path, progress: Progress) -> PTQResult:
    """Post-training quantization of a fresh copy of the trained float model, read back from
    ``float.qat`` (so a resumed run computes the same, whatever fine-tuning did since)."""
    progress("calibrating (post-training quantization)")
    float_model = make_model(settings.model, np.random.default_rng(0), dataset.image_size, dataset.channels)
    float_model.load_state_dict(qatcore.load(folder / "float.qat"))
    return post_training_quantize(float_model, dataset, layerwise, settings.batch_size)


def _plot_title(settings: RunSettings, dataset: str, layerwise: LayerwiseConfig) -> str:
    """The statistics plot's title: model, data, and the global config's scheme, e.g. "cnn on digits,
    3 QAT epochs: weights 4-bit LSQ per_channel_symmetric, activations 8-bit per_tensor_affine"."""
    config = layerwise.global_config
    weight, activation = config.weight, config.activation
    learned = "" if weight.learnable == "fixed" else f" {weight.learnable.value.upper()}"
    overrides = f" ({len(layerwise.overrides)} layer overrides)" if layerwise.overrides else ""
    return (f"{settings.model} on {dataset}, {settings.qat_epochs} QAT epochs: weights {weight.bits}-bit"
            f"{learned} {weight.scheme.value}, activations {activation.bits}-bit {activation.scheme.value}"
            f"{overrides}")


def _run(settings: RunSettings, folder: Path, point: ResumePoint | None, start: float,
         on_progress: Progress | None, should_stop: Callable[[], bool] | None,
         on_epoch: Progress | None) -> RunResult:
    progress = on_progress if on_progress is not None else (lambda text: None)
    epoch_line = on_epoch if on_epoch is not None else progress
    manual_seed(settings.seed)  # anything in the run that draws default randomness: fixed by the seed too
    layerwise = load_layerwise_config(settings)
    dataset = load_dataset(settings)
    if point is None:
        check_config_converts(settings, layerwise, dataset)
    folder.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be usable
    group = current_group()
    primary = group is None or group.rank == 0  # in a data-parallel run, rank 0 alone writes files

    def synchronize() -> None:  # the other ranks read what rank 0 wrote only once it is there
        if group is not None:
            group.barrier()

    float_training = FloatTraining.start(settings, dataset)
    stop_checks = contextlib.nullcontext(should_stop) if should_stop is not None else stop_on_sigint()
    with stop_checks as stop:
        if point is None or point.stage == "float":
            first_epoch = restore_float(float_training, point) if point is not None else 0
            stopped = float_training.train(
                first_epoch, on_progress=progress, should_stop=stop, on_epoch=epoch_line,
                after_epoch=lambda epoch: primary and save_float_resume(folder, float_training, epoch))
            if stopped is not None:
                if primary:
                    save_float_resume(folder, float_training, stopped)
                raise RunInterrupted(folder)
            float_accuracy = float_training.accuracy()
            if primary:
                qatcore.save(float_training.model.state_dict(), folder / "float.qat")
            synchronize()
            ptq = _post_training(settings, dataset, layerwise, folder, progress)
            qat_training = QATTraining.start(float_training, layerwise) if settings.qat_epochs else None
            first_epoch = 0
        else:
            qat_training, first_epoch, float_accuracy = restore_qat(float_training, folder)
            ptq = _post_training(settings, dataset, layerwise, folder, progress)
        stopped = (qat_training.train(
            first_epoch, on_progress=progress, should_stop=stop, on_epoch=epoch_line,
            after_epoch=lambda epoch: primary and save_qat_resume(folder, qat_training, epoch, float_accuracy))
            if qat_training is not None else None)
        if stopped is not None:
            if primary:
                save_qat_resume(folder, qat_training, stopped, float_accuracy)
            raise RunInterrupted(folder)
    progress("converting and evaluating")
    x_test, y_test = dataset.x_test, dataset.y_test
    if qat_training is not None:
        qat_model, qat_accuracy = qat_training.model, qat_training.accuracy()
        if primary:
            save_qat_checkpoint(folder / "qat.ckpt", qat_model, qat_training.optimizer,
                                extra={"run_args": settings.to_dict()})
        int8_model = QATPreparer().convert_to_quantized(qat_model)
        int8_accuracy = evaluate_accuracy(int8_model, x_test, y_test)
        parity = parity_report(qat_model, int8_model, x_test)
    else:  # --qat-epochs 0: the calibrated model is the run's QAT model (0 epochs), its int8 model the run's
        qat_model, qat_accuracy, int8_model, int8_accuracy = ptq.model, None, ptq.int8_model, ptq.accuracy
        parity = ptq.parity
        if primary:
            save_qat_checkpoint(folder / "qat.ckpt", qat_model, extra={"run_args": settings.to_dict()})
    statistics = QATPreparer.controller(qat_model).statistics
    if primary:
        save_int8_model(folder / "model.int8", int8_model)
        statistics.save(folder / "statistics.qat")
        (folder / "statistics.json").write_text(statistics.to_json())
    synchronize()
    plots = False
    if primary and statistics.quantizers:  # nothing to draw after post-training quantization alone
        try:
            statistics.plot(folder / "statistics.png", title=_plot_title(settings, dataset.name, layerwise))
            plots = True
        except QATCoreError:
            pass  # matplotlib not installed: the plot is optional
    float_model = float_training.model
    float_ms, int8_ms = inference_ms(float_model, x_test), inference_ms(int8_model, x_test)
    if primary:
        (folder / RESUME_FILE).unlink(missing_ok=True)
    weight_bits, activation_bits, scheme = describe_scheme(layerwise)
    result = RunResult(
        model=settings.model, dataset=dataset.name, seed=settings.seed, epochs=settings.epochs,
        qat_epochs=settings.qat_epochs, bits=weight_bits, activation_bits=activation_bits, scheme=scheme,
        train_samples=int(len(dataset.x_train)), test_samples=int(len(x_test)),
        float_accuracy=float_accuracy, ptq_accuracy=ptq.accuracy, qat_accuracy=qat_accuracy,
        int8_accuracy=int8_accuracy,
        float_model_bytes=(folder / "float.qat").stat().st_size,
        int8_model_bytes=(folder / "model.int8").stat().st_size,
        float_inference_ms=float_ms, int8_inference_ms=int8_ms,
        parity_exact=parity.output.exact, parity_max_lsb=parity.output.max_lsb,
        top1_agreement=parity.top1_agreement, ptq_parity_exact=ptq.parity.output.exact,
        ptq_parity_max_lsb=ptq.parity.output.max_lsb, ptq_parity_passes=ptq.parity.passes,
        calibration_samples=ptq.calibration_samples, wall_time_s=time.perf_counter() - start,
        output=str(folder), plots=plots,
        float_model=float_model, qat_model=qat_model, int8_model=int8_model, parity=parity, statistics=statistics,
        ptq_model=ptq.model, ptq_int8_model=ptq.int8_model, ptq_parity=ptq.parity,
    )
    if primary:
        (folder / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
        (folder / "report.md").write_text(format_report(result))
    synchronize()
    return result
