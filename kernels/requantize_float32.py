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
the kernels with.

>>> import numpy as np
>>> requantize_float32(np.array([5, 7, -5, 1000]), np.float32(0.5), 10, 0, 255)  # 2.5 -> 2, 3.5 -> 4
array([ 12,  14,   8, 255])
"""

import numpy as np
from numba import njit

__all__ = ["requantize_float32_value", "requantize_float32"]


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
