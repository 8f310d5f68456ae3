"""The autograd core: grad mode, the Function protocol, the backward engine and
the finite-difference gradient check, and hooks into the backward pass."""

from qatcore.autograd.engine import backward, sum_to_shape, topological_order
from qatcore.autograd.function import Function
from qatcore.autograd.grad_mode import enable_grad, is_grad_enabled, no_grad
from qatcore.autograd.gradcheck import gradcheck
from qatcore.autograd.hooks import queue_callback, register_grad_ready_hook

__all__ = [
    "Function",
    "gradcheck",
    "backward",
    "sum_to_shape",
    "topological_order",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "register_grad_ready_hook",
    "queue_callback",
]
