"""The learnable quantization Parameters of a QAT model, and the optimizers that train them.

With a learned scale (``QuantSpec(learnable="lsq")``, e.g.
``QuantizationConfig.lsq_4bit_weights()``) each quantizer preparation creates owns a
``scale`` Parameter, and with ``"lsq+"`` a ``zero_point`` Parameter too: Parameters the
float model never had. An optimizer built before preparation holds only the float
model's Parameters (which the QAT model shares, so it keeps training the weights); left
alone, it would never move the new ones, and their gradients would pile up unseen. Two
rules make sure that cannot happen silently:

1. **Preparation adds them** (:func:`add_to_optimizers`). A QAT layer's weight and output
   quantizers join every live optimizer that holds the layer's weight, in the param group
   holding it; an activation quantizer inserted between layers (no weight of its own)
   joins the optimizers holding the model's first Parameter (in ``parameters()`` order)
   that any optimizer holds, in that group. So the group's lr, momentum, weight decay and
   learning-rate schedule apply to a scale exactly as to its layer's weight, which is
   also what an optimizer built after preparation from ``qat_model.parameters()`` does.
   An optimizer's state for them starts empty.
2. **The first training step checks** (:func:`check_optimized`, called by the model's
   ``QATController`` at its first training-mode forward pass with gradients enabled):
   a learnable quantization Parameter that no live optimizer holds raises
   :class:`~qatcore.errors.ConfigError` naming it and saying how to fix it. Passes
   under ``no_grad()`` (calibration) are not training steps. A loop with its own update
   rule and no qatcore optimizer turns the check off with
   ``QATPreparer(check_optimizers=False)``.

>>> import numpy as np
>>> from qatcore.models import MLP
>>> from qatcore.optim import SGD
>>> from qatcore.quantization import QuantizationConfig
>>> from qatcore.quantization.qat import QATPreparer
>>> model = MLP(hidden=(8,))
>>> optimizer = SGD(model.parameters(), lr=0.01)  # built before preparation
>>> qat = QATPreparer().prepare_for_qat(model, QuantizationConfig.lsq_4bit_weights())
>>> [name for name, _ in learnable_quantizer_parameters(qat)]
['layers.1.weight_fake_quant.scale', 'layers.3.weight_fake_quant.scale']
>>> all(optimizer.holds(p) for _, p in learnable_quantizer_parameters(qat))
True
"""

from __future__ import annotations

from qatcore.errors import ConfigError
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter
from qatcore.optim.optimizer import optimizers_holding
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.qat.qat_layers import QAT_LAYER_TYPES

__all__ = ["learnable_quantizer_parameters", "add_to_optimizers", "check_optimized"]

_NAMES_SHOWN = 8  # an error lists this many Parameters, then a count of the others


def learnable_quantizer_parameters(qat_model: Module) -> list[tuple[str, Parameter]]:
    """(dotted name, Parameter) of every Parameter a quantizer of ``qat_model`` owns: the
    ``scale`` of LSQ and LSQ+ quantizers and the ``zero_point`` of LSQ+ ones, in module order.
    Use it to give them a param group of their own, or to update them yourself."""
    found = []
    for name, module in qat_model.named_modules():
        if isinstance(module, FakeQuantize):
            found.extend((f"{name}.{own}", param) for own, param in module.named_parameters())
    return found


def _anchors(qat_model: Module) -> list[tuple[FakeQuantize, Parameter | None]]:
    """Each learnable quantizer with the Parameter whose optimizers should train it: its QAT
    layer's weight, or None for an activation quantizer that belongs to no layer."""
    weight_of = {}
    for module in qat_model.modules():
        if isinstance(module, QAT_LAYER_TYPES):
            for quantizer in module.quantizers():
                weight_of[id(quantizer)] = module.weight
    return [(module, weight_of.get(id(module))) for module in qat_model.modules()
            if isinstance(module, FakeQuantize) and module.learns_scale]


def add_to_optimizers(qat_model: Module) -> None:
    """Add the learnable quantization Parameters of a freshly prepared ``qat_model`` to the
    live optimizers that hold the weights they belong with (rule 1 of the module docstring)."""
    anchors = _anchors(qat_model)
    if not anchors:
        return
    own = {id(param) for _, param in learnable_quantizer_parameters(qat_model)}
    model_anchor = next((param for param in qat_model.parameters()
                         if id(param) not in own and optimizers_holding(param)), None)
    for quantizer, weight in anchors:
        anchor = weight if weight is not None else model_anchor
        if anchor is None:
            continue
        new = list(quantizer.parameters())
        for optimizer in optimizers_holding(anchor):
            optimizer.add_to_group_of(anchor, new)


def check_optimized(qat_model: Module) -> None:
    """ConfigError naming every learnable quantization Parameter of ``qat_model`` that no
    live optimizer holds (rule 2 of the module docstring), with the ways to fix it."""
    missing = [name for name, param in learnable_quantizer_parameters(qat_model) if not optimizers_holding(param)]
    if not missing:
        return
    shown = ", ".join(missing[:_NAMES_SHOWN]) + (
        f" and {len(missing) - _NAMES_SHOWN} more" if len(missing) > _NAMES_SHOWN else "")
    raise ConfigError(
        f"no optimizer holds the learned quantization parameter(s) {shown}: they get gradients but would never "
        f"change. Build the optimizer before prepare_for_qat from the float model's parameters (preparation "
        f"adds the new ones beside each layer's weight) or after it from qat_model.parameters(), before the "
        f"first training step; run calibration passes made before the optimizer exists under no_grad(); "
        f"to update them with your own rule instead, prepare with QATPreparer(check_optimizers=False)"
    )
