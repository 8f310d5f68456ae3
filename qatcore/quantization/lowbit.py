"""The low-bit arithmetic: packed 2- and 4-bit weights with per-group scales, and the
products that a QAT model's eval and its converted model both compute
(docs/numerics.md, "Low-bit conversion").

A weight quantized per group (per-group symmetric or affine, ternary absmean) is kept as its
integers ``q``, packed (``kernels.lowbit_pack``: two's complement, ``8 / bits`` to a byte,
element ``k`` at bit ``(k % (8 / bits)) * bits`` of byte ``k // (8 / bits)``, ONNX's INT4
order), with one float32 scale ``s`` (and, affine, an int32 zero point ``z``) per group of
``group_size`` input features; a per-tensor scale (ternary without groups) is one group of a
whole row, the same scale in every row. The weight it stands for is the fake-quantized one,
element for element:

    w[n, k] = (q[n, k] - z[n, g]) * s[n, g]          g = k // group_size   (float32)

A Linear on rows ``x[m, :]`` computes the real-valued product of its fake-quantized operands,
summed exactly or in float64, and rounded to float32 once:

    float activations (weight only)
        y[m, n] = float32( sum_g s[n, g] * sum_{k in g} x[m, k] * (q[n, k] - z[n, g]) )      (float64)
    dynamic int8 activations: each row quantized per token, x ~ (xq[m, k] - zx[m]) * sx[m]
        isum[m, n, g] = sum_{k in g} (xq[m, k] - zx[m]) * q[n, k]                        (exact integers)
        y[m, n] = float32( sx[m] * sum_g s[n, g] * isum[m, n, g] )   (float64, groups in order)

then ``+ b[n]`` in float32. The weight-only sum's order inside the kernel is the kernel's
(vectorised); every row's result depends on that row and the weights only, so a batch and
a single token agree bit for bit. ``xq``, ``zx``, ``sx`` are exactly the integers and qparams
of the per-token fake quantization (:func:`quantize_tokens`), so ``y`` is the product of
``fq(x)`` and ``fq(W)`` that the training forward computes with float32 BLAS, up to that
forward's float32 rounding.

The QAT layers compute this in eval without gradients and the converted model's modules
compute it on the packed weights, through the same kernels: the converted model equals the
QAT model's eval bit for bit.

>>> import numpy as np
>>> from qatcore.quantization.config import QuantizationConfig
>>> from qatcore.quantization.block_fake_quantize import make_fake_quantize
>>> spec = QuantizationConfig.int8_dynamic_activation_int4_weight(group_size=4)
>>> w = np.array([[0.7, -0.1, 0.2, 0.0, 1.0, 0.5, -0.25, 0.0]], np.float32)
>>> weight = lowbit_weight(make_fake_quantize(spec.weight), w, "fc")
>>> weight.packed.shape, weight.scale.shape                  # 8 int4 values in 4 bytes, 2 groups
((1, 4), (1, 2))
>>> weight.integers().tolist()            # s = max|w| / 7.5 per group: 7.5 rounds to 8, clamps to 7
[[7, -1, 2, 0, 7, 4, -2, 0]]
>>> x = np.array([[1.0, 2.0, 0.0, -1.0, 0.5, 0.5, 0.5, 0.5]], np.float32)
>>> y = lowbit_linear(x, weight, None, None)  # float activations: x . fq(w), in float64, rounded once
>>> bool(np.isclose(y[0, 0], (7 - 2) * 0.7 / 7.5 + 0.5 * (7 + 4 - 2) / 7.5))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qatcore import kernels
from qatcore.errors import ConfigError, ShapeError
from qatcore.quantization.block_fake_quantize import BlockFakeQuantize

__all__ = ["LowBitWeight", "TokenQuantization", "lowbit_weight", "lowbit_linear", "quantize_tokens",
           "dequantize_rows", "storage_bits"]


def storage_bits(bits: int, where: str) -> int:
    """The packed width of a ``bits``-bit grid: 2 for 2-bit (and ternary), 4 for 3 and 4 bits;
    wider grids are refused (per-channel int8 is the int8 runtime's)."""
    if bits == 2:
        return 2
    if bits in (3, 4):
        return 4
    raise ConfigError(f"{where}: low-bit conversion packs 2-, 3- and 4-bit weights, got {bits}-bit per-group "
                      f"weights; quantize 8-bit weights per channel (QuantizationConfig.weights_only) instead")


@dataclass(frozen=True)
class TokenQuantization:
    """Per-token dynamic quantization of a layer's input: ``bits`` on torchao's signed grid
    ``[-2^(bits-1), 2^(bits-1) - 1]``, affine or symmetric (docs/numerics.md)."""

    bits: int
    symmetric: bool

    @classmethod
    def of(cls, quantizer) -> TokenQuantization | None:
        """The per-token quantization ``quantizer`` applies, or None: no quantizer, or one switched off."""
        if not isinstance(quantizer, BlockFakeQuantize) or not bool(quantizer.fake_quant_enabled.data):
            return None
        return cls(int(quantizer.spec.bits), bool(quantizer.spec.scheme.symmetric))


@dataclass(frozen=True, eq=False)
class LowBitWeight:
    """A (out_features, in_features) weight as packed integers and per-group qparams (module
    docstring): ``packed`` uint8 (N, ceil(K * storage / 8)), ``scale`` float32 (N, K / group_size),
    ``zero_point`` int32 of the scale's shape or None (symmetric)."""

    packed: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    group_size: int
    in_features: int

    @property
    def storage(self) -> int:
        return storage_bits(self.bits, "LowBitWeight")

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def integers(self) -> np.ndarray:
        """The unpacked integers q, int8 (N, K)."""
        return kernels.lowbit_pack.unpack_lowbit(self.packed, self.storage, self.in_features)

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``(q - z) * s``: the fake-quantized weight, bit for bit."""
        q = self.integers().astype(np.float32).reshape(self.out_features, -1, self.group_size)
        if self.zero_point is not None:
            q = q - self.zero_point.astype(np.float32)[..., None]
        return (q * self.scale[..., None]).reshape(self.out_features, self.in_features)


def lowbit_weight(quantizer: BlockFakeQuantize, weight: np.ndarray, name: str) -> LowBitWeight:
    """Pack ``weight`` (N, K) as ``quantizer`` (per group or absmean) quantizes it now."""
    where = f"layer {name!r}"
    if not isinstance(quantizer, BlockFakeQuantize) or quantizer.spec.scheme.per_token:
        raise ConfigError(f"{where}: low-bit weights need a per-group or absmean weight quantizer")
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise ShapeError(f"{where}: low-bit weights are float32 (out_features, in_features) matrices, got "
                         f"{weight.dtype} {weight.shape}")
    bits = storage_bits(int(quantizer.spec.bits), where)
    scale, zero_point, q = quantizer.block_qparams(weight)
    n, k = weight.shape
    group_size = quantizer.group_size or k  # per tensor: one group a row, the same scale in each
    groups = k // group_size
    scale = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1, groups), (n, groups))
    symmetric = quantizer.spec.scheme.symmetric or quantizer.spec.scheme.absmean
    zero = None if symmetric else np.broadcast_to(np.asarray(zero_point).reshape(-1, groups), (n, groups))
    return LowBitWeight(kernels.lowbit_pack.pack_lowbit(q, bits), np.ascontiguousarray(scale),
                        None if zero is None else np.ascontiguousarray(zero, dtype=np.int32),
                        int(quantizer.spec.bits), int(group_size), int(k))


def quantize_tokens(x: np.ndarray, activation: TokenQuantization) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xq int8, zx int32, sx float32) of each row of ``x`` (M, K): the integers and qparams of
    the per-token fake quantization, bit for bit."""
    return kernels.lowbit_gemm.quantize_per_token(x, activation.bits, activation.symmetric)


def lowbit_linear(x: np.ndarray, weight: LowBitWeight, bias: np.ndarray | None,
                  activation: TokenQuantization | None, name: str = "") -> np.ndarray:
    """``x (..., K) -> y (..., N)`` float32 (module docstring): weight only when ``activation`` is
    None, else each row of ``x`` quantized per token first."""
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] != weight.in_features:
        raise ShapeError(f"layer {name!r}: expected inputs (..., {weight.in_features}), got shape {x.shape}")
    rows = np.ascontiguousarray(x.reshape(-1, weight.in_features), dtype=np.float32)
    bias = None if bias is None or not np.size(bias) else np.ascontiguousarray(bias, np.float32)
    if activation is None:
        y = kernels.lowbit_gemm.weight_only_lowbit_gemm(rows, weight.packed, weight.storage, weight.scale,
                                                         weight.zero_point, weight.group_size, bias)
    else:
        if weight.zero_point is not None:
            raise ConfigError(f"layer {name!r}: integer products need symmetric weights (no zero point) "
                              f"under per-token activations; use a per_group_symmetric weight spec")
        xq, zx, sx = quantize_tokens(rows, activation)
        y = kernels.lowbit_gemm.dynamic_int8_lowbit_gemm(xq, zx, sx, weight.packed, weight.storage, weight.scale,
                                                          weight.group_size, bias)
    return y.reshape(*x.shape[:-1], weight.out_features)


def dequantize_rows(weight: LowBitWeight, indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` of the dequantized table, (*indices.shape, K) float32: an embedding
    lookup of the fake-quantized table, bit for bit, unpacking only the rows it reads."""
    flat = np.asarray(indices).reshape(-1)
    packed = weight.packed[flat]
    q = kernels.lowbit_pack.unpack_lowbit(packed, weight.storage, weight.in_features).astype(np.float32)
    q = q.reshape(len(flat), -1, weight.group_size)
    if weight.zero_point is not None:
        q = q - weight.zero_point[flat].astype(np.float32)[..., None]
    rows = q * weight.scale[flat][..., None]
    return rows.reshape(*np.shape(indices), weight.in_features)
