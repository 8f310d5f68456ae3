"""Layer-wise quantization config: a global QuantizationConfig plus overrides.

An override is keyed by

- an exact module name (``"fc"``, ``"layer1.conv2"``),
- a glob pattern over names (``"layer*.conv1"``, ``"*.shortcut.*"``; any key with
  ``*``, ``?`` or ``[``), or
- a module type (``qatcore.nn.Linear``),

and says any of: a different QuantizationConfig, a different mode (weights and
activations / weights only / activations only), or that the layer is disabled
(it stays float). **Precedence: name > glob > type > global.** Among several
matching globs the first one listed wins; among several matching types the most
specific (closest in the class hierarchy) wins.

Every override must match at least one layer of the model it is applied to;
otherwise :meth:`LayerwiseConfig.check_matches` raises ConfigError listing the
closest layer names, so a typo never silently leaves a layer at 8 bits.

>>> from qatcore import nn
>>> from qatcore.quantization import QuantizationConfig
>>> config = LayerwiseConfig(overrides={
...     "fc": LayerOverride(enabled=False),
...     "conv*": QuantizationConfig.lsq_4bit_weights(),
...     nn.Conv2d: "weights_only",
... })
>>> config.resolve("fc", nn.Linear(2, 2)).enabled
False
>>> config.resolve("conv1", nn.Conv2d(1, 1, 1)).rule
"glob 'conv*'"
>>> config.resolve("layer1.conv1", nn.Conv2d(1, 1, 1)).config.mode.value
'weights_only'
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from qatcore import nn
from qatcore.errors import ConfigError
from qatcore.nn.module import Module
from qatcore.quantization.config import QuantizationConfig, QuantMode

__all__ = ["LayerOverride", "LayerwiseConfig", "ResolvedLayer"]

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class LayerOverride:
    """What an override changes: ``config`` (None: keep the inherited one), ``mode``
    (None: keep the config's), ``enabled`` (False: the layer stays float)."""

    config: QuantizationConfig | None = None
    mode: QuantMode | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.config is not None and not isinstance(self.config, QuantizationConfig):
            raise ConfigError(f"LayerOverride.config must be a QuantizationConfig or None, got {self.config!r}")
        if isinstance(self.mode, str):
            try:
                object.__setattr__(self, "mode", QuantMode(self.mode))
            except ValueError:
                raise ConfigError(
                    f"LayerOverride.mode must be one of {[m.value for m in QuantMode]}, got {self.mode!r}"
                ) from None
        if self.mode is not None and not isinstance(self.mode, QuantMode):
            raise ConfigError(f"LayerOverride.mode must be a QuantMode or None, got {self.mode!r}")
        if type(self.enabled) is not bool:
            raise ConfigError(f"LayerOverride.enabled must be True or False, got {self.enabled!r}")

    def apply(self, base: QuantizationConfig) -> QuantizationConfig:
        config = self.config if self.config is not None else base
        return config.replace(mode=self.mode) if self.mode is not None else config

    def to_dict(self) -> dict:
        return {"config": None if self.config is None else self.config.to_dict(),
                "mode": None if self.mode is None else self.mode.value, "enabled": self.enabled}


def _as_override(key: Any, value: Any) -> LayerOverride:
    if isinstance(value, LayerOverride):
        return value
    if isinstance(value, QuantizationConfig):
        return LayerOverride(config=value)
    if isinstance(value, (QuantMode, str)):
        return LayerOverride(mode=value)
    if value is None or value is False:
        return LayerOverride(enabled=False)
    raise ConfigError(
        f"override for {key!r}: expected a QuantizationConfig, a LayerOverride, a mode name or None/False "
        f"(disable), got {type(value).__name__}"
    )


@dataclass(frozen=True)
class ResolvedLayer:
    """The effective config of one layer and the rule that chose it."""

    config: QuantizationConfig
    enabled: bool
    rule: str


@dataclass(frozen=True)
class LayerwiseConfig:
    """A global config and overrides by name, glob and type (see the module docstring)."""

    global_config: QuantizationConfig = field(default_factory=QuantizationConfig)
    overrides: Mapping[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.global_config, QuantizationConfig):
            raise ConfigError(
                f"LayerwiseConfig.global_config must be a QuantizationConfig, got {type(self.global_config).__name__}"
            )
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"LayerwiseConfig.overrides must be a mapping, got {type(self.overrides).__name__}")
        by_name, by_glob, by_type = {}, [], []
        for key, value in self.overrides.items():
            override = _as_override(key, value)
            if override.config is not None and override.config.requantization != self.global_config.requantization:
                raise ConfigError(
                    f"LayerwiseConfig.overrides[{key!r}]: requantization is one setting per model; the override "
                    f"has {override.config.requantization.value!r}, the global config "
                    f"{self.global_config.requantization.value!r}"
                )
            if isinstance(key, type) and issubclass(key, Module):
                by_type.append((key, override))
            elif isinstance(key, str) and key:
                if _GLOB_CHARS & set(key):
                    by_glob.append((key, override))
                else:
                    by_name[key] = override
            else:
                raise ConfigError(
                    f"LayerwiseConfig.overrides key {key!r}: expected a module name, a glob pattern or a Module type"
                )
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))
        object.__setattr__(self, "_by_glob", tuple(by_glob))
        object.__setattr__(self, "_by_type", tuple(by_type))

    def __hash__(self) -> int:
        return hash((self.global_config, tuple(self.overrides)))

    @classmethod
    def from_config(cls, config: QuantizationConfig | LayerwiseConfig) -> LayerwiseConfig:
        if isinstance(config, LayerwiseConfig):
            return config
        if isinstance(config, QuantizationConfig):
            return cls(global_config=config)
        raise ConfigError(
            f"expected a QuantizationConfig or a LayerwiseConfig, got {type(config).__name__}"
        )

    def resolve(self, name: str, module: Module) -> ResolvedLayer:
        """The effective config of layer ``name`` (precedence: name > glob > type > global)."""
        if name in self._by_name:
            return self._resolved(self._by_name[name], f"name {name!r}")
        for pattern, override in self._by_glob:
            if fnmatch.fnmatchcase(name, pattern):
                return self._resolved(override, f"glob {pattern!r}")
        best = None
        for kind, override in self._by_type:
            if isinstance(module, kind):
                distance = type(module).__mro__.index(kind)
                if best is None or distance < best[0]:
                    best = (distance, kind, override)
        if best is not None:
            return self._resolved(best[2], f"type {best[1].__name__}")
        return ResolvedLayer(self.global_config, True, "global")

    def _resolved(self, override: LayerOverride, rule: str) -> ResolvedLayer:
        return ResolvedLayer(override.apply(self.global_config), override.enabled, rule)

    def check_matches(self, layers: Iterable[tuple[str, Module]]) -> None:
        """ConfigError for every override that matches none of ``layers`` (quantizable
        (name, module) pairs), listing the closest names."""
        layers = list(layers)
        names = [n for n, _ in layers]
        problems = []
        for key in self._by_name:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3, cutoff=0.4)
                problems.append(f"name {key!r} matches no layer (closest: {close or names[:5]})")
        for pattern, _ in self._by_glob:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                close = difflib.get_close_matches(pattern.replace("*", ""), names, n=3, cutoff=0.3)
                problems.append(f"glob {pattern!r} matches no layer (closest: {close or names[:5]})")
        for kind, _ in self._by_type:
            if not any(isinstance(m, kind) for _, m in layers):
                present = sorted({type(m).__name__ for _, m in layers})
                problems.append(f"type {kind.__name__} matches no layer (layer types present: {present})")
        if problems:
            raise ConfigError("layer-wise config: " + "; ".join(problems))

    # ---- dicts (config files) -------------------------------------------------------------
    def to_dict(self) -> dict:
        entries = []
        for key, value in self.overrides.items():
            override = _as_override(key, value)
            if override.config is not None and override.config.requantization != self.global_config.requantization:
                raise ConfigError(
                    f"LayerwiseConfig.overrides[{key!r}]: requantization is one setting per model; the override "
                    f"has {override.config.requantization.value!r}, the global config "
                    f"{self.global_config.requantization.value!r}"
                )
            if isinstance(key, type):
                if getattr(nn, key.__name__, None) is not key:
                    raise ConfigError(f"layer-wise config: the override for type {key.__qualname__} cannot be "
                                      f"written as a dict; only qatcore.nn layer types can (match it by name)")
                entries.append({"type": key.__name__, **override.to_dict()})
            else:
                entries.append({"match": key, **override.to_dict()})
        return {"global": self.global_config.to_dict(), "overrides": entries}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerwiseConfig:
        """From ``{"global": {...}, "overrides": [{"match": "fc" | "type": "Linear",
        "config": {...}, "mode": "...", "enabled": bool}, ...]}``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"layer-wise config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"global", "overrides"})
        if unknown:
            raise ConfigError(f"layer-wise config: unknown keys {unknown}; keys are 'global' and 'overrides'")
        global_config = QuantizationConfig.from_dict(data.get("global", {}))
        overrides: dict[Any, LayerOverride] = {}
        entries = data.get("overrides", [])
        if not isinstance(entries, list):
            raise ConfigError("layer-wise config: 'overrides' must be a list")
        for i, entry in enumerate(entries):
            where = f"overrides[{i}]"
            if not isinstance(entry, Mapping):
                raise ConfigError(f"layer-wise config: {where} must be a mapping")
            extra = sorted(set(entry) - {"match", "type", "config", "mode", "enabled"})
            if extra:
                raise ConfigError(f"layer-wise config: {where} has unknown keys {extra}")
            if ("match" in entry) == ("type" in entry):
                raise ConfigError(f"layer-wise config: {where} needs exactly one of 'match' or 'type'")
            field_name = "type" if "type" in entry else "match"
            if not isinstance(entry[field_name], str):
                raise ConfigError(f"layer-wise config: {where}.{field_name} must be a string, "
                                  f"got {entry[field_name]!r}")
            if field_name == "type":
                kind = getattr(nn, entry["type"], None)
                if not (isinstance(kind, type) and issubclass(kind, Module)):
                    raise ConfigError(f"layer-wise config: {where}.type {entry['type']!r} is not a qatcore.nn layer")
                key: Any = kind
            else:
                key = entry["match"]
            if key in overrides:
                raise ConfigError(f"layer-wise config: {where} repeats {field_name} {entry[field_name]!r}; "
                                  f"give each layer or type one entry")
            config = entry.get("config")
            overrides[key] = LayerOverride(
                config=None if config is None else QuantizationConfig.from_dict(config),
                mode=entry.get("mode"), enabled=entry.get("enabled", True),
            )
        return cls(global_config=global_config, overrides=overrides)
