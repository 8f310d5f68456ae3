"""Float64 central-difference gradient check.

For a function f of tensors x_1..x_k with output y, pick a fixed random
cotangent v (same shape as y) and compare, for every input element,

    analytic:  d(sum(v * f(x))) / d x_ij          (one backward pass)
    numeric:   (L(x + eps e_ij) - L(x - eps e_ij)) / (2 eps),   L = sum(v * f(x))

The random v makes the check cover the whole Jacobian, not just its column sums.
Inputs are converted to float64 so that eps = 1e-6 leaves ~10 significant
digits of the difference quotient.

>>> import numpy as np
>>> import qatcore.nn.functional as F
>>> gradcheck(lambda a, b: F.mul(a, b).exp(), [np.array([0.5, -1.0]), np.array([2.0, 3.0])])
True
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from qatcore.errors import GradientError
from qatcore.tensor import Tensor

__all__ = ["gradcheck"]


def gradcheck(
    fn: Callable, inputs: Sequence, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4,
    seed: int = 0,
) -> bool:
    """Compare backward() of ``fn`` with central differences; True or GradientError.

    ``inputs`` are arrays (or Tensors) made float64 and differentiated; ``fn``
    takes Tensors and returns one Tensor.
    """
    arrays = [np.array(x.data if isinstance(x, Tensor) else x, dtype=np.float64) for x in inputs]
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    cotangent = np.random.default_rng(seed).normal(size=out.shape)
    out.backward(cotangent)

    def objective(values: list[np.ndarray]) -> float:
        result = fn(*[Tensor(v) for v in values])
        return float(np.sum(result.data.astype(np.float64) * cotangent))

    for i, (a, t) in enumerate(zip(arrays, tensors)):
        analytic = np.zeros_like(a) if t.grad is None else t.grad
        numeric = np.zeros_like(a)
        flat = a.reshape(-1)
        for j in range(flat.size):
            original = flat[j]
            flat[j] = original + eps
            plus = objective(arrays)
            flat[j] = original - eps
            minus = objective(arrays)
            flat[j] = original
            numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
        if not np.allclose(analytic, numeric, atol=atol, rtol=rtol):
            worst = int(np.argmax(np.abs(analytic - numeric)))
            raise GradientError(
                f"gradcheck: input {i} (shape {a.shape}): analytic and numeric gradients differ; "
                f"worst at flat index {worst}: analytic {analytic.reshape(-1)[worst]:.8g} vs "
                f"numeric {numeric.reshape(-1)[worst]:.8g} (max abs diff "
                f"{np.max(np.abs(analytic - numeric)):.3g})"
            )
    return True
