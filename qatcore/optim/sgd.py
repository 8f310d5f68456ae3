"""``SGD``: stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

Per step, for each parameter ``θ`` with gradient ``∇`` (lr ``γ``, momentum ``μ``,
dampening ``τ``, weight decay ``λ``)::

    g = -∇ if maximize else ∇
    g = g + λ θ                          (if λ != 0; L2 penalty)
    b = g                                (first step with μ != 0)
    b = μ b + (1 - τ) g                  (later steps)
    g = g + μ b if nesterov else b       (if μ != 0)
    θ = θ - γ g

``b`` is the per-parameter ``"momentum_buffer"``; it exists only when ``μ != 0``.

>>> import numpy as np
>>> from qatcore.nn.parameter import Parameter
>>> p = Parameter(np.array([1.0, 2.0], dtype=np.float32))
>>> p.grad = np.array([0.5, -1.0], dtype=np.float32)
>>> opt = SGD([p], lr=0.1)
>>> opt.step()
>>> p.data
array([0.95, 2.1 ], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, final

import numpy as np

from qatcore.errors import ConfigError
from qatcore.optim.optimizer import Optimizer, StateSlot, check_bool, check_real

__all__ = ["SGD"]


@final
class SGD(Optimizer):
    """Stochastic gradient descent (optionally with momentum / Nesterov momentum).

    Args:
        params: Parameters, or param-group dicts (see :class:`Optimizer`).
        lr: learning rate ``γ >= 0``.
        momentum: momentum factor ``μ >= 0`` (0 turns momentum off).
        dampening: ``τ`` in ``[0, 1]``; scales the gradient added to the buffer.
        weight_decay: L2 penalty ``λ >= 0`` added to the gradient.
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: ascend the objective instead of descending it.

    The update (see the module docstring) is done in place in the parameter's
    dtype; parameters whose ``.grad`` is None are skipped.

    >>> import numpy as np
    >>> from qatcore.nn.parameter import Parameter
    >>> p = Parameter(np.array([1.0], dtype=np.float32))
    >>> opt = SGD([p], lr=0.1, momentum=0.9)
    >>> for _ in range(2):
    ...     p.grad = np.array([1.0], dtype=np.float32)
    ...     opt.step()
    >>> p.data  # 1 - 0.1 * 1 - 0.1 * (0.9 * 1 + 1)
    array([0.71], dtype=float32)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    def _checked_hyperparameters(self, hyperparameters: dict[str, Any], where: str) -> dict:
        checked = {
            "lr": check_real(where, "lr", hyperparameters["lr"], low=0.0),
            "momentum": check_real(where, "momentum", hyperparameters["momentum"], low=0.0),
            "dampening": check_real(
                where, "dampening", hyperparameters["dampening"], low=0.0, high=1.0
            ),
            "weight_decay": check_real(
                where, "weight_decay", hyperparameters["weight_decay"], low=0.0
            ),
            "nesterov": check_bool(where, "nesterov", hyperparameters["nesterov"]),
            "maximize": check_bool(where, "maximize", hyperparameters["maximize"]),
        }
        if checked["nesterov"] and (checked["momentum"] <= 0.0 or checked["dampening"] != 0.0):
            raise ConfigError(
                f"{where}: nesterov=True needs momentum > 0 and dampening == 0, got "
                f"momentum={checked['momentum']}, dampening={checked['dampening']}"
            )
        return checked

    def _state_layout(self, group: dict[str, Any]) -> dict[str, StateSlot]:
        return {"momentum_buffer": StateSlot("array")}

    def step(self) -> None:
        """One SGD update of every parameter that has a ``.grad`` (formula above)."""
        for group in self.param_groups:
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            weight_decay, nesterov = group["weight_decay"], group["nesterov"]
            for param in self._params_with_grad(group):
                # Python-float hyper-parameters keep numpy in the parameter's dtype.
                grad = -param.grad if group["maximize"] else param.grad
                if weight_decay != 0.0:
                    grad = grad + weight_decay * param.data
                if momentum != 0.0:
                    state = self.state.setdefault(param, {})
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = np.array(grad, copy=True)
                    else:
                        buffer *= momentum
                        buffer += (1.0 - dampening) * grad
                    grad = grad + momentum * buffer if nesterov else buffer
                param.data -= lr * grad
