"""QAT checkpoints: everything needed to stop a QAT run and resume it exactly.

A checkpoint is one ``qatcore.save`` container (magic header, format version,
CRC-32 over the payload, written atomically: temporary file, fsync, rename, so
a crash mid-write leaves the previous checkpoint intact) holding:

    {"format": "qatcore.qat_checkpoint", "version": 1,
     "model": the QAT model's state_dict (weights, qparams, observer buffers, the
              lifecycle step, BatchNorm statistics),
     "preparer": how it was prepared (mode, schedule, auto_step, statistics config,
                 the layer-wise config), so the QAT model can be rebuilt from the
                 float model definition alone (``QATPreparer.from_checkpoint``),
     "statistics": the statistics collected so far,
     "optimizer": the optimizer's state_dict (or None),
     "optimizer_parameters": the model's name of each parameter in each of the optimizer's
              param groups, in the optimizer's order (None for one that is not the model's),
     "generators": {name: bit_generator.state} of the generators handed in,
     "extra": anything else of plain data (epoch, data loader state, ...)}

Loading checks the format, version and every part before changing anything,
and is one transaction: if any part fails to restore (a damaged field, an
optimizer or generator that refuses its state, the schedule), what was already
restored is put back, so model, optimizer, generators and statistics are as they
were, and :class:`~qatcore.errors.CheckpointError` names the part. Corrupted,
truncated or hostile files raise it too. A plain float ``state_dict`` file loads
into a QAT model as a warm start (quantization state stays fresh); one whose keys
do not fit lists them.

An optimizer state_dict numbers parameters by position, and the same parameters can
be listed in another order by the optimizer that resumes: one built before preparation
lists the float model's parameters and then the learned scales preparation added, one
built after it (``QATPreparer.from_checkpoint``'s ``make_optimizer``) lists them in
module order. Loading matches them by the names saved in ``optimizer_parameters``
(each param group must hold the same parameters), so either resumes exactly.

>>> import numpy as np, os, tempfile
>>> from qatcore.models import DigitsCNN
>>> from qatcore.quantization.qat import QATPreparer
>>> preparer = QATPreparer()
>>> qat = preparer.prepare_for_qat(DigitsCNN())
>>> _ = qat(np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32))
>>> path = os.path.join(tempfile.mkdtemp(), "run.qatckpt")
>>> save_qat_checkpoint(path, qat, preparer=preparer, extra={"epoch": 3})
>>> restored, info = QATPreparer.from_checkpoint(path, DigitsCNN())
>>> info.extra["epoch"], restored.qat_controller.current_step
(3, 1)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np

from qatcore.errors import CheckpointError, ConfigError, QATCoreError
from qatcore.nn.module import Module
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.qat.eager_conversion import EAGER_INT8_NOT_SAVABLE, holds_islands
from qatcore.quantization.qat.int8_serialization import int8_model_from_dict, int8_model_to_dict
from qatcore.quantization.qat.statistics import QATStatistics
from qatcore.quantization.qat.training_integration import QATController, controller_of
from qatcore.serialization import load, save

__all__ = ["save_qat_checkpoint", "load_qat_checkpoint", "read_qat_checkpoint", "LoadedCheckpoint",
           "save_int8_model", "load_int8_model"]

FORMAT, VERSION = "qatcore.qat_checkpoint", 1


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a checkpoint held besides the model state: ``kind`` is "qat" or "float"."""

    kind: str
    extra: Any
    preparer: dict | None
    step: int | None
    optimizer: Any = None


def _preparation_settings(controller) -> dict:
    """What decides how the model quantizes and when: a checkpoint only resumes a model
    prepared with the same."""
    return {
        "mode": controller.preparation_mode,
        "schedule": controller.schedule.to_dict(),
        "auto_step": controller.auto_step,
        "layerwise_config": controller.layerwise_config.to_dict(),
    }


