"""``BlockFakeQuantize``: the quantizer of the dynamic schemes (per group, per token,
absmean), whose scale comes from each call's values instead of an observer.

It is a :class:`~qatcore.quantization.fake_quantize_module.FakeQuantize` for everything
around it (the enable switches, the QAT controller, statistics, checkpoints), with three
differences:

- no observer (``observer`` is None): its scale (and zero point) are computed from the
  values on every forward, in training and in eval alike (torchao's ``IntxFakeQuantizer``:
  ``docs/numerics.md``, "Per-group and per-token fake quantization");
- ``spec.learnable == "lsq"`` (per group, symmetric only): the group scales are a Parameter
  ``scale`` of one entry per group, initialised on the first forward to the dynamic scales
  of that call (so an untrained LSQ quantizer computes what the dynamic one computes, except
  in a group whose scale is below the learned scales' floor, float32's epsilon) and
  then trained by the LSQ gradient: the weight's groups are the rows of a
  ``(numel / group_size, group_size)`` view, quantized per channel along its axis 0;
- it has no single ``QParams`` (:meth:`calculate_qparams` refuses); :meth:`block_qparams`
  gives the scales, zero points and integers of given values, for statistics.

``convert_to_quantized`` turns a layer with these weights into the low-bit runtime's
packed layers (:mod:`qatcore.quantization.lowbit`); the ONNX export of the QAT model itself
refuses them (:func:`refuse_dynamic_quantizers`), naming the quantizer.

>>> import numpy as np
>>> from qatcore.quantization.config import QuantizationConfig
>>> fq = make_fake_quantize(QuantizationConfig.int8_dynamic_activation_int4_weight().weight, "fc.weight")
>>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
>>> scale, zero_point, q = fq.block_qparams(w)     # one scale per group of 32 input features
>>> scale.shape, q.shape, int(np.abs(q).max())     # (rows, groups, 1); |q| <= 8
((2, 1, 1), (2, 32), 7)
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter
from qatcore.quantization.config import QuantSpec
from qatcore.quantization.fake_quantize import default_grad_factor, fake_quantize_learnable
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.group_token_fake_quantize import (
    BlockFakeQuantizeFunction,
    TernaryFakeQuantizeFunction,
    _check,
    _fake_quantize,
    _fake_quantize_ternary,
    absmean_scale,
    group_qparams,
    token_qparams,
)
from qatcore.quantization.qparams import FLOAT32_EPS
from qatcore.tensor import Tensor

__all__ = ["BlockFakeQuantize", "make_fake_quantize", "refuse_dynamic_quantizers"]


class BlockFakeQuantize(FakeQuantize):
    """Fake quantization with qparams from each call's values (module docstring)."""

    observer = None  # dynamic: no observer

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        Module.__init__(self)
        if not isinstance(spec, QuantSpec) or not spec.scheme.dynamic:
            raise ConfigError(f"BlockFakeQuantize {name!r} needs a QuantSpec with a per-group, per-token or "
                              f"absmean scheme, got {getattr(getattr(spec, 'scheme', None), 'value', spec)!r}")
        self.spec = spec
        self.name = name
        self.recorder = None
        self.register_buffer("fake_quant_enabled", np.ones((), dtype=np.bool_))
        self.register_buffer("observer_enabled", np.zeros((), dtype=np.bool_))
        self.register_buffer("qparams_fixed", np.zeros((), dtype=np.bool_))
        # dynamic scales exist on every call; learned ones once the first call initialised them
        self.register_buffer("qparams_ready", np.array(not self.learns_scale, dtype=np.bool_))
        if self.learns_scale:
            self.scale = Parameter(np.ones(1, dtype=np.float32))
            self.register_buffer("zero_point", np.zeros(1, dtype=np.float32))
            self.mark_resizable("scale")
            self.mark_resizable("zero_point")

    @property
    def dynamic(self) -> bool:
        """Always True here: the scale follows the values (or, LSQ, is learned per group)."""
        return True

    @property
    def group_size(self) -> int | None:
        return self.spec.group_size

    @property
    def qrange(self) -> tuple[int, int]:
        """The integer grid: torchao's signed ``[-2^(b-1), 2^(b-1) - 1]``, or ternary {-1, 0, 1}."""
        if self.spec.scheme.absmean:
            return -1, 1
        half = 2 ** (self.spec.bits - 1)
        return -half, half - 1

    def enable_observer(self, enabled: bool = True) -> BlockFakeQuantize:
        """Nothing to observe: the switch is kept (the QAT controller sets it) and has no effect."""
        self.observer_enabled.data[...] = enabled
        return self

    def calculate_qparams(self):
        raise ConfigError(f"BlockFakeQuantize {self.name!r} ({self.spec.scheme.value}) has no single QParams: its "
                          f"scales follow each call's values; use block_qparams(x)")

    # ---- values ----------------------------------------------------------------------------
    def _check_input(self, array: np.ndarray) -> None:
        _check(f"{self.name or 'BlockFakeQuantize'} ({self.spec.scheme.value})", array, self.group_size,
               self.spec.bits, True)

    def block_qparams(self, x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scale, zero_point, integers) the quantizer uses on ``x``: one scale and zero point
        per block (shape ``(..., blocks, 1)``; one block per row for per token, one for the
        whole tensor for per-tensor absmean), and ``x``'s integers in ``x``'s shape."""
        array = np.asarray(x.data if isinstance(x, Tensor) else x)
        self._check_input(array)
        spec, (qmin, qmax) = self.spec, self.qrange
        size = array.size if spec.scheme.absmean and self.group_size is None else (
            array.shape[-1] if spec.scheme.per_token else self.group_size)
        blocks = array.reshape(-1, size) if spec.scheme.absmean and self.group_size is None else array.reshape(
            *array.shape[:-1], array.shape[-1] // size, size)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if spec.scheme.absmean:
                scale = absmean_scale(blocks)[..., None]
                zero_point = np.zeros_like(scale)
            elif self.learns_scale and bool(self.qparams_ready.data):
                scale = np.maximum(self.scale.data, FLOAT32_EPS).reshape(*blocks.shape[:-1], 1)
                zero_point = np.zeros_like(scale)
            else:
                rule = token_qparams if spec.scheme.per_token else group_qparams
                scale, zero_point = rule(blocks, spec.bits, spec.scheme.symmetric)
                scale, zero_point = scale[..., None], zero_point[..., None]
            if spec.scheme.absmean:  # x / s, as the ternary rule divides
                integers = np.clip(np.rint(blocks / scale), qmin, qmax)
            else:  # x * (1 / s), as torchao's rule multiplies
                integers = np.clip(np.rint(blocks * (1 / scale)) + zero_point, qmin, qmax)
        integers = np.nan_to_num(integers).astype(np.int32).reshape(array.shape)
        return scale, zero_point, integers

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x):
        array = x.data if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
        recorder = self.recorder
        sampling = recorder is not None and self.training and recorder[0].sampling
        if not bool(self.fake_quant_enabled.data):
            if sampling:
                recorder[0].record_forward(self, recorder[1], array, None)
            return x
        self._check_input(array)
        on_backward = recorder[0].backward_callback(self, recorder[1]) if sampling else None
        spec = self.spec
        if self.learns_scale:
            y = self._learned(x, array, on_backward)
        elif not isinstance(x, Tensor):
            y = (_fake_quantize_ternary(array, self.group_size)[0] if spec.scheme.absmean
                 else _fake_quantize(array, self.group_size, spec.bits, spec.scheme.symmetric)[0])
        elif spec.scheme.absmean:
            y = TernaryFakeQuantizeFunction.apply(x, group_size=self.group_size, on_backward=on_backward)
        else:
            y = BlockFakeQuantizeFunction.apply(x, group_size=self.group_size, bits=spec.bits,
                                                symmetric=spec.scheme.symmetric, on_backward=on_backward)
        if sampling:
            recorder[0].record_forward(self, recorder[1], array, y.data if isinstance(y, Tensor) else y)
        return y

    def _learned(self, x, array: np.ndarray, on_backward):
        """LSQ on the groups: rows of a (numel / group_size, group_size) view, per channel on axis 0."""
        g = self.group_size
        if not bool(self.qparams_ready.data):  # the first call's dynamic scales (Parameter keeps identity)
            scale, _ = group_qparams(array.reshape(-1, g).astype(np.float32), self.spec.bits, True)
            self.scale.data = scale.astype(np.float32)
            self.zero_point.data = np.zeros(scale.shape, np.float32)
            self.scale.grad = None
            self.qparams_ready.data[...] = True
        elif self.scale.data.size * g != array.size:
            raise ConfigError(f"BlockFakeQuantize {self.name!r}: its {self.scale.data.size} learned group scales "
                              f"were made for {self.scale.data.size * g} values, got shape {array.shape}")
        np.maximum(self.scale.data, FLOAT32_EPS, out=self.scale.data)  # a learned scale stays positive
        qmin, qmax = self.qrange
        tensor = x if isinstance(x, Tensor) else Tensor._from_array(array, False)
        grad_factor = self.spec.grad_factor or default_grad_factor(array.size, qmax)
        rows = tensor.reshape(-1, g)
        y = fake_quantize_learnable(rows, self.scale, self.zero_point, qmin, qmax, 0, grad_factor, on_backward)
        y = y.reshape(*array.shape)
        return y if isinstance(x, Tensor) else y.data

    def extra_repr(self) -> str:
        spec = self.spec
        group = f", group_size={spec.group_size}" if spec.group_size else ""
        return (f"{spec.dtype.name}, {spec.scheme.value}{group}, learnable={spec.learnable}, "
                f"fake_quant={bool(self.fake_quant_enabled.data)}")


def make_fake_quantize(spec: QuantSpec, name: str = "") -> FakeQuantize:
    """The quantizer of ``spec``: a :class:`BlockFakeQuantize` for a dynamic scheme, else an
    observing :class:`FakeQuantize`."""
    if isinstance(spec, QuantSpec) and spec.scheme.dynamic:
        return BlockFakeQuantize(spec, name)
    return FakeQuantize(spec, name)


def refuse_dynamic_quantizers(modules: Iterable[tuple[str, Module]], what: str) -> None:
    """Raise ``ConfigError`` naming the first dynamic quantizer: ``what`` (the ONNX export of a
    QAT model) holds per-tensor and per-channel grids only; the converted model holds the rest."""
    for name, module in modules:
        if isinstance(module, BlockFakeQuantize):
            raise ConfigError(
                f"{what}: quantizer {name!r} uses {module.spec.scheme.value} ({module.spec.dtype.name}"
                f"{f', group_size={module.group_size}' if module.group_size else ''}); a QAT model's QDQ form "
                f"holds per-tensor and per-channel grids only, not the low-bit per-group, per-token or ternary "
                f"schemes; convert it first (convert_to_quantized packs the low-bit weights) and export the "
                f"converted model")
