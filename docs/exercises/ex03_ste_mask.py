"""Exercise 03: the straight-through estimator's mask.

Read first: docs/concepts.md, "5. The straight-through estimator" and
the "clip fraction" in "9. Diagnostics"; docs/numerics.md, "Fake
quantization".

Learning goal: write the backward pass of fake quantization, and measure what its mask is for.

Rounding has derivative 0 almost everywhere, which would stop all learning. The
*straight-through estimator* (STE; Bengio et al. 2013, "Estimating or Propagating Gradients
Through Stochastic Neurons for Conditional Computation") passes the upstream gradient dy
through unchanged, but only where the value landed on the grid:

    q    = z + rne(float32(x) * inv)                   unclamped, as in the forward (exercise 01)
    mask = qmin <= q <= qmax                           on the rounded q, inclusive
    dx   = dy * mask

A value that was *clipped* (q outside [qmin, qmax]) gets no gradient: moving it a little does
not change the output. The *clip fraction* is the share of values that were clipped; qatcore
records it for every quantizer during training (``clip_fraction`` in the QAT statistics).

Without the mask (an "identity STE", dx = dy everywhere) a clipped value keeps receiving the
gradient of an output it cannot change. The small problem below shows what that does. A
single trainable gain a scales inputs u (uniform on [-1, 1]); the product h = a * u is fake
quantized on a fixed grid (s = 1/7, z = 0, [-7, 7], so reals in [-1, 1]); the loss is the
mean squared distance to the target 1.5 * u, which the grid cannot reach for |u| > 2/3:

    y = fake_quant(a * u),   L = mean((y - 1.5 u)^2),   dL/da = sum_i dx_i * u_i

With the mask, only the values on the grid pull a, toward 1.5. Without it, every clipped
value, whose output is stuck at the edge of the grid, pulls a up as well, pushing more
values off the grid.

What to implement: ``ste_backward``, ``identity_backward`` and ``clip_fraction``.
Hints: compute q exactly as in exercise 01; multiply by the mask (as float32), do not select.
What to observe (``main()``): after training, the clip fraction is about 27 % with the mask
and about 60 % without, and the loss is about three times larger without the mask.
Check: pytest docs/exercises -k ex03 (the masked backward and the clip fraction against
qatcore's fake-quantization backward, bit for bit; the clip fractions of the two trainings).
"""

import numpy as np

from qatcore.quantization import fake_quantize

EXERCISE_FUNCTIONS = ("ste_backward", "identity_backward", "clip_fraction")

# the problem of the docstring: the grid, the data, the target gain, the optimiser
GRID = {"scale": np.float32(1 / 7), "zero_point": 0, "qmin": -7, "qmax": 7}
TARGET_GAIN = np.float32(1.5)
STEPS, LEARNING_RATE = 60, 0.5


def ste_backward(grad_y, x, scale, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """dx = grad_y * (qmin <= q <= qmax), q = z + rne(float32(x) * (float32(1) / s)); float32."""
    raise NotImplementedError("exercise 03: write ste_backward() (see its docstring)")


def identity_backward(grad_y, x, scale, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """dx = grad_y everywhere (the STE without its mask); float32."""
    raise NotImplementedError("exercise 03: write identity_backward() (see its docstring)")


def clip_fraction(x, scale, zero_point: int, qmin: int, qmax: int) -> float:
    """The share of elements with q < qmin or q > qmax (q as in ``ste_backward``)."""
    raise NotImplementedError("exercise 03: write clip_fraction() (see its docstring)")


def inputs(seed: int = 3, size: int = 512) -> np.ndarray:
    """The inputs u, uniform on [-1, 1] (given)."""
    return np.random.default_rng(seed).uniform(-1, 1, size).astype(np.float32)


def train_gain(backward, u: np.ndarray) -> tuple[np.float32, float, float]:
    """Gradient descent on the gain a from a = 1 (given): returns (a, clip fraction, loss) after
    STEPS steps, with ``backward`` (``ste_backward`` or ``identity_backward``) as the
    fake quantizer's backward."""
    target = TARGET_GAIN * u
    gain = np.float32(1.0)
    for _ in range(STEPS):
        h = gain * u
        y = fake_quantize(h, **GRID)
        grad_y = (2 * (y - target) / u.size).astype(np.float32)         # dL/dy of the mean squared error
        grad_h = backward(grad_y, h, **GRID)
        gain = np.float32(gain - LEARNING_RATE * np.sum(grad_h * u))
    loss = float(np.mean((fake_quantize(gain * u, **GRID) - target) ** 2))
    return gain, clip_fraction(gain * u, **GRID), loss


def main() -> None:
    """Print what the module docstring asks you to observe."""
    u = inputs()
    for name, backward in (("with the mask   ", ste_backward), ("without the mask", identity_backward)):
        gain, clipped, loss = train_gain(backward, u)
        print(f"{name}: a = {gain:.3f}, clip fraction {clipped:.1%}, loss {loss:.4f}")


if __name__ == "__main__":
    main()
