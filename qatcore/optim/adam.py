"""``Adam`` and ``AdamW``: adaptive moment estimation, as ``torch.optim.Adam/AdamW``.

Per step, for each parameter ``θ`` with gradient ``∇`` (lr ``γ``, betas
``(β1, β2)``, ``ε``, weight decay ``λ``, step count ``t`` starting at 0)::

    g = -∇ if maximize else ∇
    g = g + λ θ                      (Adam, if λ != 0: L2 penalty in the gradient)
    θ = θ (1 - γ λ)                  (AdamW: decoupled decay, before the update)
    t = t + 1
    m = β1 m + (1 - β1) g
    v = β2 v + (1 - β2) g²
    v_max = max(v_max, v)            (amsgrad; v_max starts at 0)
    θ = θ - γ / (1 - β1^t) · m / (sqrt(v or v_max) / sqrt(1 - β2^t) + ε)

Per-parameter state: ``"step"`` (int ``t``), ``"exp_avg"`` (``m``),
``"exp_avg_sq"`` (``v``) and, with amsgrad, ``"max_exp_avg_sq"`` (``v_max``).
The two classes differ only in where the weight decay enters.

>>> import numpy as np
>>> from qatcore.nn.parameter import Parameter
>>> p = Parameter(np.array([1.0, -1.0], dtype=np.float32))
>>> p.grad = np.array([0.3, -2.0], dtype=np.float32)
>>> opt = Adam([p], lr=0.1)
>>> opt.step()  # the first Adam step moves each weight by about lr against its grad sign
>>> p.data.round(6)
array([ 0.9, -0.9], dtype=float32)
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable
from typing import Any, final

import numpy as np

from qatcore.errors import ConfigError
from qatcore.optim.optimizer import Optimizer, StateSlot, check_bool, check_real

__all__ = ["Adam", "AdamW"]


class _AdamBase(Optimizer):
    """What Adam and AdamW share: hyper-parameters, their checks, the per-parameter
    state and the update. Abstract: each final class below says where the weight
    decay enters (``decoupled_weight_decay``) and gives the public signature."""

    @property
    @abstractmethod
    def decoupled_weight_decay(self) -> bool:
        """True: ``θ *= 1 - γ λ`` before the update (AdamW); False: ``λ θ`` added to the gradient (Adam)."""

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, amsgrad: bool, maximize: bool) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
                    "maximize": maximize}
        super().__init__(params, defaults)

    def _checked_hyperparameters(self, hyperparameters: dict[str, Any], where: str) -> dict:
        betas = hyperparameters["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        return {
            "lr": check_real(where, "lr", hyperparameters["lr"], low=0.0),
            "betas": tuple(
                check_real(where, f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
                for i, beta in enumerate(betas)
            ),
            "eps": check_real(where, "eps", hyperparameters["eps"], low=0.0),
            "weight_decay": check_real(where, "weight_decay", hyperparameters["weight_decay"], low=0.0),
            "amsgrad": check_bool(where, "amsgrad", hyperparameters["amsgrad"]),
            "maximize": check_bool(where, "maximize", hyperparameters["maximize"]),
        }

    def _state_layout(self, group: dict[str, Any]) -> dict[str, StateSlot]:
        return {
            "step": StateSlot("count"),
            "exp_avg": StateSlot("array"),
            "exp_avg_sq": StateSlot("array"),
            "max_exp_avg_sq": StateSlot("array", required=group["amsgrad"]),
        }

    def step(self) -> None:
        """One update of every parameter that has a ``.grad`` (the module docstring's formula)."""
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            weight_decay = group["weight_decay"]
            for param in self._params_with_grad(group):
                # All scalars below are Python floats, so numpy computes in param's dtype.
                grad = -param.grad if group["maximize"] else param.grad
                if weight_decay != 0.0:
                    if self.decoupled_weight_decay:
                        param.data *= 1.0 - lr * weight_decay
                    else:
                        grad = grad + weight_decay * param.data
                state = self.state.setdefault(param, {})
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = np.zeros_like(param.data)
                    state["exp_avg_sq"] = np.zeros_like(param.data)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg *= beta1
                exp_avg += (1.0 - beta1) * grad
                exp_avg_sq *= beta2
                exp_avg_sq += (1.0 - beta2) * grad * grad
                if group["amsgrad"]:
                    # Created here too when amsgrad is switched on mid-run (max(0, v) = v).
                    max_exp_avg_sq = state.setdefault("max_exp_avg_sq", np.zeros_like(param.data))
                    np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
                    second_moment = max_exp_avg_sq
                else:
                    second_moment = exp_avg_sq
                bias_correction1 = 1.0 - beta1 ** state["step"]
                bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** state["step"])
                denom = np.sqrt(second_moment) / bias_correction2_sqrt + eps
                param.data -= (lr / bias_correction1) * exp_avg / denom


@final
class Adam(_AdamBase):
    """Adam, with the weight decay as an L2 term added to the gradient.

    Args:
        params: Parameters, or param-group dicts (see :class:`Optimizer`).
        lr: learning rate ``γ >= 0``.
        betas: ``(β1, β2)``, each in ``[0, 1)``: decay rates of the first and
            second moment estimates.
        eps: ``ε >= 0`` added to the denominator for numerical stability.
        weight_decay: ``λ >= 0``; adds ``λ θ`` to the gradient.
        amsgrad: divide by the running maximum of ``v`` (AMSGrad).
        maximize: ascend the objective instead of descending it.

    The update (see the module docstring) is done in place in the parameter's
    dtype; parameters whose ``.grad`` is None are skipped and their step count
    does not advance.

    >>> import numpy as np
    >>> from qatcore.nn.parameter import Parameter
    >>> p = Parameter(np.zeros(2, dtype=np.float32))
    >>> p.grad = np.array([1.0, 0.0], dtype=np.float32)
    >>> opt = Adam([p], lr=0.01, amsgrad=True)
    >>> opt.step()
    >>> p.data, opt.state[p]["step"]
    (array([-0.01,  0.  ], dtype=float32), 1)
    """

    decoupled_weight_decay = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)


@final
class AdamW(_AdamBase):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``θ *= 1 - γ λ``
    before the Adam update, instead of an L2 term in the gradient.

    Takes the same arguments as :class:`Adam`, except that ``weight_decay``
    defaults to ``1e-2``.

    >>> import numpy as np
    >>> from qatcore.nn.parameter import Parameter
    >>> p = Parameter(np.array([2.0], dtype=np.float32))
    >>> p.grad = np.array([0.0], dtype=np.float32)  # zero grad: only the decay acts
    >>> opt = AdamW([p], lr=0.1, weight_decay=0.5)
    >>> opt.step()
    >>> p.data  # 2 * (1 - 0.1 * 0.5)
    array([1.9], dtype=float32)
    """

    decoupled_weight_decay = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)
