"""Exercise 02: derive LSQ's scale gradient.

Read first: docs/concepts.md, "5. The straight-through estimator" and
"8. Advanced: learned step size (LSQ, LSQ+)"; docs/numerics.md, "LSQ and LSQ+"; the LSQ code in
kernels/fake_quant.py (``_learned_step``).

Learning goal: differentiate fake quantization with respect to its scale, region by region,
and see what the straight-through estimator adds to the true derivative of the staircase.

*Learned Step Size Quantization* (LSQ; Esser et al. 2020, "Learned Step Size Quantization")
makes the scale s a trainable parameter. With q = z + rne(x * inv) (unclamped; inv = 1/s) the
fake-quantized value is

    y = s * (clamp(q, qmin, qmax) - z)

The *straight-through estimator* (STE; docs/concepts.md, section 5) treats rne as the identity
when differentiating: d rne(u)/du is taken as 1. Inside the range y = s * (rne(x / s)) (the
z's cancel), and the product rule with that convention gives, per region:

    inside (qmin <= q <= qmax):  dy/ds = rne(x/s) + s * (-x / s^2) = (q - z) - x/s
    below  (q < qmin):           dy/ds = qmin - z        (y = s * (qmin - z): a line in s)
    above  (q > qmax):           dy/ds = qmax - z

Inside, the term (q - z) - x/s lies in [-1/2, 1/2]: how far rounding moved x, in steps.
qatcore evaluates it as ((q - z) * s - x) * inv in float64 from the float32 operands (x, s, z,
q and inv = float32(1) / s), which is the same number up to float64 rounding; written that way,
your terms equal qatcore's bit for bit once rounded to float32.

The total gradient of a scale sums the terms of every element, each times the upstream
gradient grad_y = dL/dy of its element, and times LSQ's *gradient scale*
g = 1 / sqrt(numel * qmax), which keeps the scale's step comparable to a weight's
(docs/concepts.md, section 8; ``default_grad_factor``):

    dL/ds = g * sum_i grad_y[i] * dy_i/ds

What to implement: ``scale_gradient_terms`` (dy/ds per element, without g), ``grad_factor``
and ``scale_gradient`` (the total, with g).
Hints: q is computed exactly as in exercise 01, in float32; then switch to float64. np.where
selects per region.
What to observe (``main()``): a finite difference of the real staircase y(s) agrees with your
terms where the value is clipped, and inside it gives (q - z), not (q - z) - x/s. The STE is an
estimator, not the derivative: inside, the true derivative ignores that rounding moved x.
Check: pytest docs/exercises -k ex02 (against the scale gradient of
qatcore.quantization.fake_quantize_learnable, and against a finite difference).
"""

import numpy as np

EXERCISE_FUNCTIONS = ("scale_gradient_terms", "grad_factor", "scale_gradient")


def scale_gradient_terms(x, scale, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """dy/ds of y = fake_quant(x; s, z) per element, with the STE (the region table above), no g.

    Args:
        x: an array of reals (converted to float32).
        scale: s > 0 (converted to float32).
        zero_point: the integer z.
        qmin, qmax: the integer range.

    Returns:
        A float64 array shaped like x.
    """
    raise NotImplementedError("exercise 02: write scale_gradient_terms() (see its docstring)")


def grad_factor(numel: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(numel * qmax)."""
    raise NotImplementedError("exercise 02: write grad_factor() (see its docstring)")


def scale_gradient(x, grad_y, scale, zero_point: int, qmin: int, qmax: int) -> np.float32:
    """dL/ds = g * sum_i grad_y[i] * dy_i/ds, with g = grad_factor(x.size, qmax); float32."""
    raise NotImplementedError("exercise 02: write scale_gradient() (see its docstring)")


def staircase(x, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """The real function y(s) = s * (clamp(z + rne(x / s), qmin, qmax) - z) in float64 (given)."""
    x = np.asarray(x, dtype=np.float64)
    return scale * (np.clip(zero_point + np.rint(x / scale), qmin, qmax) - zero_point)


def finite_difference(x, scale: float, zero_point: int, qmin: int, qmax: int, step: float = 1e-7):
    """(dy/ds by central difference of the staircase, and where it is defined): the rounding must
    not change between s - step and s + step, else the staircase jumps there (given)."""
    x = np.asarray(x, dtype=np.float64)
    lower, upper = scale - step * scale, scale + step * scale
    smooth = np.rint(x / lower) == np.rint(x / upper)
    slope = (staircase(x, upper, zero_point, qmin, qmax) - staircase(x, lower, zero_point, qmin, qmax))
    return slope / (upper - lower), smooth


def main() -> None:
    """Print what the module docstring asks you to observe."""
    x = np.array([-1.3, -0.84, -0.31, 0.04, 0.26, 0.74, 0.76, 1.9], dtype=np.float32)
    s, z, qmin, qmax = np.float32(0.1), 0, -8, 7
    terms = scale_gradient_terms(x, s, z, qmin, qmax)
    slope, smooth = finite_difference(x, float(s), z, qmin, qmax)
    print("x                     ", x)
    print("LSQ dy/ds (STE)       ", np.round(terms, 3))
    print("finite difference     ", np.round(np.where(smooth, slope, np.nan), 3))
    print("STE minus difference  ", np.round(terms - slope, 3), "= -x/s inside, 0 where clipped")
    print("dL/ds for dy = 1:", scale_gradient(x, np.ones_like(x), s, z, qmin, qmax),
          "with g =", grad_factor(x.size, qmax))


if __name__ == "__main__":
    main()
