"""The ``qatcore run`` job as functions: train a reference model in float, prepare it for
QAT and fine-tune it, convert it to an integer-only int8 model, compare the two, and
report. The command line (``qatcore.cli``) parses its options into a
:class:`RunSettings`, calls :func:`run_pipeline` (or :func:`resume_pipeline`) and prints
the :class:`RunResult`; from Python the same calls print nothing.

One concept per module:

    settings        RunSettings, the models by name, the layer-wise config file, the data
    training_loop   the epoch loop that stops between two steps; Ctrl-C as a stop request
    float_training  the float stage: FloatTraining, train_float
    qat_training    preparation and fine-tuning: QATTraining, fine_tune_qat
    resume          resume.ckpt: what an interrupted run saves and how it restarts
    run             run_pipeline, resume_pipeline: the stages, conversion, parity, the folder
    report          RunResult, the printed summary and report.md
    run_folder      what the commands read from a run folder; a checkpoint's model rebuilt

>>> from qatcore.pipeline import RunSettings, run_pipeline, format_summary
>>> lines = []
>>> result = run_pipeline(RunSettings(model="mlp", epochs=2, qat_epochs=1, output="run"),
...                       on_progress=lines.append)
>>> lines[0].split("  loss")[0], lines[-1]
('float epoch 1/2  batch 1/23', 'converting and evaluating')
>>> print(format_summary(result).splitlines()[0])
qatcore run: mlp on digits (1438 train / 359 test), 2 float + 1 QAT epochs
"""

from qatcore.pipeline.float_training import FloatResult, FloatTraining, train_float
from qatcore.pipeline.qat_training import QATResult, QATTraining, fine_tune_qat
from qatcore.pipeline.report import RunResult, format_report, format_summary
from qatcore.pipeline.run import inference_ms, resume_pipeline, run_pipeline
from qatcore.pipeline.run_folder import (
    RunCheckpoint,
    guess_reference_model,
    load_run_checkpoint,
    load_statistics,
    output_path,
    run_file,
    run_settings_of,
)
from qatcore.pipeline.settings import (
    MODELS,
    Dataset,
    ReferenceModel,
    RunSettings,
    describe_scheme,
    load_dataset,
    load_layerwise_config,
    make_model,
    model_input,
)

__all__ = [
    "RunSettings", "MODELS", "ReferenceModel", "make_model", "model_input", "load_layerwise_config", "Dataset",
    "load_dataset", "describe_scheme",
    "FloatTraining", "FloatResult", "train_float", "QATTraining", "QATResult", "fine_tune_qat",
    "run_pipeline", "resume_pipeline", "inference_ms", "RunResult", "format_summary", "format_report",
    "run_file", "output_path", "run_settings_of", "guess_reference_model", "RunCheckpoint", "load_run_checkpoint",
    "load_statistics",
]
