"""Optimizers and learning-rate schedulers (PyTorch-compatible names and semantics).

- :class:`Optimizer`: the base (param groups, state, ``zero_grad``, state dicts)
- :func:`optimizers_holding`: the live optimizers that hold a Parameter (so that
  Parameters created later, such as learned quantization scales, can join them)
- :class:`SGD`, :class:`Adam`, :class:`AdamW`: the update rules
- :class:`LRScheduler`, :class:`StepLR`, :class:`CosineAnnealingLR`: schedules
  that set each group's ``lr`` once per epoch
"""

from qatcore.optim.adam import Adam, AdamW
from qatcore.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR
from qatcore.optim.optimizer import Optimizer, optimizers_holding
from qatcore.optim.sgd import SGD

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "CosineAnnealingLR",
    "LRScheduler",
    "Optimizer",
    "StepLR",
    "optimizers_holding",
]
