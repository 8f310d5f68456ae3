"""Learning-rate schedules: ``StepLR`` and ``CosineAnnealingLR``, as in ``torch.optim``.

A scheduler sets ``group["lr"]`` of every param group of an optimizer from the
group's base learning rate and the epoch counter ``last_epoch``. Constructing
one records ``group["initial_lr"]`` (the base rate) in each group, sets
``last_epoch = 0`` and applies the epoch-0 rate; each ``step()`` advances
``last_epoch`` by one and applies the next rate. Call it once per epoch, after
``optimizer.step()``.

Both schedules are computed in closed form from ``(base_lr, last_epoch)``:

- ``StepLR``: ``lr = base_lr * gamma ** (last_epoch // step_size)``
- ``CosineAnnealingLR``:
  ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * last_epoch / T_max)) / 2``

torch computes the same sequences recursively from the current ``lr``; the
values agree up to rounding. Unlike the recursive form, the closed form
overwrites any ``lr`` changed by hand between steps.

>>> import numpy as np
>>> from qatcore.nn.parameter import Parameter
>>> from qatcore.optim import SGD
>>> opt = SGD([Parameter(np.zeros(1, dtype=np.float32))], lr=1.0)
>>> scheduler = StepLR(opt, step_size=2, gamma=0.5)
>>> lrs = []
>>> for epoch in range(5):
...     lrs.append(scheduler.get_last_lr()[0])
...     scheduler.step()
>>> lrs
[1.0, 1.0, 0.5, 0.5, 0.25]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, final

from qatcore.errors import ConfigError, StateDictError
from qatcore.optim.optimizer import Optimizer, check_real

__all__ = ["CosineAnnealingLR", "LRScheduler", "StepLR"]


class LRScheduler(ABC):
    """Base class: epoch counter, base learning rates and the state-dict format.

    Args:
        optimizer: the optimizer whose groups' ``"lr"`` this scheduler sets.
        last_epoch: ``-1`` to start a new schedule (records ``initial_lr`` in each
            group from its current ``lr``); to resume, the index of the last epoch
            run, in which case every group must already have ``initial_lr``.

    Subclasses set their hyper-parameters through :meth:`_set_hyperparameters`
    before calling this constructor, and give the schedule in closed form in
    :meth:`_closed_form_lr`.
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        name = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise ConfigError(f"{name}: optimizer must be a qatcore Optimizer, got {optimizer!r}")
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < -1:
            raise ConfigError(f"{name}: last_epoch must be an int >= -1, got {last_epoch!r}")
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for g, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise ConfigError(
                        f"{name}: resuming at last_epoch={last_epoch} needs 'initial_lr' in "
                        f"param group {g}; build the scheduler with last_epoch=-1 first"
                    )
        self.optimizer = optimizer
        self.base_lrs: list[float] = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch: int = last_epoch
        self._last_lr: list[float] = []
        self.step()

    # ---- what a subclass provides ---------------------------------------------------
    @abstractmethod
    def _closed_form_lr(self, base_lr: float, epoch: int) -> float:
        """The learning rate at ``epoch`` for a group whose base rate is ``base_lr``."""

    @abstractmethod
    def _hyperparameters(self) -> dict[str, Any]:
        """The schedule's hyper-parameters by name (saved in the state dict)."""

    @abstractmethod
    def _set_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        """Check (ConfigError naming the field) and store the hyper-parameters."""

    # ---- public surface ------------------------------------------------------------------
    def step(self) -> None:
        """Advance ``last_epoch`` by one and set every group's ``lr`` for it."""
        self.last_epoch += 1
        self._last_lr = [self._closed_form_lr(base, self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        """The learning rates the last ``step()`` (or the constructor) set, per group."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """``{"last_epoch", "base_lrs", "last_lr", <hyper-parameters>}``, plain values
        only (the optimizer is not included; save its own state dict)."""
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "last_lr": list(self._last_lr),
            **self._hyperparameters(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the epoch counter, base rates and hyper-parameters (copied).

        Group ``lr`` values are not touched: they come back with the optimizer's
        own state dict. To resume, build the optimizer and the scheduler first,
        then load both state dicts (building a scheduler sets each group's lr
        for epoch 0), as in torch.

        Raises:
            StateDictError: a missing or unknown key, a base-rate list whose length
                is not the optimizer's group count, or a value outside its range.
        """
        name = f"{type(self).__name__}.load_state_dict"
        expected = {"last_epoch", "base_lrs", "last_lr", *self._hyperparameters()}
        if not isinstance(state_dict, dict) or set(state_dict) != expected:
            got = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else state_dict
            raise StateDictError(f"{name}: expected keys {sorted(expected)}, got {got}")
        groups = len(self.optimizer.param_groups)
        try:
            last_epoch = state_dict["last_epoch"]
            if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < 0:
                raise ConfigError(f"{name}: last_epoch must be an int >= 0, got {last_epoch!r}")
            rates = {}
            for key in ("base_lrs", "last_lr"):
                values = state_dict[key]
                if not isinstance(values, list) or len(values) != groups:
                    raise ConfigError(
                        f"{name}: {key} must be a list of {groups} learning rates (one per "
                        f"param group), got {values!r}"
                    )
                rates[key] = [
                    check_real(name, f"{key}[{g}]", lr, low=0.0) for g, lr in enumerate(values)
                ]
            # Last: it checks every field before storing any, so a failure changes nothing.
            self._set_hyperparameters({k: state_dict[k] for k in self._hyperparameters()})
        except ConfigError as error:
            raise StateDictError(str(error)) from error
        self.last_epoch = last_epoch
        self.base_lrs = rates["base_lrs"]
        self._last_lr = rates["last_lr"]

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._hyperparameters().items())
        return f"{type(self).__name__}({settings}, last_epoch={self.last_epoch})"


@final
class StepLR(LRScheduler):
    """Multiply each group's learning rate by ``gamma`` every ``step_size`` epochs.

    ``lr = base_lr * gamma ** (last_epoch // step_size)``

    Args:
        optimizer: the optimizer to schedule.
        step_size: epochs between decays, an int ``>= 1``.
        gamma: decay factor, ``> 0``.
        last_epoch: see :class:`LRScheduler`.

    >>> import numpy as np
    >>> from qatcore.nn.parameter import Parameter
    >>> from qatcore.optim import SGD
    >>> opt = SGD([Parameter(np.zeros(1, dtype=np.float32))], lr=0.1)
    >>> scheduler = StepLR(opt, step_size=3)
    >>> for _ in range(3):
    ...     scheduler.step()
    >>> scheduler.last_epoch, round(opt.param_groups[0]["lr"], 12)
    (3, 0.01)
    """

    def __init__(
        self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1
    ) -> None:
        self._set_hyperparameters({"step_size": step_size, "gamma": gamma})
        super().__init__(optimizer, last_epoch)

    def _set_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        step_size = hyperparameters["step_size"]
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise ConfigError(f"StepLR: step_size must be an int >= 1, got {step_size!r}")
        gamma = check_real("StepLR", "gamma", hyperparameters["gamma"], low=0.0, low_open=True)
        self.step_size: int = step_size
        self.gamma: float = gamma

    def _hyperparameters(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "gamma": self.gamma}

    def _closed_form_lr(self, base_lr: float, epoch: int) -> float:
        return base_lr * self.gamma ** (epoch // self.step_size)


@final
class CosineAnnealingLR(LRScheduler):
    """Anneal each group's learning rate from its base value to ``eta_min`` along
    half a cosine over ``T_max`` epochs (SGDR without restarts).

    ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * last_epoch / T_max)) / 2``

    Past ``T_max`` the cosine continues (the rate climbs back over the next
    ``T_max`` epochs), as in torch.

    Args:
        optimizer: the optimizer to schedule.
        T_max: epochs from the base rate down to ``eta_min``, an int ``>= 1``.
        eta_min: the minimum learning rate, ``>= 0``.
        last_epoch: see :class:`LRScheduler`.

    >>> import numpy as np
    >>> from qatcore.nn.parameter import Parameter
    >>> from qatcore.optim import SGD
    >>> opt = SGD([Parameter(np.zeros(1, dtype=np.float32))], lr=1.0)
    >>> scheduler = CosineAnnealingLR(opt, T_max=4)
    >>> lrs = [scheduler.get_last_lr()[0]]
    >>> for _ in range(4):
    ...     scheduler.step()
    ...     lrs.append(round(scheduler.get_last_lr()[0], 6))
    >>> lrs
    [1.0, 0.853553, 0.5, 0.146447, 0.0]
    """

    def __init__(
        self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        self._set_hyperparameters({"T_max": T_max, "eta_min": eta_min})
        super().__init__(optimizer, last_epoch)

    def _set_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        T_max = hyperparameters["T_max"]
        if isinstance(T_max, bool) or not isinstance(T_max, int) or T_max < 1:
            raise ConfigError(f"CosineAnnealingLR: T_max must be an int >= 1, got {T_max!r}")
        eta_min = check_real("CosineAnnealingLR", "eta_min", hyperparameters["eta_min"], low=0.0)
        self.T_max: int = T_max
        self.eta_min: float = eta_min

    def _hyperparameters(self) -> dict[str, Any]:
        return {"T_max": self.T_max, "eta_min": self.eta_min}

    def _closed_form_lr(self, base_lr: float, epoch: int) -> float:
        cosine = math.cos(math.pi * epoch / self.T_max)
        return self.eta_min + (base_lr - self.eta_min) * (1.0 + cosine) / 2.0