def _check_same_preparation(path, saved: dict, current: dict) -> None:
    # compared as JSON text: the file's msgpack round trip turns tuples into lists
    def canonical(value):
        return json.dumps(value, sort_keys=True, default=repr)

    differing = [key for key in current if canonical(saved.get(key)) != canonical(current[key])]
    if differing:
        raise CheckpointError(
            f"{path}: the checkpoint was saved from a model prepared with other settings ({', '.join(differing)}); "
            f"loading it would quantize on the wrong grid. Prepare the model as it was "
            f"(QATPreparer.from_checkpoint({str(path)!r}) does) and load again"
        )


def _float_keys(qat_model: Module) -> set[str]:
    """The state_dict keys a float checkpoint must hold: all but the quantization state
    that preparation added (quantizers, the controller, the per-layer switches)."""
    added = tuple(f"{name}." for name, module in qat_model.named_modules()
                  if name and isinstance(module, (FakeQuantize, QATController)))
    return {key for key in qat_model.state_dict()
            if not key.startswith(added) and key.rsplit(".", 1)[-1] not in ("quant_enabled", "bn_frozen")}


def save_qat_checkpoint(path, qat_model: Module, optimizer=None, preparer=None, extra: Any = None,
                        generators: dict[str, np.random.Generator] | None = None) -> None:
    """Write a checkpoint of ``qat_model`` (and the optional parts) to ``path``, atomically."""
    controller = controller_of(qat_model)
    settings = {**_preparation_settings(controller), "statistics": controller.statistics.to_dict()["config"]}
    if preparer is not None and preparer.controller(qat_model) is not controller:
        raise CheckpointError("save_qat_checkpoint: the preparer did not prepare this model")
    settings["check_optimizers"] = controller.check_optimizers
    states = {}
    for name, generator in (generators or {}).items():
        if not isinstance(generator, np.random.Generator):
            raise CheckpointError(f"save_qat_checkpoint: generators[{name!r}] is not a numpy Generator")
        states[name] = generator.bit_generator.state
    payload = {
        "format": FORMAT, "version": VERSION,
        "model": qat_model.state_dict(),
        "preparer": settings,
        "statistics": controller.statistics.to_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "optimizer_parameters": None if optimizer is None else _parameter_names(qat_model, optimizer),
        "generators": states,
        "extra": extra,
    }
    try:
        save(payload, path)
    except QATCoreError as e:
        raise CheckpointError(f"save_qat_checkpoint: {e}") from e


def read_qat_checkpoint(path) -> dict:
    """The checkpoint's payload, validated in structure (CheckpointError if it is not one).
    A plain state_dict file (a float checkpoint) comes back as {"format": "float", "model": ...}."""
    try:
        payload = load(path)
    except QATCoreError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(payload, dict) and "format" not in payload:
        if all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in payload.items()):
            return {"format": "float", "model": payload}
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a QAT checkpoint (no format {FORMAT!r}) nor a float state_dict")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: QAT checkpoint format version {payload.get('version')!r}; this qatcore reads version {VERSION}"
        )
    expected = {"format": str, "version": int, "model": dict, "preparer": dict, "statistics": dict,
                "generators": dict}
    for key, kind in expected.items():
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path}: checkpoint field {key!r} is missing or not a {kind.__name__}")
    if not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in payload["model"].items()):
        raise CheckpointError(f"{path}: checkpoint field 'model' must map names to arrays")
    if payload.get("optimizer") is not None and not isinstance(payload["optimizer"], dict):
        raise CheckpointError(f"{path}: checkpoint field 'optimizer' must be a mapping or None")
    names = payload.get("optimizer_parameters")
    if names is not None and not (isinstance(names, list) and all(
            isinstance(group, list) and all(n is None or isinstance(n, str) for n in group) for group in names)):
        raise CheckpointError(f"{path}: checkpoint field 'optimizer_parameters' must be lists of names or None")
    return payload


