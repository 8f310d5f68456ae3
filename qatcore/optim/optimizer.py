"""``Optimizer``: the base every qatcore optimizer builds on.

An optimizer holds

- ``param_groups``: a list of dicts, each with ``"params"`` (a list of
  Parameters) and the hyper-parameters for those parameters (``"lr"``, ...);
  a group's values override the optimizer's ``defaults``,
- ``state``: per-parameter scratch arrays (momentum buffers, moment estimates),
  keyed by the Parameter object itself,
- ``step()``: one update of every parameter that has a ``.grad``, done in place
  on ``p.data`` and in the parameter's dtype, so a Parameter (and its array) keep
  their identity for the whole run.

``state_dict()`` refers to parameters by their position across all groups
(0, 1, 2, ... in group order), exactly like ``torch.optim.Optimizer``, and is
made only of dicts, lists, Python numbers and numpy arrays (copies), so
``qatcore.save`` can store it. ``load_state_dict`` checks every group, count
and shape before it changes anything.

Parameters created after an optimizer was built (the learned scales QAT
preparation gives a model) reach it through :func:`optimizers_holding` and
:meth:`Optimizer.add_to_group_of`: every optimizer is known, weakly, to this
module while it lives, so whoever creates a Parameter for a layer can ask which
optimizers hold that layer's weight and add the new one beside it.

>>> import numpy as np
>>> from qatcore.nn.parameter import Parameter
>>> from qatcore.optim import SGD
>>> w, b = Parameter(np.ones(3, dtype=np.float32)), Parameter(np.zeros(1, dtype=np.float32))
>>> opt = SGD([{"params": [w]}, {"params": [b], "lr": 0.5}], lr=0.1, momentum=0.9)
>>> [g["lr"] for g in opt.param_groups]
[0.1, 0.5]
>>> w.grad = np.ones(3, dtype=np.float32)
>>> opt.step()  # b has no grad: skipped, and gets no state
>>> sorted(opt.state_dict()["state"])
[0]
"""

from __future__ import annotations

import itertools
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from qatcore.errors import ConfigError, DTypeError, ShapeError, StateDictError
from qatcore.nn.parameter import Parameter
from qatcore.tensor import Tensor

__all__ = ["Optimizer", "StateSlot", "check_bool", "check_real", "optimizers_holding"]


# ---- hyper-parameter checks ---------------------------------------------------------


def check_real(
    where: str,
    field: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a Python float, or ConfigError naming ``field`` and the range.

    The range is ``[low, high]``; ``low_open``/``high_open`` exclude an end.
    NaN and infinities are refused (no sensible hyper-parameter is infinite).

    >>> check_real("SGD", "lr", 0.1, low=0.0)
    0.1
    >>> check_real("Adam", "betas[0]", 1.0, low=0.0, high=1.0, high_open=True)
    Traceback (most recent call last):
    ...
    qatcore.errors.ConfigError: Adam: betas[0] = 1.0 is outside the accepted range [0.0, 1.0)
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ConfigError(
            f"{where}: {field} must be a real number, got {value!r} ({type(value).__name__})"
        )
    number = float(value)
    above_low = number > low if low_open else number >= low
    below_high = number < high if high_open else number <= high
    if not (math.isfinite(number) and above_low and below_high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{where}: {field} = {value!r} is outside the accepted range {interval}")
    return number


def check_bool(where: str, field: str, value: Any) -> bool:
    """``value`` as a bool, or ConfigError (``0``/``1``/strings are not flags)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{where}: {field} must be True or False, got {value!r}")
    return bool(value)


# ---- per-parameter state --------------------------------------------------------------


@dataclass(frozen=True)
class StateSlot:
    """One entry an optimizer keeps per parameter, as ``load_state_dict`` checks it.

    ``kind`` is ``"array"`` (a float array of the parameter's shape, stored in the
    parameter's dtype) or ``"count"`` (a non-negative int, e.g. Adam's step);
    ``required`` says whether a non-empty state entry must have it.
    """

    kind: Literal["array", "count"]
    required: bool = True


class _StateByParameter(MutableMapping):
    """A dict keyed by Parameter *identity*.

    Keying by ``id`` (and holding the Parameter so its id stays unique) keeps the
    state correct even if Tensor ever defines elementwise ``__eq__``, which would
    make Tensors unhashable or make two equal-valued parameters collide.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Tensor, dict[str, Any]]] = {}

    def __getitem__(self, param: Tensor) -> dict[str, Any]:
        return self._entries[id(param)][1]

    def __setitem__(self, param: Tensor, value: dict[str, Any]) -> None:
        self._entries[id(param)] = (param, value)

    def __delitem__(self, param: Tensor) -> None:
        del self._entries[id(param)]

    def __iter__(self) -> Iterator[Tensor]:
        return (param for param, _ in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, param: object) -> bool:
        return id(param) in self._entries


