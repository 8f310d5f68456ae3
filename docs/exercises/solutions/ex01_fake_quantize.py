"""Exercise 01: fake quantization in NumPy, and a scale and zero point from a range.

Read first: docs/concepts.md, "2. The affine grid", "4. Quantization simulation" and
"5. The straight-through estimator"; docs/numerics.md, "Fake quantization" and "Scale and zero point
from an observed range".

Learning goal: write the one formula every quantizer in qatcore applies, in float32, so that
your output equals qatcore's bit for bit; see why the order of the operations matters.

An integer q in [qmin, qmax] stands for the real number s * (q - z): the *scale* s is the step
between neighbouring representable reals, the *zero point* z is the integer that stands for 0.
*Fake quantization* rounds a real x to the nearest representable real and returns it as a
float, so a float network can see the quantization error:

    inv = float32(1) / float32(s)             multiply by the inverse, never divide by s
    q   = z + rne(float32(x) * inv)           rne: round half to even (np.rint); z added AFTER
    y   = float32(clamp(q, qmin, qmax) - z) * s

Every operation is in float32. Two details decide bit-for-bit agreement:

* x * inv and x / s differ in the last bit now and then. When x * inv lands exactly on a half
  (a *tie*) and x / s just below it, the two round to different integers. numerics.md gives a
  test vector: s = 0.00214854861, x = 0.273939937: x * inv = 127.5 -> 128, x / s -> 127.
* rne(x * inv) + z and rne(x * inv + z) differ at ties when z is odd: with s = 0.5 and z = 3,
  x = 1.25 gives 3 + rne(2.5) = 5, but rne(5.5) = 6.

The range rule turns an observed (min, max) into (s, z) (all float32; eps = float32's machine
epsilon, np.finfo(np.float32).eps):

    mn = min(min, 0);  mx = max(max, 0)                   so that 0 is always representable
    affine:     s = max(float32(mx - mn) / float32(qmax - qmin), eps)
                z = clamp(qmin - rne(float32(mn / s)), qmin, qmax)
    symmetric:  s = max(max(-mn, mx) / float32((qmax - qmin) / 2), eps)
                z = 0 for a signed range (qmin < 0), (qmin + qmax + 1) // 2 for an unsigned one

(qatcore also caps s at the largest float32 for ranges that overflow; you may ignore that.)

What to implement: ``fake_quantize`` and ``scale_zero_point_from_range`` below.
Hints: np.float32(...) makes a float32 scalar; a float32 array times a float32 scalar stays
float32; np.rint rounds half to even; np.clip clamps.
What to observe: run ``main()`` (python docs/exercises/ex01_fake_quantize.py): the test vector
rounds to 128 with the inverse and 127 with a division, and an odd zero point moves a tie.
Check: pytest docs/exercises -k ex01 (bit for bit against qatcore.quantization.fake_quantize
and qatcore.quantization.qparams.scale_zero_point_from_range).
"""

import numpy as np

EXERCISE_FUNCTIONS = ("fake_quantize", "scale_zero_point_from_range")


def fake_quantize(x, scale, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """y = float32(clamp(z + rne(float32(x) * inv), qmin, qmax) - z) * s, inv = float32(1) / s.

    Args:
        x: an array of reals (converted to float32).
        scale: the step s > 0 (converted to float32).
        zero_point: the integer z, qmin <= z <= qmax.
        qmin, qmax: the integer range.

    Returns:
        A float32 array shaped like x.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = np.float32(scale)
    inverse = np.float32(1) / scale                      # one rounding here, then a multiply per element
    q = np.rint(x * inverse) + np.float32(zero_point)    # round first, then shift: ties go to even steps
    return ((np.clip(q, qmin, qmax) - np.float32(zero_point)) * scale).astype(np.float32)


def scale_zero_point_from_range(min_val: float, max_val: float, qmin: int, qmax: int,
                                symmetric: bool) -> tuple[np.float32, int]:
    """(s, z) for the observed range [min_val, max_val], widened to include 0 (see the module
    docstring for the affine and symmetric formulas).

    Returns:
        The scale as a np.float32 and the zero point as a Python int.
    """
    eps = np.finfo(np.float32).eps
    mn = min(np.float32(min_val), np.float32(0))         # 0 must land exactly on the grid
    mx = max(np.float32(max_val), np.float32(0))
    if symmetric:
        scale = max(max(-mn, mx) / np.float32((qmax - qmin) / 2), eps)
        zero_point = 0 if qmin < 0 else (qmin + qmax + 1) // 2
    else:
        scale = max((mx - mn) / np.float32(qmax - qmin), eps)
        zero_point = int(np.clip(qmin - np.rint(mn / scale), qmin, qmax))   # the one division
    return np.float32(scale), zero_point


def main() -> None:
    """Print what the module docstring asks you to observe."""
    x, s = np.float32(0.273939937), np.float32(0.00214854861)
    print("x * inv =", x * (np.float32(1) / s), "-> q =", np.rint(x * (np.float32(1) / s)),
          "; x / s =", x / s, "-> q =", np.rint(x / s))
    print("fake_quantize(x, s, 0, 0, 255) =", fake_quantize([x], s, 0, 0, 255)[0], "=", 128, "* s")
    print("odd zero point, s = 0.5, z = 3, x = 1.25:", fake_quantize([1.25], 0.5, 3, 0, 15)[0],
          "(q = 3 + rne(2.5) = 5, not rne(5.5) = 6)")
    print("uint8 affine for [-1, 3]:", scale_zero_point_from_range(-1.0, 3.0, 0, 255, symmetric=False))
    print("int8 narrow symmetric for [-0.6, 1.0]:", scale_zero_point_from_range(-0.6, 1.0, -127, 127, True))


if __name__ == "__main__":
    main()
