"""Float32 requantization: an integer accumulator to the output grid the way ONNX Runtime does it.

The ``"float32"`` requantization arithmetic of the quantization config (docs/numerics.md,
"Two requantization arithmetics") rescales an integer accumulator with a float32 multiplier
``m`` in float32, as ONNX Runtime's CPU kernels (MLAS ``MlasRequantizeOutput``) do:

    y = clamp(rne(clamp(float32(acc) * m, lo - z_y, hi - z_y)) + z_y)

``float32(acc)`` rounds to nearest (ties to even), as a CPU's int-to-float conversion does;
the product is one float32 multiplication, rounded to nearest even; ``rne`` rounds half to
even. Clamping before or after the rounding gives the same integer (the bounds are integers),
so the float clamp only keeps a huge product from overflowing the integer conversion.

How ``m`` is computed from the scales is part of each operator's arithmetic and lives with
the operator (``qatcore.quantization.requantization``); here it is a given float32.

:func:`requantize_float32_value` is the kernels' epilogue (one value);
:func:`requantize_float32` is the NumPy form for arrays, also the oracle the tests compare
the kernels with. :func:`fma_float32` is a correctly rounded float32 fused multiply-add
(ONNX Runtime's residual add is written with FMA instructions), in NumPy;
:func:`fma_float32_value` is the same for one value in a kernel (LLVM's ``llvm.fma.f32``,
one ``vfmadd`` instruction; under ``NUMBA_DISABLE_JIT`` it calls :func:`fma_float32`).

>>> import numpy as np
>>> requantize_float32(np.array([5, 7, -5, 1000]), np.float32(0.5), 10, 0, 255)  # 2.5 -> 2, 3.5 -> 4
array([ 12,  14,   8, 255])
"""

import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["requantize_float32_value", "requantize_float32", "fma_float32", "fma_float32_value"]


@njit(cache=True)
def requantize_float32_value(acc, scale, out_zero_point, clamp_min, clamp_max):
    """One output from an integer accumulator (module docstring formula), as an int64.

    Args:
        acc: an integer of int32 range (its float32 conversion rounds to nearest even).
        scale: the float32 multiplier m.
        out_zero_point, clamp_min, clamp_max: z_y and the clamp [lo, hi].
    """
    value = np.float32(acc) * np.float32(scale)
    low = np.float32(np.int64(clamp_min) - np.int64(out_zero_point))
    high = np.float32(np.int64(clamp_max) - np.int64(out_zero_point))
    value = min(max(value, low), high)
    return np.int64(np.rint(value)) + np.int64(out_zero_point)


def requantize_float32(values, scale, out_zero_point, clamp_min, clamp_max):
    """The module docstring's formula on arrays: int64 results, broadcast shape.

    Args:
        values: integers of int32 range (any shape).
        scale: float32 multipliers broadcasting against ``values`` (a scalar, or per channel
            reshaped to broadcast).
        out_zero_point, clamp_min, clamp_max: integers.
    """
    products = np.asarray(values).astype(np.float32) * np.asarray(scale, dtype=np.float32)
    low = np.float32(int(clamp_min) - int(out_zero_point))
    high = np.float32(int(clamp_max) - int(out_zero_point))
    return np.rint(np.clip(products, low, high)).astype(np.int64) + int(out_zero_point)


def fma_float32(a, b, c):
    """float32(a * b + c) rounded once (a fused multiply-add) for float32 arrays, in NumPy.

    The product of two float32 values is exact in float64 (24 + 24 significand bits). Its
    float64 sum with c, s, is then off by an exactly known error e (Knuth's TwoSum). Rounding
    s to float32 is the correct rounding of s + e, except when s lies exactly halfway between
    two float32 values and e is not zero: then s + e lies on e's side of the half.
    """
    a, b, c = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (a, b, c))
    product = a * b
    total = product + c
    virtual = total - c
    error = (product - virtual) + (c - (total - virtual))
    rounded = total.astype(np.float32)
    up = np.nextafter(rounded, np.float32(np.inf))
    down = np.nextafter(rounded, np.float32(-np.inf))
    wide = rounded.astype(np.float64)
    rounded = np.where((total == (wide + up.astype(np.float64)) / 2) & (error > 0), up, rounded)
    rounded = np.where((total == (wide + down.astype(np.float64)) / 2) & (error < 0), down, rounded)
    return np.asarray(rounded, dtype=np.float32)


if config.DISABLE_JIT:  # plain Python (NUMBA_DISABLE_JIT=1): no intrinsics there

    def fma_float32_value(a, b, c):
        """float32(a * b + c) rounded once, for float32 scalars (:func:`fma_float32`)."""
        return np.float32(fma_float32(a, b, c))

else:

    @intrinsic
    def _llvm_fma_float32(typingctx, a, b, c):
        """LLVM's ``llvm.fma.f32`` on three float32 values."""
        if not all(t == types.float32 for t in (a, b, c)):
            return None

        def codegen(context, builder, signature, args):
            float32 = ir.FloatType()
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(float32, [float32] * 3),
                                                 "llvm.fma.f32")
            return builder.call(fma, args)

        return types.float32(a, b, c), codegen

    @njit(cache=True)
    def fma_float32_value(a, b, c):
        """float32(a * b + c) rounded once, for float32 scalars: one ``vfmadd``, as ONNX
        Runtime's FMA instructions."""
        return _llvm_fma_float32(np.float32(a), np.float32(b), np.float32(c))