# ---- the live optimizers --------------------------------------------------------------

# Every optimizer alive, by creation number, held weakly: an optimizer nobody references is
# gone from here as soon as it is collected. It records only what exists; nothing computes
# from it but optimizers_holding (see docs/architecture.md, "Decisions").
_live_optimizers: weakref.WeakValueDictionary[int, Optimizer] = weakref.WeakValueDictionary()
_creation_numbers = itertools.count()


def optimizers_holding(param: Tensor) -> list[Optimizer]:
    """Every live optimizer whose param groups hold ``param`` (the object itself), oldest first.

    >>> import numpy as np
    >>> from qatcore.nn.parameter import Parameter
    >>> from qatcore.optim import SGD
    >>> w = Parameter(np.ones(2, dtype=np.float32))
    >>> opt = SGD([w], lr=0.1)
    >>> optimizers_holding(w) == [opt], optimizers_holding(Parameter(np.ones(1)))
    (True, [])
    """
    return [optimizer for optimizer in list(_live_optimizers.values()) if optimizer.holds(param)]


# ---- the base class -------------------------------------------------------------------


class Optimizer(ABC):
    """Base class: parameter groups, state, ``zero_grad`` and the state-dict format.

    Args:
        params: an iterable of Parameters (one group), or of dicts each with a
            ``"params"`` entry (a Parameter or an iterable of them) and optional
            per-group hyper-parameters overriding ``defaults``.
        defaults: every hyper-parameter the subclass understands, with its value
            for groups that do not set it.

    Raises:
        ConfigError: empty parameter list, a parameter listed twice, an item that
            is not a Tensor, a Tensor that does not require grad or is not a leaf,
            an unknown group key, or a hyper-parameter outside its range.

    Subclasses implement :meth:`step`, :meth:`_checked_hyperparameters` (check
    and normalize one group's hyper-parameters) and :meth:`_state_layout`.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        name = type(self).__name__
        self.defaults: dict[str, Any] = self._checked_hyperparameters(dict(defaults), name)
        self.param_groups: list[dict[str, Any]] = []
        self.state: MutableMapping[Tensor, dict[str, Any]] = _StateByParameter()
        if isinstance(params, (Tensor, dict)):
            raise ConfigError(
                f"{name}: params must be an iterable of Parameters or of param-group dicts, "
                f"got a single {type(params).__name__}; wrap it in a list"
            )
        items = list(params)
        if not items:
            raise ConfigError(f"{name}: got an empty parameter list; pass at least one Parameter")
        if all(isinstance(item, dict) for item in items):
            groups = items
        elif any(isinstance(item, dict) for item in items):
            raise ConfigError(
                f"{name}: params mixes Parameters and param-group dicts; pass one kind only"
            )
        else:
            groups = [{"params": items}]
        for group in groups:
            self.add_param_group(group)
        _live_optimizers[next(_creation_numbers)] = self

    # ---- what a subclass provides ---------------------------------------------------
    @abstractmethod
    def step(self) -> None:
        """Update every parameter whose ``.grad`` is not None, in place."""

    @abstractmethod
    def _checked_hyperparameters(self, hyperparameters: dict[str, Any], where: str) -> dict:
        """The group's hyper-parameters checked (ConfigError naming ``where`` and the
        field) and normalized to plain Python values (floats, bools, tuples)."""

    @abstractmethod
    def _state_layout(self, group: dict[str, Any]) -> dict[str, StateSlot]:
        """Every name a parameter's state may hold under ``group``'s settings."""

    # ---- groups -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Append a group (a dict with ``"params"``); missing hyper-parameters take
        the defaults. Raises ConfigError as the constructor does."""
        name = type(self).__name__
        index = len(self.param_groups)
        where = f"{name} param group {index}"
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise ConfigError(f"{where}: a param group is a dict with a 'params' entry")
        accepted = set(self.defaults) | {"params", "initial_lr"}
        unknown = sorted(set(param_group) - accepted)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown}; accepted keys are {sorted(accepted)}"
            )
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if not params:
            raise ConfigError(f"{where}: 'params' is empty")
        self._check_new_params(params, where)
        hyperparameters = {k: v for k, v in param_group.items() if k != "params"}
        initial_lr = hyperparameters.pop("initial_lr", None)
        group = self._checked_hyperparameters({**self.defaults, **hyperparameters}, where)
        if initial_lr is not None:
            group["initial_lr"] = check_real(where, "initial_lr", initial_lr, low=0.0)
        group["params"] = params
        self.param_groups.append(group)

    def holds(self, param: Tensor) -> bool:
        """Whether one of the param groups lists ``param`` (the object itself)."""
        return any(held is param for group in self.param_groups for held in group["params"])

    def add_to_group_of(self, anchor: Tensor, params: Iterable[Tensor]) -> list[Tensor]:
        """Append ``params`` to the param group that holds ``anchor``, so that group's
        hyper-parameters (lr, momentum, weight decay, ...) and any schedule over its lr
        apply to them; their per-parameter state starts empty. Parameters this optimizer
        already holds are skipped, so adding one twice never steps it twice.

        Returns the parameters added. Raises ConfigError if no group holds ``anchor``, or
        for a parameter ``add_param_group`` would refuse.

        >>> import numpy as np
        >>> from qatcore.nn.parameter import Parameter
        >>> from qatcore.optim import SGD
        >>> w, b, scale = (Parameter(np.ones(2, dtype=np.float32)) for _ in range(3))
        >>> opt = SGD([{"params": [w]}, {"params": [b], "lr": 0.5}], lr=0.1)
        >>> len(opt.add_to_group_of(b, [scale])), len(opt.add_to_group_of(b, [scale]))
        (1, 0)
        >>> [len(group["params"]) for group in opt.param_groups]
        [1, 2]
        """
        name = type(self).__name__
        for g, group in enumerate(self.param_groups):
            if any(held is anchor for held in group["params"]):
                new = []
                for param in params:
                    if not self.holds(param) and all(param is not other for other in new):
                        new.append(param)
                self._check_new_params(new, f"{name} param group {g}")
                group["params"].extend(new)
                return new
        raise ConfigError(f"{name}.add_to_group_of: no param group holds the anchor parameter")

    def _check_new_params(self, params: list[Any], where: str) -> None:
        """ConfigError unless each item may join this optimizer (as add_param_group says)."""
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        for position, param in enumerate(params):
            label = f"{where}: params[{position}]"
            if not isinstance(param, Tensor):
                raise ConfigError(
                    f"{label} is a {type(param).__name__}; an optimizer updates Parameters "
                    f"(Tensors with requires_grad=True)"
                )
            # A frozen Parameter is accepted (as in PyTorch: users pass model.parameters() with
            # some layers frozen) and simply skipped while it has no gradient; a plain tensor
            # that does not require grad is almost certainly a mistake.
            if not param.requires_grad and not isinstance(param, Parameter):
                raise ConfigError(
                    f"{label} has requires_grad=False and is not a Parameter; an optimizer updates "
                    f"Parameters"
                )
            if not param.is_leaf:
                raise ConfigError(f"{label} is not a leaf tensor; optimize Parameters only")
            if id(param) in seen:
                raise ConfigError(f"{label} appears more than once in the optimizer's parameters")
            seen.add(id(param))

    def _params_with_grad(self, group: dict[str, Any]) -> Iterator[Tensor]:
        """The group's parameters whose ``.grad`` is set, checked against ``.data``."""
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.shape != param.data.shape:
                raise ShapeError(
                    f"{type(self).__name__}.step: a parameter of shape {param.data.shape} "
                    f"has a grad of shape {param.grad.shape}"
                )
            if param.grad.dtype != param.data.dtype:
                raise DTypeError(
                    f"{type(self).__name__}.step: a {param.data.dtype} parameter has a "
                    f"{param.grad.dtype} grad; the update would change its dtype"
                )
            yield param

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget every parameter's gradient: ``p.grad = None`` (the default), or
        fill the existing gradient arrays with zeros when ``set_to_none=False``."""
        for group in self.param_groups:
            for param in group["params"]:
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad[...] = 0

    # ---- state dict ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A copy of the optimizer's state, with parameters replaced by indices.

        Returns ``{"state": {index: {name: ndarray | int}}, "param_groups":
        [{hyper-parameters..., "params": [indices]}]}``; indices count parameters
        across all groups in order. Only dicts, lists, Python numbers/bools and
        fresh numpy arrays appear (tuples such as ``betas`` become lists).
        """
        index_of: dict[int, int] = {}
        param_groups = []
        for group in self.param_groups:
            saved = {k: _plain(v) for k, v in group.items() if k != "params"}
            saved["params"] = []
            for param in group["params"]:
                index_of[id(param)] = len(index_of)
                saved["params"].append(index_of[id(param)])
            param_groups.append(saved)
        state = {
            index_of[id(param)]: {k: _plain(v) for k, v in entry.items()}
            for param, entry in self.state.items()
        }
        return {"state": dict(sorted(state.items())), "param_groups": param_groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace hyper-parameters and state with those in ``state_dict`` (copied).

        The saved groups must match this optimizer's groups in number and in
        parameters per group; every state array must have its parameter's shape
        (it is stored in the parameter's dtype). Nothing changes unless all checks
        pass.

        Raises:
            StateDictError: naming the group, parameter index or key that does not fit.
        """
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            keys = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else None
            raise StateDictError(
                f"{name}: expected a dict with keys ['param_groups', 'state'], got "
                f"{keys if keys is not None else type(state_dict).__name__}"
            )
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            count = len(saved_groups) if isinstance(saved_groups, list) else saved_groups
            raise StateDictError(
                f"{name}: the state dict has {count} param groups, the optimizer has "
                f"{len(self.param_groups)}"
            )
        param_of: dict[int, Tensor] = {}  # saved index -> this optimizer's parameter
        new_groups = []
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            new_groups.append(self._loaded_group(saved, group, g, param_of, name))

        if not isinstance(saved_state, dict):
            raise StateDictError(
                f"{name}: 'state' must be a dict, got {type(saved_state).__name__}"
            )
        group_of = {id(p): new for new in new_groups for p in new["params"]}
        new_state: list[tuple[Tensor, dict[str, Any]]] = []
        for index, entry in saved_state.items():
            if isinstance(index, bool) or not isinstance(index, int) or index not in param_of:
                raise StateDictError(
                    f"{name}: state has an entry for parameter index {index!r}, which no param "
                    f"group lists (indices are {sorted(param_of)})"
                )
            param = param_of[index]
            layout = self._state_layout(group_of[id(param)])
            new_state.append(
                (param, _loaded_entry(entry, param, layout, f"{name}: state[{index}]"))
            )

        self.param_groups[:] = new_groups
        self.state.clear()
        for param, entry in new_state:
            self.state[param] = entry

    def _loaded_group(
        self,
        saved: Any,
        group: dict[str, Any],
        g: int,
        param_of: dict[int, Tensor],
        name: str,
    ) -> dict[str, Any]:
        """One saved group checked against this optimizer's group ``g``."""
        where = f"{name}: param_groups[{g}]"
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise StateDictError(f"{where} must be a dict with a 'params' list")
        indices = saved["params"]
        if len(indices) != len(group["params"]):
            raise StateDictError(
                f"{where} has {len(indices)} parameters in the state dict, "
                f"{len(group['params'])} in the optimizer"
            )
        for index, param in zip(indices, group["params"]):
            if isinstance(index, bool) or not isinstance(index, int) or index in param_of:
                raise StateDictError(
                    f"{where}: parameter index {index!r} is not an int or appears twice"
                )
            param_of[index] = param
        hyperparameters = {k: v for k, v in saved.items() if k != "params"}
        missing = sorted(set(self.defaults) - set(hyperparameters))
        unknown = sorted(set(hyperparameters) - set(self.defaults) - {"initial_lr"})
        if missing or unknown:
            raise StateDictError(
                f"{where}: missing hyper-parameter(s) {missing}, unknown {unknown}; "
                f"was it saved by a different optimizer?"
            )
        initial_lr = hyperparameters.pop("initial_lr", None)
        try:
            new = self._checked_hyperparameters(hyperparameters, where)
            if initial_lr is not None:
                new["initial_lr"] = check_real(where, "initial_lr", initial_lr, low=0.0)
        except ConfigError as error:
            raise StateDictError(str(error)) from error
        new["params"] = group["params"]
        return new

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for g, group in enumerate(self.param_groups):
            lines.append(f"  param group {g}: {len(group['params'])} parameters")
            lines.extend(f"    {k}: {v}" for k, v in group.items() if k != "params")
        return "\n".join(lines + [")"])


def _plain(value: Any) -> Any:
    """A detached, msgpack-friendly copy of one state or hyper-parameter value."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _loaded_entry(
    entry: Any, param: Tensor, layout: dict[str, StateSlot], where: str
) -> dict[str, Any]:
    """One parameter's saved state, checked against ``layout`` and copied."""
    if not isinstance(entry, dict):
        raise StateDictError(f"{where} must be a dict, got {type(entry).__name__}")
    unknown = sorted(map(str, set(entry) - set(layout)))
    missing = sorted(k for k, slot in layout.items() if slot.required and k not in entry)
    if entry and (unknown or missing):
        raise StateDictError(
            f"{where}: unknown key(s) {unknown}, missing {missing}; expected {sorted(layout)}"
        )
    loaded: dict[str, Any] = {}
    for key, value in entry.items():
        if layout[key].kind == "count":
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise StateDictError(f"{where}[{key!r}] must be an int, got {value!r}")
            if value < 0:
                raise StateDictError(f"{where}[{key!r}] must be >= 0, got {value}")
            loaded[key] = int(value)
            continue
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise StateDictError(
                f"{where}[{key!r}] must be a float numpy array, got {type(value).__name__}"
                + (f" of dtype {value.dtype}" if isinstance(value, np.ndarray) else "")
            )
        if value.shape != param.data.shape:
            raise StateDictError(
                f"{where}[{key!r}] has shape {value.shape}, the parameter has shape "
                f"{param.data.shape}"
            )
        loaded[key] = np.array(value, dtype=param.data.dtype, copy=True)
    return loaded
