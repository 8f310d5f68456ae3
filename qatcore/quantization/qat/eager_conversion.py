"""An eager-mode QAT model in integer arithmetic: each layer's int8 island, the eval forward
that runs it, and the conversion that keeps it.

An eager-mode QAT model (its forward branches on tensor values, so it has no graph) is the
user's own module tree with each enabled Linear / Conv2d swapped for a QAT layer that
fake-quantizes its input, its weight and its output (``qatcore.quantization.qat.preparation``).
Between two layers runs the user's float code, so each layer is an island of integer
arithmetic, float in and float out (docs/numerics.md, "Eager mode"):

    x_q = Quantize(x)    = clamp(z_x + rne(x * float32(1/s_x)), qmin, qmax)     (float32 mode: rne(x / s_x))
    y_q = Int8Linear / Int8Conv2d(x_q)
        = clamp(z_y + requant(sum_k (x_q - z_x) * w_q + bias_q; s_x * s_w / s_y), clamp_min, qmax)
    y   = Dequantize(y_q) = float32(y_q - z_y) * s_y

with (s_x, z_x) the grid of the layer's input quantizer, w_q = the weight on its weight
quantizer's grid s_w, bias_q = rne(b / (s_x * s_w)), (s_y, z_y) the output quantizer's grid
and clamp_min = z_y with a fused ReLU.

- :class:`Int8Island` is that chain as one module.
- :class:`EagerIntegerEval` is installed by preparation on each QAT layer of an eager model as
  ``layer.interpreter``: in eval mode without gradients the layer builds its island from its
  current parameters and quantizers (:func:`int8_island`) and runs it, so the QAT model's eval
  forward is every layer's integer arithmetic with the user's float code between them. Where
  the island cannot be built (training, gradients on, the layer or a quantizer switched off,
  nothing observed yet, a grid the int8 runtime cannot hold) the layer runs its float
  simulation and ``fallback_reason`` says why.
- :func:`convert_eager_model` copies the QAT model (the user's own classes, so the
  data-dependent forward still runs; no Parameter shared, so training on leaves it alone) with
  each enabled QAT layer replaced by its island, a layer switched off by its float layers.

The QAT model's eval forward and the converted model build the island with the same function
from the same parameters and run the same user code between islands on the same values, so
the two are equal bit for bit, whichever branch the forward takes.

>>> import numpy as np
>>> from qatcore import nn
>>> from qatcore.autograd import no_grad
>>> from qatcore.nn import functional as F
>>> from qatcore.quantization.qat import QATPreparer, parity_report
>>> class Gate(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a = nn.Linear(4, 4, rng=np.random.default_rng(0))
...         self.b = nn.Linear(4, 2, rng=np.random.default_rng(1))
...     def forward(self, x):
...         h = self.a(x)
...         if float(h.data.mean()) > 0:      # a branch on a value: no graph, eager mode
...             h = F.relu(h)
...         return self.b(h)
>>> preparer = QATPreparer()
>>> qat = preparer.prepare_for_qat(Gate())
>>> x = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
>>> _ = qat(x)                                # training mode: observe one batch
>>> int8_model = preparer.convert_to_quantized(qat)
>>> type(int8_model).__name__, type(int8_model.a).__name__
('Gate', 'Int8Island')
>>> with no_grad():
...     bool(np.array_equal(qat.eval()(x).numpy(), int8_model(x).numpy()))
True
>>> parity_report(qat, int8_model, x).passes
True
"""

from __future__ import annotations

import copy

from qatcore.autograd.grad_mode import is_grad_enabled
from qatcore.errors import ConfigError
from qatcore.nn.container import Sequential
from qatcore.nn.module import Module
from qatcore.quantization.config import Requantization
from qatcore.quantization.int8_layers import Dequantize, Int8Module, Quantize
from qatcore.quantization.qat.int8_model import Int8Value
from qatcore.quantization.qat.operators.lowbit import is_lowbit_layer, lowbit_module
from qatcore.quantization.qat.operators.weighted import computes_in_float, float_layers, int8_weighted_layer
from qatcore.quantization.qat.qat_layers import QATLayer
from qatcore.quantization.qat.training_integration import QATController, controller_of

__all__ = ["Int8Island", "int8_island", "EagerIntegerEval", "convert_eager_model", "holds_islands",
           "EAGER_INT8_NOT_SAVABLE"]

EAGER_INT8_NOT_SAVABLE = (
    "this int8 model was converted from an eager-mode QAT model: its forward is your own Python code (it branches "
    "on tensor values), which an int8 model file, a graph of int8 operators as plain data, cannot hold. Save its "
    "state instead, qatcore.save(int8_model.state_dict(), path), and to load it build the same structure again "
    "(prepare the float model with the same config, run one training-mode batch, convert_to_quantized) and call "
    "int8_model.load_state_dict(qatcore.load(path))"
)


