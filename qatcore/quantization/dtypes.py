"""Integer types for quantized values: bit width, signedness and narrow range.

    signed n-bit:   [-2^(n-1), 2^(n-1) - 1]
    narrow signed:  [-(2^(n-1) - 1), 2^(n-1) - 1]     (symmetric around 0; weights)
    unsigned n-bit: [0, 2^n - 1]

>>> INT8.qmin, INT8.qmax, INT8_NARROW.qmin, UINT8.qmax
(-128, 127, -127, 255)
>>> QuantDType(4, signed=False)
QuantDType(uint4)
"""

from __future__ import annotations

from dataclasses import dataclass

from qatcore.errors import ConfigError

__all__ = ["QuantDType", "INT8", "INT8_NARROW", "UINT8", "INT4", "INT4_NARROW", "UINT4", "named_dtype"]

MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class QuantDType:
    """An integer type of ``bits`` bits (2 to 16), signed or not, optionally narrow."""

    bits: int
    signed: bool = True
    narrow_range: bool = False

    def __post_init__(self) -> None:
        if type(self.bits) is not int or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"QuantDType.bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if type(self.signed) is not bool:
            raise ConfigError(f"QuantDType.signed must be True or False, got {self.signed!r}")
        if type(self.narrow_range) is not bool:
            raise ConfigError(f"QuantDType.narrow_range must be True or False, got {self.narrow_range!r}")
        if self.narrow_range and not self.signed:
            raise ConfigError("QuantDType.narrow_range applies to signed types only (unsigned ranges start at 0)")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}{'_narrow' if self.narrow_range else ''}"

    def __repr__(self) -> str:
        return f"QuantDType({self.name})"


INT8 = QuantDType(8, True)
INT8_NARROW = QuantDType(8, True, narrow_range=True)
UINT8 = QuantDType(8, False)
INT4 = QuantDType(4, True)
INT4_NARROW = QuantDType(4, True, narrow_range=True)
UINT4 = QuantDType(4, False)

_NAMED = {d.name: d for d in (INT8, INT8_NARROW, UINT8, INT4, INT4_NARROW, UINT4)}


def named_dtype(name: str) -> QuantDType:
    """A preset by name: int8, int8_narrow, uint8, int4, int4_narrow, uint4."""
    if name not in _NAMED:
        raise ConfigError(f"unknown quantized dtype {name!r}; the presets are {sorted(_NAMED)}")
    return _NAMED[name]
