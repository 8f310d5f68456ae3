"""Exercise 06: per-tensor vs per-channel scales at 4 bits, measured by SQNR.

Read first: docs/concepts.md, "2. The affine grid" (its per-tensor vs per-channel example
and the SQNR); docs/numerics.md, "Scale and zero point
from an observed range".

Learning goal: see why weights get one scale per output channel, and measure it.

A weight matrix W (one row per output channel) is quantized symmetrically (z = 0) to the
narrow signed 4-bit range [-7, 7]. With one scale for the whole tensor (*per tensor*), the
step is set by the largest |w| anywhere; with one scale per row (*per channel*), each row gets
its own step:

    per tensor:   s    = max(max_ij |W_ij| / 7, eps)          (one number)
    per channel:  s[c] = max(max_j |W_cj| / 7, eps)           (one per row c)

This is qatcore's symmetric range rule (docs/numerics.md): s = max(-mn, mx) / ((qmax - qmin) / 2)
with (qmax - qmin) / 2 = 7 for [-7, 7], in float32, and eps = float32's machine epsilon.

The *signal-to-quantization-noise ratio* (SQNR) measures the result in decibels:

    SQNR = 10 log10( sum x^2 / sum (x - fake_quant(x))^2 )     (dB; +inf if the noise is 0)

each sum in float64 (qatcore.quantization.qat.statistics.sqnr_db, the training statistics'
definition). Every 6 dB is a factor of 2 in the noise amplitude.

The given matrix has rows of very different sizes: some far smaller than the largest row,
and one far larger than the rest. Per tensor, the large row sets a step that is coarse for
every other row, and the smallest rows round to 0 entirely.

What to implement: ``symmetric_scales`` and ``sqnr_db``.
Hints: np.abs(w).max(axis=1); keep the float32 arithmetic of exercise 01; the quantization
itself is given (``fake_quantize_rows``, qatcore's fake_quantize along axis 0).
What to observe (``main()``): per channel every row keeps about the same SQNR (17 to 22 dB, the
4-bit level for bell-shaped rows); per tensor every row but the largest falls to about 0 dB
(their weights round to 0 or +-1 step). The whole-matrix SQNR (about 15 vs 19 dB) hides most of
this: the large row dominates both of its sums. Look at the rows, not only the total.
Check: pytest docs/exercises -k ex06 (your scales against qatcore's QParams.from_range bit for
bit, your SQNR against qatcore's, and per channel better than per tensor).
"""

import numpy as np

from qatcore.quantization import fake_quantize

EXERCISE_FUNCTIONS = ("symmetric_scales", "sqnr_db")

QMAX = 7                                  # narrow signed 4 bits: [-7, 7]
ROW_SIZES = (0.01, 0.03, 0.2, 0.5, 1.0, 1.0, 1.5, 12.0)   # the standard deviation of each row


def symmetric_scales(weight: np.ndarray, qmax: int, per_channel: bool) -> np.ndarray:
    """float32 scales for the symmetric range [-qmax, qmax]: shape (rows,) per channel, (1,) per tensor."""
    magnitude = np.abs(np.asarray(weight, np.float32))
    largest = magnitude.max(axis=1) if per_channel else magnitude.max(keepdims=True).reshape(1)
    # (qmax - qmin) / 2 = qmax on the narrow range, so the largest |w| lands exactly on +-qmax
    return np.maximum(largest / np.float32(qmax), np.finfo(np.float32).eps).astype(np.float32)


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    """10 log10(sum x^2 / sum (x - y)^2) in float64; +inf when y == x."""
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    noise = np.sum((x64 - y64) ** 2)
    if noise == 0:
        return float("inf")               # no error at all: log10 would divide by zero
    return float(10 * np.log10(np.sum(x64 * x64) / noise))


def weight_matrix(seed: int = 6, columns: int = 64) -> np.ndarray:
    """The given weights: one row per output channel, row c normal with std ROW_SIZES[c]."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(len(ROW_SIZES), columns)) * np.array(ROW_SIZES)[:, None]).astype(np.float32)


def fake_quantize_rows(weight: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
    """fake_quant(W) on [-qmax, qmax], z = 0, with one scale per row (or one for all) (given)."""
    if scales.size == 1:
        return fake_quantize(weight, scales[0], 0, -qmax, qmax)
    return fake_quantize(weight, scales, np.zeros(scales.size), -qmax, qmax, axis=0)


def main() -> None:
    """Print what the module docstring asks you to observe."""
    weight = weight_matrix()
    for per_channel in (False, True):
        quantized = fake_quantize_rows(weight, symmetric_scales(weight, QMAX, per_channel), QMAX)
        rows = [f"{sqnr_db(w, q):5.1f}" for w, q in zip(weight, quantized)]
        print(f"{'per channel' if per_channel else 'per tensor '}: SQNR {sqnr_db(weight, quantized):5.1f} dB;"
              f" per row: {' '.join(rows)}")


if __name__ == "__main__":
    main()