class Int8Island(Module):
    """Quantize -> Int8Linear / Int8Conv2d -> Dequantize: one QAT layer of an eager-mode model
    in integer arithmetic, float in and float out (module docstring). ``name`` is the QAT
    layer's name in its model."""

    def __init__(self, name: str, quantize: Quantize, layer: Int8Module, dequantize: Dequantize) -> None:
        super().__init__()
        self.name = name
        self.quantize = quantize
        self.layer = layer
        self.dequantize = dequantize

    def forward(self, x):
        return self.dequantize(self.layer(self.quantize(x)))

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def int8_island(name: str, layer: QATLayer, requantization: Requantization) -> Int8Island:
    """The island of enabled QAT layer ``layer`` (called ``name``), built from its current
    parameters and quantizers. ConfigError naming the layer where the int8 runtime cannot hold
    it; ObserverError naming the quantizer that observed nothing yet."""
    missing = [part for part, quantizer in (("input", layer.input_fake_quant), ("weights", layer.weight_fake_quant),
                                            ("output", layer.output_fake_quant)) if quantizer is None]
    if missing:
        raise ConfigError(
            f"int8 conversion: eager-mode layer {name!r} does not quantize its {' and '.join(missing)}; an "
            f"integer-only layer needs its input, weights and output quantized (convert models prepared with "
            f"mode weights_and_activations)"
        )
    x = Int8Value.of_quantizer(layer.input_fake_quant, f"{name} (input)")
    out = Int8Value.of_quantizer(layer.output_fake_quant, f"{name} (output)")
    module = int8_weighted_layer(layer, name, x, out, requantization)
    return Int8Island(name, Quantize(x.scale, x.zero_point, x.qmin, x.qmax, requantization), module,
                      Dequantize(out.scale, out.zero_point))


class EagerIntegerEval:
    """Installed by eager preparation on each QAT layer as ``layer.interpreter``: in eval mode
    without gradients the layer's forward is its :class:`Int8Island`, built afresh from its
    current parameters on every call (module docstring). ``fallback_reason`` is None, or why
    the last eval forward used the float simulation."""

    def __init__(self, name: str, requantization: Requantization) -> None:
        self.name = name
        self.requantization = Requantization(requantization)
        self.fallback_reason: str | None = None

    def __call__(self, layer: QATLayer, x):
        if layer.training:
            return NotImplemented
        if is_grad_enabled():
            self.fallback_reason = "gradients are enabled (evaluate under no_grad for the integer arithmetic)"
            return NotImplemented
        island, reason = None, computes_in_float(layer)
        not_ready = [q.name for q in layer.quantizers() if not bool(q.qparams_ready.data)]
        if reason is None and not_ready:
            reason = f"nothing observed yet by {', '.join(not_ready)}"
        if reason is None:
            try:
                island = int8_island(self.name, layer, self.requantization)
            except ConfigError as e:  # the int8 runtime cannot hold this layer: the float simulation
                reason = str(e)
        self.fallback_reason = reason
        return NotImplemented if island is None else island(x)


def holds_islands(model: Module) -> bool:
    """Whether ``model`` is an eager-mode int8 model (it holds an :class:`Int8Island`)."""
    return any(isinstance(module, Int8Island) for module in model.modules())


def _int8_copy(module: Module, name: str, memo: dict, requantization: Requantization) -> Module:
    """The converted copy of ``module`` (at ``name`` in the QAT model); ``memo`` maps the id of
    each module, Parameter and buffer copied so far to its copy (shared stays shared)."""
    if id(module) in memo:
        return memo[id(module)]
    if isinstance(module, QATLayer):
        if is_lowbit_layer(module):  # per-group or ternary weights: the low-bit runtime (float in, float out)
            result = lowbit_module(name, module)
        elif not module.enabled:
            layers = float_layers(module)
            result = layers[0] if len(layers) == 1 else Sequential(*layers)
        elif computes_in_float(module) is not None:
            result = copy.deepcopy(module, memo)  # a quantizer is off: the QAT layer's float simulation
        else:
            result = int8_island(name, module, requantization)
    elif next(module.named_children(), None) is None:
        result = copy.deepcopy(module, memo)
    else:
        # the user's class, with its own registration tables: its own state, then its children
        result = module.copy_structure()
        for key, parameter in module.named_parameters(recurse=False):
            result.register_parameter(key, copy.deepcopy(parameter, memo))
        for key, buffer in module.named_buffers(recurse=False):
            result.register_buffer(key, copy.deepcopy(buffer, memo), persistent=module.is_persistent(key))
        for key, child in module.named_children():
            if isinstance(child, QATController):
                delattr(result, key)
            else:
                result.add_module(key, _int8_copy(child, f"{name}.{key}" if name else key, memo, requantization))
    memo[id(module)] = result
    return result


def convert_eager_model(qat_model: Module, requantization: Requantization) -> Module:
    """The int8 model of eager-mode QAT model ``qat_model`` (module docstring): a copy of its
    module tree sharing no Parameter or buffer with it, each enabled QAT layer replaced by its
    :class:`Int8Island`, a layer switched off at run time by copies of its float layers, a
    layer with a quantizer switched off by a copy of itself (its float simulation), no QAT
    controller. In eval mode; calling it on float inputs returns float outputs."""
    controller = controller_of(qat_model)
    converted = _int8_copy(qat_model, "", {}, requantization)
    converted.remove_hook(controller.step_hook)
    return converted.eval()
