"""Quantization configuration: immutable, validated when built.

A :class:`QuantSpec` says how one kind of tensor (weights or activations) is
quantized: the integer type, the scheme and axis, the observer that picks the
range, and whether scale (and zero point) are fixed by the observer or learned
(LSQ, LSQ+). A :class:`QuantizationConfig` pairs a weight spec with an
activation spec and a mode (what gets quantized).

Every field is checked in ``__post_init__``; an error names the field and the
accepted values, so a typo in a config file fails loudly and at once.

>>> config = QuantizationConfig()            # the default 8-bit config
>>> config.weight.dtype, config.weight.scheme.value, config.activation.dtype
(QuantDType(int8_narrow), 'per_channel_symmetric', QuantDType(uint8))
>>> QuantSpec(bits=1)
Traceback (most recent call last):
...
qatcore.errors.ConfigError: QuantSpec.bits must be an int in [2, 16], got 1
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping

from qatcore.errors import ConfigError
from qatcore.quantization.dtypes import QuantDType
from qatcore.quantization.qscheme import QScheme

__all__ = ["QuantMode", "ObserverKind", "Learnable", "Requantization", "QuantSpec", "QuantizationConfig",
           "OBSERVER_OPTIONS", "LEARNABLE_MODES"]


class QuantMode(enum.Enum):
    """What a layer quantizes."""

    WEIGHTS_AND_ACTIVATIONS = "weights_and_activations"
    WEIGHTS_ONLY = "weights_only"
    ACTIVATIONS_ONLY = "activations_only"

    @property
    def weights(self) -> bool:
        return self is not QuantMode.ACTIVATIONS_ONLY

    @property
    def activations(self) -> bool:
        return self is not QuantMode.WEIGHTS_ONLY


class ObserverKind(str, enum.Enum):
    """How an observer picks the range (a str enum: ``"minmax"`` compares equal to
    ``ObserverKind.MINMAX``, so configs keep their strings)."""

    MINMAX = "minmax"
    MOVING_AVERAGE_MINMAX = "moving_average_minmax"
    HISTOGRAM = "histogram"
    MSE = "mse"

    def __str__(self) -> str:
        return self.value


class Learnable(str, enum.Enum):
    """Whether scale and zero point are set by the observer or learned (a str enum, like
    ``ObserverKind``): ``FIXED``, ``LSQ`` (learned scale, zero point 0) or ``LSQ_PLUS``
    (learned scale and zero point)."""

    FIXED = "fixed"
    LSQ = "lsq"
    LSQ_PLUS = "lsq+"

    def __str__(self) -> str:
        return self.value


class Requantization(str, enum.Enum):
    """The arithmetic that rescales an integer accumulator to an output grid, in the int8 model
    and in the QAT model's eval forward alike (docs/numerics.md, "Two requantization
    arithmetics"; a str enum like ``ObserverKind``):

    * ``FIXED_POINT`` (the default): integers only, an int32 multiplier and a shift
      (gemmlowp/TFLite style, with qatcore's headroom shift);
    * ``FLOAT32``: ONNX Runtime's CPU arithmetic: a float32 multiplier computed from the
      float32 scales as ONNX Runtime computes it, a float32 product, round half to even,
      saturate. The int8 model then equals ONNX Runtime on the exported file bit for bit.
    """

    FIXED_POINT = "fixed_point"
    FLOAT32 = "float32"

    def __str__(self) -> str:
        return self.value


# Observer kinds and the options each accepts (with their defaults).
OBSERVER_OPTIONS: Mapping[ObserverKind, Mapping[str, Any]] = MappingProxyType({
    ObserverKind.MINMAX: MappingProxyType({}),
    ObserverKind.MOVING_AVERAGE_MINMAX: MappingProxyType({"averaging_constant": 0.01}),
    ObserverKind.HISTOGRAM: MappingProxyType({"bins": 2048, "percentile": 99.99}),
    ObserverKind.MSE: MappingProxyType({"bins": 2048, "candidates": 100}),
})
LEARNABLE_MODES = tuple(mode.value for mode in Learnable)


def _enum_field(owner: str, name: str, value: Any, kind: type[enum.Enum]) -> enum.Enum:
    """``value`` as a member of ``kind`` (from the member or its string)."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{owner}.{name} must be one of {[m.value for m in kind]}, got {value!r}") from None


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one kind of tensor.

    Fields:
        bits: 2..16.  signed: signed or unsigned integers.  narrow_range: signed
            range without its most negative value (symmetric around 0).
        scheme: a QScheme (or its string value).  axis: the channel axis of a
            per-channel scheme (default 0, the output channel of a weight).
        observer: an ObserverKind (or its string): "minmax", "moving_average_minmax",
            "histogram" or "mse"; observer_options: that observer's options (see OBSERVER_OPTIONS).
        learnable: a Learnable (or its string): "fixed" (the observer sets the scale), "lsq"
            (learned scale, zero point 0; symmetric schemes only) or "lsq+" (learned scale and
            zero point; affine schemes only).
        grad_factor: the LSQ gradient scale; None means 1 / sqrt(numel * qmax).
        ignore_nan: drop NaN/Inf when observing instead of raising an error.
        group_size: elements per group along the last axis, for the per-group schemes
            (None for every other scheme).

    The dynamic schemes (per group, per token, absmean: ``QScheme.dynamic``) compute their
    scale from each call's values: they use no observer (``observer`` must be left at
    "minmax" or the default, and is stored as "minmax"), their grid is the signed
    ``[-2^(bits-1), 2^(bits-1) - 1]`` of torchao's ``torch.int{bits}`` (bits 2 to 8, not
    narrow), except absmean's ternary ``{-1, 0, 1}`` (bits 2, signed, narrow range). Of
    them only ``per_group_symmetric`` may learn its scales (``learnable="lsq"``).
    """

    bits: int = 8
    signed: bool = False
    narrow_range: bool = False
    scheme: QScheme = QScheme.PER_TENSOR_AFFINE
    axis: int | None = None
    observer: ObserverKind = ObserverKind.MOVING_AVERAGE_MINMAX
    observer_options: Mapping[str, Any] = field(default_factory=dict)
    learnable: Learnable = Learnable.FIXED
    grad_factor: float | None = None
    ignore_nan: bool = False
    group_size: int | None = None

    def __post_init__(self) -> None:
        owner = "QuantSpec"
        if isinstance(self.scheme, str):
            try:
                object.__setattr__(self, "scheme", QScheme(self.scheme))
            except ValueError:
                raise ConfigError(
                    f"{owner}.scheme must be one of {[s.value for s in QScheme]}, got {self.scheme!r}"
                ) from None
        if not isinstance(self.scheme, QScheme):
            raise ConfigError(f"{owner}.scheme must be a QScheme, got {self.scheme!r}")
        if type(self.bits) is not int or not 2 <= self.bits <= 16:
            raise ConfigError(f"{owner}.bits must be an int in [2, 16], got {self.bits!r}")
        self.dtype  # noqa: B018 - validates signed/narrow_range through QuantDType
        if self.scheme.per_channel:
            axis = 0 if self.axis is None else self.axis
            if type(axis) is not int or axis < 0:
                raise ConfigError(f"{owner}.axis must be a non-negative int for {self.scheme.value}, got {axis!r}")
            object.__setattr__(self, "axis", axis)
        elif self.axis is not None:
            raise ConfigError(f"{owner}.axis must be None for {self.scheme.value}, got {self.axis!r}")
        object.__setattr__(self, "observer", _enum_field(owner, "observer", self.observer, ObserverKind))
        self._check_dynamic(owner)
        if not isinstance(self.observer_options, Mapping):
            raise ConfigError(f"{owner}.observer_options must be a mapping, got {type(self.observer_options).__name__}")
        accepted = OBSERVER_OPTIONS[self.observer]
        unknown = sorted(set(self.observer_options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{owner}.observer_options: {unknown} not accepted by observer {self.observer.value!r}; "
                f"it accepts {sorted(accepted) or 'no options'}"
            )
        options = {**accepted, **self.observer_options}
        _validate_observer_options(owner, self.observer, options)
        object.__setattr__(self, "observer_options", MappingProxyType(options))
        object.__setattr__(self, "learnable", _enum_field(owner, "learnable", self.learnable, Learnable))
        if self.learnable is Learnable.LSQ and not self.scheme.symmetric:
            raise ConfigError(f"{owner}.learnable 'lsq' learns the scale with the zero point held at 0, which an "
                              f"affine scheme ({self.scheme.value}) would not give; use a symmetric scheme "
                              f"(unsigned for values >= 0, as after a ReLU) or learnable 'lsq+'")
        if self.learnable is Learnable.LSQ_PLUS and self.scheme.symmetric:
            raise ConfigError(f"{owner}.learnable 'lsq+' learns a zero point; it needs an affine scheme, "
                              f"not {self.scheme.value}")
        if self.grad_factor is not None and not (
            isinstance(self.grad_factor, (int, float)) and math.isfinite(self.grad_factor) and self.grad_factor > 0
        ):
            raise ConfigError(f"{owner}.grad_factor must be None or a positive number, got {self.grad_factor!r}")
        if type(self.ignore_nan) is not bool:
            raise ConfigError(f"{owner}.ignore_nan must be True or False, got {self.ignore_nan!r}")
        if (self.scheme.dynamic and self.learnable is not Learnable.FIXED
                and self.scheme is not QScheme.PER_GROUP_SYMMETRIC):
            raise ConfigError(f"{owner}.learnable {self.learnable.value!r}: of the dynamic schemes only "
                              f"per_group_symmetric learns its scales (lsq); {self.scheme.value} computes them "
                              f"from each call's values")

    def _check_dynamic(self, owner: str) -> None:
        """The group size and the grid and observer of the dynamic schemes (class docstring)."""
        scheme = self.scheme
        if scheme.grouped:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ConfigError(f"{owner}.group_size must be a positive int for {scheme.value}, "
                                  f"got {self.group_size!r}")
        elif self.group_size is not None:
            raise ConfigError(f"{owner}.group_size must be None for {scheme.value} (it is for the per-group "
                              f"schemes), got {self.group_size!r}")
        if not scheme.dynamic:
            return
        if scheme.absmean:
            if (self.bits, self.signed, self.narrow_range) != (2, True, True):
                raise ConfigError(f"{owner}: {scheme.value} is the ternary grid {{-1, 0, 1}}: it needs bits=2, "
                                  f"signed=True, narrow_range=True, got bits={self.bits}, signed={self.signed}, "
                                  f"narrow_range={self.narrow_range}")
        elif not (self.bits <= 8 and self.signed and not self.narrow_range):
            raise ConfigError(f"{owner}: {scheme.value} uses the signed grid [-2^(bits-1), 2^(bits-1) - 1] "
                              f"(torchao's): it needs bits from 2 to 8, signed=True, narrow_range=False, got "
                              f"bits={self.bits}, signed={self.signed}, narrow_range={self.narrow_range}")
        if self.observer not in (ObserverKind.MINMAX, ObserverKind.MOVING_AVERAGE_MINMAX) or self.observer_options:
            raise ConfigError(f"{owner}.observer: {scheme.value} computes its scale from each call's values and "
                              f"uses no observer; leave observer at 'minmax' (got {self.observer.value!r}"
                              f"{' with options' if self.observer_options else ''})")
        object.__setattr__(self, "observer", ObserverKind.MINMAX)

    def __hash__(self) -> int:
        options = tuple(sorted(self.observer_options.items()))
        return hash((self.bits, self.signed, self.narrow_range, self.scheme, self.axis, self.observer,
                     options, self.learnable, self.grad_factor, self.ignore_nan, self.group_size))

    @property
    def dtype(self) -> QuantDType:
        try:
            return QuantDType(self.bits, self.signed, self.narrow_range)
        except ConfigError as e:
            raise ConfigError(str(e).replace("QuantDType", "QuantSpec")) from None

    @property
    def qmin(self) -> int:
        return self.dtype.qmin

    @property
    def qmax(self) -> int:
        return self.dtype.qmax

    def replace(self, **changes) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError(f"QuantSpec has no fields {unknown}; fields are {[f.name for f in fields(self)]}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["scheme"] = self.scheme.value
        data["observer"] = self.observer.value
        data["learnable"] = self.learnable.value
        data["observer_options"] = dict(self.observer_options)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "QuantSpec") -> QuantSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping of fields, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown fields {unknown}; fields are {names}")
        try:
            return cls(**dict(data))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _validate_observer_options(owner: str, observer: str, options: dict) -> None:
    for key, value in options.items():
        where = f"{owner}.observer_options[{key!r}]"
        if key == "averaging_constant" and not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise ConfigError(f"{where} must be in (0, 1], got {value!r}")
        if key in ("bins", "candidates") and not (type(value) is int and 8 <= value <= 1 << 16):
            raise ConfigError(f"{where} must be an int in [8, 65536], got {value!r}")
        if key == "percentile" and not (isinstance(value, (int, float)) and 50 < value <= 100):
            raise ConfigError(f"{where} must be in (50, 100], got {value!r}")


def _default_weight() -> QuantSpec:
    return QuantSpec(bits=8, signed=True, narrow_range=True, scheme=QScheme.PER_CHANNEL_SYMMETRIC, axis=0,
                     observer="minmax")


def _default_activation() -> QuantSpec:
    return QuantSpec(bits=8, signed=False, scheme=QScheme.PER_TENSOR_AFFINE, observer="moving_average_minmax")


@dataclass(frozen=True)
class QuantizationConfig:
    """A weight spec, an activation spec, a mode and the requantization arithmetic. No
    arguments: the default 8-bit config (int8 narrow per-channel symmetric weights, uint8
    per-tensor affine activations with a moving-average observer, fixed-point requantization).

    ``requantization`` is one setting per model (a layer-wise override must keep the global
    one): ``"fixed_point"`` or ``"float32"`` (:class:`Requantization`).

    Two optional specs, for transformers (None: left float, the default):

    - ``embedding``: the weights of ``Embedding`` layers (a per-group or absmean scheme,
      groups along the embedding dimension); the lookup returns the fake-quantized rows.
    - ``attention``: the inputs of the attention matmuls of
      ``F.scaled_dot_product_attention``: q, k, v and the softmax probabilities, one
      quantizer each (per token: each row over the head dimension, and each row of the
      probabilities; or per tensor, observed).

    With a per-token (dynamic) ``activation`` spec, activations are quantized where
    torchao's ``Int8DynActInt4WeightQATQuantizer`` quantizes them: at the input of every
    quantized layer, and nowhere else (no output quantizers).
    """

    weight: QuantSpec = field(default_factory=_default_weight)
    activation: QuantSpec = field(default_factory=_default_activation)
    mode: QuantMode = QuantMode.WEIGHTS_AND_ACTIVATIONS
    requantization: Requantization = Requantization.FIXED_POINT
    embedding: QuantSpec | None = None
    attention: QuantSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "requantization",
                           _enum_field("QuantizationConfig", "requantization", self.requantization, Requantization))
        if isinstance(self.mode, str):
            try:
                object.__setattr__(self, "mode", QuantMode(self.mode))
            except ValueError:
                raise ConfigError(
                    f"QuantizationConfig.mode must be one of {[m.value for m in QuantMode]}, got {self.mode!r}"
                ) from None
        if not isinstance(self.mode, QuantMode):
            raise ConfigError(f"QuantizationConfig.mode must be a QuantMode, got {self.mode!r}")
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, QuantSpec.from_dict(value, f"QuantizationConfig.{name}"))
            elif not isinstance(value, QuantSpec):
                raise ConfigError(f"QuantizationConfig.{name} must be a QuantSpec, got {type(value).__name__}")
        for name in ("embedding", "attention"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, QuantSpec.from_dict(value, f"QuantizationConfig.{name}"))
            elif value is not None and not isinstance(value, QuantSpec):
                raise ConfigError(f"QuantizationConfig.{name} must be None or a QuantSpec, got {type(value).__name__}")
        self._check_schemes()
        if self.activation.scheme.per_channel and self.activation.axis == 0:
            raise ConfigError("QuantizationConfig.activation is per channel along axis 0, the batch axis of an "
                              "activation; use a per-tensor scheme (or axis 1, the channels, in eager-mode QAT)")

    def _check_schemes(self) -> None:
        """Which scheme may quantize what (class docstring)."""
        where = "QuantizationConfig"
        if self.weight.scheme.per_token:
            raise ConfigError(f"{where}.weight: {self.weight.scheme.value} is for activations (one scale per "
                              f"token); weights use per_group, per_channel, per_tensor or absmean schemes")
        if self.activation.scheme.grouped or self.activation.scheme.absmean:
            raise ConfigError(f"{where}.activation: {self.activation.scheme.value} is for weights; dynamic "
                              f"activations are per_token_affine or per_token_symmetric")
        if self.embedding is not None and not (self.embedding.scheme.grouped or self.embedding.scheme.absmean):
            raise ConfigError(f"{where}.embedding must be a per_group or absmean spec (groups along the embedding "
                              f"dimension), got {self.embedding.scheme.value}")
        if self.attention is not None and (self.attention.scheme.per_channel or self.attention.scheme.grouped
                                           or self.attention.scheme.absmean):
            raise ConfigError(f"{where}.attention quantizes q, k, v and the softmax probabilities: a per_token or "
                              f"per_tensor spec, got {self.attention.scheme.value}")

    @property
    def dynamic_activations(self) -> bool:
        """Activations quantized per token at each quantized layer's input (class docstring)."""
        return self.mode.activations and self.activation.scheme.dynamic

    @classmethod
    def default_8bit(cls) -> QuantizationConfig:
        return cls()

    @classmethod
    def lsq_4bit_weights(cls) -> QuantizationConfig:
        """4-bit narrow symmetric per-channel weights with a learned scale (LSQ);
        8-bit activations as in the default."""
        weight = QuantSpec(bits=4, signed=True, narrow_range=True, scheme=QScheme.PER_CHANNEL_SYMMETRIC,
                           axis=0, observer="minmax", learnable="lsq")
        return cls(weight=weight)

    @classmethod
    def weights_only(cls) -> QuantizationConfig:
        """The default 8-bit weights; activations stay float."""
        return cls(mode=QuantMode.WEIGHTS_ONLY)

    @classmethod
    def int8_dynamic_activation_int4_weight(cls, group_size: int = 32) -> QuantizationConfig:
        """torchao's ``Int8DynActInt4WeightQATQuantizer``: int4 symmetric weights per group of
        ``group_size`` input features, int8 asymmetric activations per token, computed on
        every forward, at the input of each quantized layer ("8da4w")."""
        return cls(weight=_group_weight(4, group_size), activation=_token_activation(symmetric=False))

    @classmethod
    def int4_weight_only(cls, group_size: int = 128) -> QuantizationConfig:
        """int4 symmetric weights per group of ``group_size`` input features; activations
        stay float ("4w")."""
        return cls.intx_weight_only(4, group_size)

    @classmethod
    def intx_weight_only(cls, bits: int, group_size: int) -> QuantizationConfig:
        """``bits``-bit (2 to 8) symmetric weights per group; activations stay float (``2w``
        is ``intx_weight_only(2, 32)``)."""
        return cls(weight=_group_weight(bits, group_size), mode=QuantMode.WEIGHTS_ONLY)

    @classmethod
    def ternary_weight(cls, group_size: int | None = None, activations: bool = True) -> QuantizationConfig:
        """BitNet b1.58: ternary weights {-1, 0, 1} times mean(|W|) of the whole weight (or of
        each group of ``group_size`` input features), and (``activations``) int8 symmetric
        per-token activations at each layer's input, BitNet's absmax activations."""
        scheme = QScheme.PER_TENSOR_ABSMEAN if group_size is None else QScheme.PER_GROUP_ABSMEAN
        weight = QuantSpec(bits=2, signed=True, narrow_range=True, scheme=scheme, observer="minmax",
                           group_size=group_size)
        if not activations:
            return cls(weight=weight, mode=QuantMode.WEIGHTS_ONLY)
        return cls(weight=weight, activation=_token_activation(symmetric=True))

    def replace(self, **changes) -> QuantizationConfig:
        unknown = sorted(set(changes) - set(_CONFIG_FIELDS))
        if unknown:
            raise ConfigError(f"QuantizationConfig has no fields {unknown}; fields are {', '.join(_CONFIG_FIELDS)}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        data = {"weight": self.weight.to_dict(), "activation": self.activation.to_dict(), "mode": self.mode.value,
                "requantization": self.requantization.value}
        for name in ("embedding", "attention"):  # written only when set: older readers keep working
            spec = getattr(self, name)
            if spec is not None:
                data[name] = spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantizationConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"QuantizationConfig must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_CONFIG_FIELDS))
        if unknown:
            raise ConfigError(f"QuantizationConfig: unknown fields {unknown}; fields are {', '.join(_CONFIG_FIELDS)}")
        return cls(**dict(data))


_CONFIG_FIELDS = ("weight", "activation", "mode", "requantization", "embedding", "attention")


def _group_weight(bits: int, group_size: int) -> QuantSpec:
    return QuantSpec(bits=bits, signed=True, scheme=QScheme.PER_GROUP_SYMMETRIC, observer="minmax",
                     group_size=group_size)


def _token_activation(symmetric: bool) -> QuantSpec:
    scheme = QScheme.PER_TOKEN_SYMMETRIC if symmetric else QScheme.PER_TOKEN_AFFINE
    return QuantSpec(bits=8, signed=True, scheme=scheme, observer="minmax")
