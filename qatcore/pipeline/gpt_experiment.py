"""``qatcore run --model gpt``: the transformer experiment. A TinyGPT learns the Tiny
Shakespeare characters in float, then three models of the same budget are compared on
the validation text by perplexity:

    pretraining     float, ``steps`` AdamW steps (warm-up, then cosine decay)      -> snapshot S
    float           S fine-tuned in float for ``qat_steps`` more steps             -> FLOAT
    PTQ             FLOAT quantized by ``scheme`` (calibrated, no training)         -> PTQ
    QAT             S fine-tuned with ``scheme``'s fake quantization for the same
                    ``qat_steps`` steps, same batches, same optimizer state, same schedule -> QAT

    recovered = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_FLOAT)

the fraction of the perplexity that post-training quantization loses which QAT wins
back. This is torchao's comparison (its 68% on Llama3-8B): the float baseline gets the
fine-tuning budget too, so QAT is not credited for training longer, only for training
*quantized*. (Comparing QAT against the pretrained snapshot instead would let ordinary
extra training pass for recovered quantization error.) A negative or tiny PTQ loss makes
the fraction meaningless; the report then says so.

Both fine-tunings peak at ``qat_lr`` (default ``lr / 40``, below the end of pretraining's
cosine, ``lr / 10``) and decay by a cosine: QAT fine-tuning is short and gentle, as in
torchao's recipes. Measured on the default TinyGPT (600 pretraining steps, 300 fine-tuning
steps, 8da4w), a larger fine-tuning rate leaves the model still *learning the text*, and the
float baseline and QAT then differ mostly by training noise: recovered 64% at ``lr / 5`` (52%
with 600 steps), 68.5% at ``lr / 20``, 71.4% at ``lr / 40``.

Schemes (``SCHEMES``; groups of 32 input features throughout):

    8da4w     int8 per-token asymmetric dynamic activations, int4 symmetric weights
    4w        int4 symmetric weights, activations float
    2w        int2 symmetric weights, activations float
    ternary   BitNet b1.58: ternary absmean weights (per tensor), int8 per-token activations

Perplexity is exp of the mean next-character cross-entropy over every position of the
validation text's non-overlapping ``block_size`` windows, in eval mode.

Batches are ``batch_size`` windows at uniformly random offsets of the training tokens,
drawn from the run's generator (``np.random.default_rng(seed)``); the snapshot keeps the
generator's state, so the float and QAT fine-tunings see the same batches.

The run folder holds ``float.qat`` (the FLOAT state_dict), ``qat.ckpt`` (the QAT model,
``save_qat_checkpoint``), ``converted.int8`` (the converted model: packed low-bit weights,
``load_int8_model``; its perplexity is the QAT model's, exactly), ``statistics.json`` and
``statistics.qat`` (what quantization did during QAT: ``qatcore stats FOLDER``),
``result.json`` and ``report.md``; ``pretrained.qat`` (the snapshot, with its optimizer and
generator state) is written when pretraining ends, so a run in the same folder with the same
pretraining settings (any scheme, any fine-tuning) skips it (``resume=True``).

>>> settings = GPTSettings(steps=4, qat_steps=2, batch_size=4, block_size=16, n_layer=1, n_embd=32,
...                        output="gpt-run", validation_windows=8)
>>> result = run_gpt_experiment(settings)
>>> sorted(result.perplexity), result.scheme
(['converted', 'float', 'ptq', 'qat'], '8da4w')
>>> result.perplexity["converted"] == result.perplexity["qat"]     # packed int4 and the kernels: the same bits
True
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

import qatcore
from qatcore.autograd import no_grad
from qatcore.data import load_text, text_windows
from qatcore.errors import ConfigError
from qatcore.models import TinyGPT
from qatcore.nn import functional as F
from qatcore.optim import AdamW
from qatcore.quantization import QuantizationConfig
from qatcore.serialization import write_atomically

__all__ = ["SCHEMES", "GPTSettings", "GPTResult", "run_gpt_experiment", "format_gpt_summary", "validation_loss"]

SCHEMES: Mapping[str, Callable[[], QuantizationConfig]] = {
    "8da4w": lambda: QuantizationConfig.int8_dynamic_activation_int4_weight(group_size=32),
    "4w": lambda: QuantizationConfig.int4_weight_only(group_size=32),
    "2w": lambda: QuantizationConfig.intx_weight_only(2, group_size=32),
    "ternary": lambda: QuantizationConfig.ternary_weight(),
}

_PROGRESS_EVERY = 25


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}: {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class GPTSettings:
    """The settings of one transformer experiment (``qatcore run --model gpt`` options).

    Fields:
        scheme: a key of ``SCHEMES``.  steps: float pretraining steps.  qat_steps: the
            fine-tuning steps of the float baseline and of QAT (each).
        lr: AdamW's peak learning rate of pretraining.  qat_lr: the peak of both fine-tunings
            (None: ``lr / 40``, module docstring).
        batch_size, block_size: windows per step and tokens per window.
        n_layer, n_embd, n_head: the TinyGPT's size.  weight_decay: AdamW's.
        warmup: pretraining warm-up steps.  seed: the run's generator.  output: the folder.
        validation_windows: evaluate on the first this many validation windows (None: all).
        calibration_batches: PTQ calibration batches (for schemes with observed ranges).
    """

    scheme: str = "8da4w"
    steps: int = 600
    qat_steps: int = 300
    lr: float = 2e-3
    batch_size: int = 32
    block_size: int = 64
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0
    output: Path = Path("qatcore-gpt-run")
    validation_windows: int | None = None
    calibration_batches: int = 8
    qat_lr: float | None = None

    def __post_init__(self) -> None:
        owner = "GPTSettings"
        if self.scheme not in SCHEMES:
            raise ConfigError(f"--scheme must be one of {list(SCHEMES)}, got {self.scheme!r}")
        for name in ("steps", "qat_steps", "batch_size", "block_size", "n_layer", "n_embd", "n_head",
                     "calibration_batches"):
            _positive_int(owner, name, getattr(self, name))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"{owner}: warmup must be a non-negative int, got {self.warmup!r}")
        if self.validation_windows is not None:
            _positive_int(owner, "validation_windows", self.validation_windows)
        if self.qat_lr is not None and (isinstance(self.qat_lr, bool) or not isinstance(self.qat_lr, (int, float))
                                        or not math.isfinite(self.qat_lr) or self.qat_lr <= 0):
            raise ConfigError(f"{owner}: qat_lr must be None or a positive number, got {self.qat_lr!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name == "lr" and value == 0):
                raise ConfigError(f"{owner}: {name} must be a {'positive' if name == 'lr' else 'non-negative'} "
                                  f"number, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"{owner}: seed must be a non-negative int, got {self.seed!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"{owner}: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_embd % 32:
            raise ConfigError(f"{owner}: n_embd ({self.n_embd}) must be a multiple of 32, the schemes' group size")
        if not isinstance(self.output, (str, os.PathLike)):
            raise ConfigError(f"{owner}: output must be a path, got {self.output!r}")
        object.__setattr__(self, "output", Path(self.output))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v, Path) else v) for f in fields(self) for v in (getattr(self, f.name),)}

    def pretraining_key(self) -> dict[str, Any]:
        """The settings pretraining depends on: a snapshot made with the same ones is reused
        (whatever the scheme and the fine-tuning)."""
        return {name: getattr(self, name) for name in _PRETRAINING_FIELDS}


_PRETRAINING_FIELDS = ("steps", "lr", "batch_size", "block_size", "n_layer", "n_embd", "n_head", "weight_decay",
                       "warmup", "seed")


@dataclass(frozen=True)
class GPTResult:
    """What the experiment measured (``result.json``): validation loss and perplexity of
    each model, the fraction recovered, and the time of each stage."""

    scheme: str
    settings: dict
    loss: dict = field(default_factory=dict)          # "pretrained", "float", "ptq", "qat", "converted" -> nats
    perplexity: dict = field(default_factory=dict)    # "float", "ptq", "qat", "converted"
    recovered: float | None = None
    seconds: dict = field(default_factory=dict)       # per stage
    step_seconds: dict = field(default_factory=dict)  # mean training step, "float" and "qat"
    validation_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``peak / 10``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _batch(tokens: np.ndarray, rng: np.random.Generator, batch_size: int, block_size: int):
    starts = rng.integers(0, tokens.size - block_size - 1, batch_size)
    index = starts[:, None] + np.arange(block_size)
    return tokens[index], tokens[index + 1]


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _train(model, optimizer, tokens, rng, settings: GPTSettings, steps: int, peak: float, warmup: int,
           stage: str, on_progress) -> float:
    """``steps`` AdamW steps; returns the mean seconds per step."""
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, peak, warmup)
        x, y = _batch(tokens, rng, settings.batch_size, settings.block_size)
        loss = _loss(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_progress is not None and (step % _PROGRESS_EVERY == 0 or step == steps - 1):
            on_progress(f"{stage}: step {step + 1}/{steps}, loss {float(loss.data):.4f}")
    return (time.perf_counter() - start) / steps


def validation_loss(model, tokens: np.ndarray, block_size: int, windows: int | None = None,
                    batch_size: int = 64) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, number of tokens) of ``model`` in eval mode
    over the non-overlapping ``block_size`` windows of ``tokens`` (the first ``windows``)."""
    x, y = text_windows(tokens, block_size, stride=block_size)
    if windows is not None:
        x, y = x[:windows], y[:windows]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with no_grad():
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                loss = _loss(model, xb, yb)
                total += float(loss.data) * yb.size
                count += yb.size
    finally:
        model.train(was_training)
    return total / count, count