def load_qat_checkpoint(path, qat_model: Module, optimizer=None,
                        generators: dict[str, np.random.Generator] | None = None) -> LoadedCheckpoint:
    """Restore ``qat_model`` (and optimizer, statistics, generators) from ``path``.

    A float checkpoint (a plain state_dict) warm-starts the QAT model: its weights
    and BatchNorm statistics load, quantization state stays as it is. All or
    nothing: on any failure everything already restored is put back and
    CheckpointError names the part that failed (and the mismatched keys).
    """
    undo: list[tuple[str, Callable[[], Any]]] = []  # (part, how to put it back), in the order changed
    step = "reading the checkpoint"
    try:
        payload = read_qat_checkpoint(path)
        step = "finding the model's QATController"
        controller = controller_of(qat_model)
        undo.append(("the model", partial(qat_model.load_state_dict, qat_model.state_dict())))
        if payload["format"] == "float":
            step = "loading the float weights"
            _load_float_state(path, payload["model"], qat_model)
            return LoadedCheckpoint("float", None, None, None)
        step = "checking the preparation settings"
        _check_same_preparation(path, payload["preparer"], _preparation_settings(controller))
        step = "reading the statistics"
        statistics = QATStatistics.from_dict(payload["statistics"])
        step = "checking the generators"
        states = _generator_states(path, payload["generators"], generators)
        step = "loading the model state"
        qat_model.load_state_dict(payload["model"], strict=True)
        if optimizer is not None:
            step = "loading the optimizer state"
            if payload.get("optimizer") is None:
                raise CheckpointError(f"{path}: the checkpoint holds no optimizer state")
            state = _in_optimizer_order(path, payload, qat_model, optimizer)
            undo.append(("the optimizer", partial(optimizer.load_state_dict, optimizer.state_dict())))
            optimizer.load_state_dict(state)
        step = "setting the generator states"
        for name, state in states.items():
            bit_generator = generators[name].bit_generator
            undo.append((f"generator {name!r}", partial(setattr, bit_generator, "state", bit_generator.state)))
            bit_generator.state = state
        step = "applying the QAT schedule"
        collector = controller.collector
        undo.append(("the statistics", partial(setattr, collector, "statistics", collector.statistics)))
        collector.statistics = statistics
        controller.apply_schedule()  # its switches are buffers: the model's undo puts them back
    except BaseException as error:
        not_undone = _undo_all(undo)
        if not isinstance(error, Exception):  # KeyboardInterrupt and the like: rolled back, not converted
            raise
        outcome = "nothing was changed" if not not_undone else f"could not put back {', '.join(not_undone)}"
        if isinstance(error, CheckpointError):  # it names what failed already
            raise CheckpointError(f"{error} ({outcome})") from error
        raise CheckpointError(f"{path}: {step} failed ({outcome}): {type(error).__name__}: {error}") from error
    return LoadedCheckpoint("qat", payload.get("extra"), payload["preparer"], controller.current_step)


def _parameter_names(qat_model: Module, optimizer) -> list[list[str | None]]:
    """The model's name of each parameter in each of the optimizer's param groups (None: not the model's)."""
    name_of = {id(param): name for name, param in qat_model.named_parameters()}
    return [[name_of.get(id(param)) for param in group["params"]] for group in optimizer.param_groups]