def _save_state(path: Path, model, optimizer, rng, pretraining: dict) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "rng": json.dumps(rng.bit_generator.state), "pretraining": pretraining}
    qatcore.save(payload, path)


def run_gpt_experiment(settings: GPTSettings, on_progress: Callable[[str], None] | None = None,
                       resume: bool = True) -> GPTResult:
    """Run the experiment of the module docstring; write the run folder; return its result."""
    from qatcore.quantization.qat import QATPreparer, save_int8_model, save_qat_checkpoint

    if not isinstance(settings, GPTSettings):
        raise ConfigError(f"run_gpt_experiment needs GPTSettings, got {type(settings).__name__}")
    out = settings.output
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(json.dumps(settings.to_dict(), indent=2).encode(), os.fspath(out / "gpt_settings.json"))
    snapshot = out / "pretrained.qat"
    pretraining = settings.pretraining_key()
    if snapshot.exists() and (not resume or qatcore.load(snapshot).get("pretraining") != pretraining):
        snapshot.unlink()  # another pretraining's snapshot: start afresh
    qatcore.manual_seed(settings.seed)
    text = load_text()
    config = SCHEMES[settings.scheme]()
    seconds, step_seconds, loss = {}, {}, {}

    def make_model():
        return TinyGPT(text.vocabulary_size, settings.block_size, settings.n_layer, settings.n_embd,
                       settings.n_head, rng=np.random.default_rng(settings.seed))

    def make_optimizer(model):
        return AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=settings.weight_decay)

    tokens = [0]

    def evaluate(model) -> float:
        value, tokens[0] = validation_loss(model, text.validation, settings.block_size, settings.validation_windows)
        return value

    # ---- pretraining (or its snapshot) ----------------------------------------------------
    model, start = make_model(), time.perf_counter()
    optimizer = make_optimizer(model)
    rng = np.random.default_rng(settings.seed)
    if snapshot.exists():
        state = qatcore.load(snapshot)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = json.loads(state["rng"])
        if on_progress is not None:
            on_progress(f"pretraining: restored from {snapshot}")
    else:
        step_seconds["pretraining"] = _train(model, optimizer, text.train, rng, settings, settings.steps,
                                             settings.lr, settings.warmup, "pretraining", on_progress)
        _save_state(snapshot, model, optimizer, rng, pretraining)
    seconds["pretraining"] = time.perf_counter() - start
    loss["pretrained"] = evaluate(model)
    rng_state = rng.bit_generator.state
    fine_lr = settings.lr / 40 if settings.qat_lr is None else settings.qat_lr

    # ---- float fine-tuning ----------------------------------------------------------------
    start = time.perf_counter()
    step_seconds["float"] = _train(model, optimizer, text.train, rng, settings, settings.qat_steps, fine_lr, 0,
                                   "float fine-tuning", on_progress)
    loss["float"] = evaluate(model)
    qatcore.save(model.state_dict(), out / "float.qat")
    seconds["float"] = time.perf_counter() - start

    # ---- post-training quantization of the fine-tuned float model ---------------------------
    start = time.perf_counter()
    if on_progress is not None:
        on_progress("post-training quantization")
    preparer = QATPreparer()
    ptq = preparer.prepare_for_qat(model, config)
    calibration = np.random.default_rng(settings.seed + 1)
    preparer.calibrate(ptq, [_batch(text.train, calibration, settings.batch_size, settings.block_size)[0]
                             for _ in range(settings.calibration_batches)])
    loss["ptq"] = evaluate(ptq)
    seconds["ptq"] = time.perf_counter() - start

    # ---- QAT fine-tuning from the snapshot --------------------------------------------------
    start = time.perf_counter()
    state = qatcore.load(snapshot)
    model = make_model()
    model.load_state_dict(state["model"])
    optimizer = make_optimizer(model)
    optimizer.load_state_dict(state["optimizer"])
    rng = np.random.default_rng(settings.seed)
    rng.bit_generator.state = rng_state
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model, config)
    step_seconds["qat"] = _train(qat, optimizer, text.train, rng, settings, settings.qat_steps, fine_lr, 0,
                                 "QAT fine-tuning", on_progress)
    loss["qat"] = evaluate(qat)
    save_qat_checkpoint(out / "qat.ckpt", qat, optimizer, preparer)
    statistics = preparer.controller(qat).statistics  # qatcore stats FOLDER reads them
    statistics.save(out / "statistics.qat")
    write_atomically(statistics.to_json().encode(), os.fspath(out / "statistics.json"))
    seconds["qat"] = time.perf_counter() - start

    # ---- the converted model: packed low-bit weights, integer kernels ------------------------
    start = time.perf_counter()
    converted = preparer.convert_to_quantized(qat)
    save_int8_model(out / "converted.int8", converted)
    loss["converted"] = evaluate(converted)  # equal to the QAT model's: same arithmetic, bit for bit
    seconds["convert"] = time.perf_counter() - start

    perplexity = {name: math.exp(loss[name]) for name in ("float", "ptq", "qat", "converted")}
    lost = perplexity["ptq"] - perplexity["float"]
    recovered = (perplexity["ptq"] - perplexity["qat"]) / lost if lost > 1e-6 * perplexity["float"] else None
    result = GPTResult(settings.scheme, settings.to_dict(), loss, perplexity, recovered, seconds, step_seconds,
                       tokens[0])
    write_atomically(json.dumps(result.to_dict(), indent=2).encode(), os.fspath(out / "result.json"))
    write_atomically(format_gpt_report(result).encode(), os.fspath(out / "report.md"))
    return result


def format_gpt_summary(result: GPTResult) -> str:
    """The lines ``qatcore run --model gpt`` prints."""
    p, loss = result.perplexity, result.loss
    lines = [f"TinyGPT on Tiny Shakespeare, scheme {result.scheme}: validation perplexity "
             f"(nats per character) over {result.validation_tokens} characters"]
    for name, label in (("float", "float (fine-tuned)"), ("ptq", "PTQ"), ("qat", "QAT"),
                        ("converted", "QAT, converted")):
        lines.append(f"  {label:<19} {p[name]:8.4f}  ({loss[name]:.4f})")
    if result.recovered is None:
        lines.append("  PTQ lost no perplexity: nothing to recover")
    else:
        lines.append(f"  QAT recovers {100 * result.recovered:.1f}% of the perplexity PTQ loses")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    lines.append(f"  time: {times}")
    return "\n".join(lines)


def format_gpt_report(result: GPTResult) -> str:
    """``report.md``: the summary and the settings."""
    settings = "\n".join(f"| {k} | {v} |" for k, v in result.settings.items())
    return (f"# TinyGPT, scheme {result.scheme}\n\n```\n{format_gpt_summary(result)}\n```\n\n"
            f"| setting | value |\n|---|---|\n{settings}\n")