def _in_optimizer_order(path, payload: dict, qat_model: Module, optimizer) -> dict:
    """The saved optimizer state_dict renumbered for ``optimizer``'s order of the same parameters,
    matched by their names in the model (a checkpoint saved without names loads as it is)."""
    state, saved = payload["optimizer"], payload.get("optimizer_parameters")
    current = _parameter_names(qat_model, optimizer)
    if saved is None or saved == current:
        return state
    groups = state.get("param_groups")
    if len(saved) != len(current) or not isinstance(groups, list) or len(groups) != len(saved):
        raise CheckpointError(f"{path}: the checkpoint's optimizer had {len(saved)} param groups, this one has "
                              f"{len(current)}; build the optimizer as the saved one was built")
    for g, (saved_names, names, group) in enumerate(zip(saved, current, groups)):
        if None in saved_names or None in names:
            raise CheckpointError(f"{path}: param group {g} lists its parameters in another order than the saved "
                                  f"optimizer, and some are not the model's, so they cannot be matched by name; "
                                  f"build the optimizer as the saved one was built")
        indices = group.get("params") if isinstance(group, dict) else None
        if not isinstance(indices, list) or len(indices) != len(saved_names) or sorted(saved_names) != sorted(names):
            only_saved, only_now = sorted(set(saved_names) - set(names)), sorted(set(names) - set(saved_names))
            raise CheckpointError(f"{path}: param group {g} of the optimizer holds other parameters than the saved "
                                  f"one did (only saved: {only_saved[:10]}, only now: {only_now[:10]})")
    saved_state = state.get("state") if isinstance(state.get("state"), dict) else {}
    renumbered_groups, renumbered_state, position = [], {}, 0
    for saved_names, names, group in zip(saved, current, groups):
        saved_index = dict(zip(saved_names, group["params"]))
        for name in names:
            if saved_index[name] in saved_state:
                renumbered_state[position] = saved_state[saved_index[name]]
            position += 1
        renumbered_groups.append({**group, "params": list(range(position - len(names), position))})
    return {"state": renumbered_state, "param_groups": renumbered_groups}


def _load_float_state(path, state: dict, qat_model: Module) -> None:
    """A float state_dict into a QAT model (warm start), after checking its keys fit."""
    expected = set(qat_model.state_dict())
    unknown = sorted(set(state) - expected)
    if unknown or not state:
        raise CheckpointError(f"{path}: this float checkpoint does not fit the model; keys the model does "
                              f"not have: {unknown[:20]}")
    missing = sorted(_float_keys(qat_model) - set(state))
    if missing:
        raise CheckpointError(f"{path}: this float checkpoint lacks {len(missing)} of the model's float "
                              f"weights and statistics: {missing[:20]}")
    qat_model.load_state_dict(state, strict=False)


def _generator_states(path, states: dict, generators: dict[str, np.random.Generator] | None) -> dict:
    """The saved generator states, each checked against the generator handed in to receive it."""
    for name, state in states.items():
        if generators is None or name not in generators:
            raise CheckpointError(f"{path}: the checkpoint holds generator {name!r}; hand it in to restore it")
        kind = type(generators[name].bit_generator).__name__
        if not isinstance(state, dict) or state.get("bit_generator") != kind:
            saved = state.get("bit_generator") if isinstance(state, dict) else state
            raise CheckpointError(f"{path}: generator {name!r} was saved from a {saved!r} bit generator; "
                                  f"the one handed in is a {kind}")
    return dict(states)


def _undo_all(undo: list[tuple[str, Callable[[], Any]]]) -> list[str]:
    """Run the undo steps, last change first; the parts that could not be put back (normally none)."""
    not_undone = []
    for part, put_back in reversed(undo):
        try:
            put_back()
        except Exception:  # keep putting the other parts back; the caller reports this one
            not_undone.append(part)
    return not_undone


def save_int8_model(path, int8_model: Module) -> None:
    """Save a converted int8 model for deployment (same container as checkpoints). A model
    converted from an eager-mode QAT model runs the user's own forward code and cannot be
    saved as data: ConfigError, saying what to save instead."""
    if isinstance(int8_model, Module) and holds_islands(int8_model):
        raise ConfigError(f"save_int8_model: {EAGER_INT8_NOT_SAVABLE}")
    try:
        save(int8_model_to_dict(int8_model), path)
    except QATCoreError as e:
        raise CheckpointError(f"save_int8_model: {e}") from e


def load_int8_model(path) -> Module:
    """Load an int8 model saved by :func:`save_int8_model`."""
    try:
        return int8_model_from_dict(load(path))
    except QATCoreError as e:
        raise CheckpointError(f"cannot load int8 model {path}: {e}") from e
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load int8 model {path}: malformed ({type(e).__name__}: {e})") from e
