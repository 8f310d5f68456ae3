"""Exercise 09: integer matrix multiplication with zero points, expanded.

Read first: docs/concepts.md, "2. The affine grid" and "7. Integer-only inference";
docs/numerics.md, "Integer-only requantization" (the accumulator).

Learning goal: see where zero points cost work in an integer matmul, and why qatcore's weights
are symmetric (zero point 0).

With activations a ~ s_a (a_q - z_a) and weights b ~ s_b (b_q - z_b), a layer's product is
s_a s_b times the integer sum (Jacob et al. 2018, "Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference", equation 7):

    acc[i, j] = sum_k (a_q[i, k] - z_a) (b_q[j, k] - z_b)
              = sum_k a_q[i, k] b_q[j, k]         the int8 x int8 products (the real work)
                - z_b * sum_k a_q[i, k]           row sums of the activations: every inference
                - z_a * sum_k b_q[j, k]           row sums of the weights: once, offline
                + K * z_a * z_b                   a constant (K = the depth, a_q.shape[1])

The first term is what int8 hardware is fast at: it multiplies the stored integers directly,
with no subtraction per element. The weight row sums are known before inference. The
activation row sums are not: they cost K additions per row of a at every inference, and only
because z_b != 0. With symmetric weights (z_b = 0) that term and the constant vanish, and
acc = a_q @ b_q.T - z_a * rowsum(b_q): qatcore's int8 GEMM computes exactly this, with
``offset = -z_x * row_sums`` precomputed when the weights are packed (kernels/int8_gemm.py).

What to implement: ``matmul_direct`` (the sum of products of the shifted integers) and
``matmul_expanded`` (the four terms).
Hints: convert to int64 first (uint8 * uint8 overflows in uint8); a_q @ b_q.T multiplies every
row of a by every row of b.
What to observe (``main()``): the two agree exactly; with z_b = 0 both equal qatcore's
int8_gemm_int32.
Check: pytest docs/exercises -k ex09.
"""

import numpy as np

from qatcore.kernels.int8_gemm import int8_gemm_int32

EXERCISE_FUNCTIONS = ("matmul_direct", "matmul_expanded")


def matmul_direct(a_q: np.ndarray, a_zero: int, b_q: np.ndarray, b_zero: int) -> np.ndarray:
    """acc[i, j] = sum_k (a_q[i, k] - a_zero) * (b_q[j, k] - b_zero), int64, shape (M, N).

    Args:
        a_q: (M, K) integers (activations); b_q: (N, K) integers (weights, one row per output).
        a_zero, b_zero: their zero points.
    """
    shifted_a = np.asarray(a_q, np.int64) - a_zero        # int64: the products and sums are exact
    shifted_b = np.asarray(b_q, np.int64) - b_zero
    return shifted_a @ shifted_b.T


def matmul_expanded(a_q: np.ndarray, a_zero: int, b_q: np.ndarray, b_zero: int) -> np.ndarray:
    """The same sum as four terms (module docstring), int64, shape (M, N)."""
    a, b = np.asarray(a_q, np.int64), np.asarray(b_q, np.int64)
    depth = a.shape[1]
    products = a @ b.T                                    # the raw integer products
    activation_sums = a.sum(axis=1)[:, None]              # per inference: only needed when b_zero != 0
    weight_sums = b.sum(axis=1)[None, :]                  # offline: the weights do not change
    return products - b_zero * activation_sums - a_zero * weight_sums + depth * a_zero * b_zero


def operands(seed: int = 9, rows: int = 5, depth: int = 40, outputs: int = 6):
    """uint8 activations (rows, depth) and int8 weights (outputs, depth) (given)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (rows, depth)).astype(np.uint8),
            rng.integers(-127, 128, (outputs, depth)).astype(np.int8))


def main() -> None:
    """Print what the module docstring asks you to observe."""
    a_q, b_q = operands()
    for a_zero, b_zero in ((128, 0), (37, 5)):
        direct, expanded = matmul_direct(a_q, a_zero, b_q, b_zero), matmul_expanded(a_q, a_zero, b_q, b_zero)
        print(f"z_a = {a_zero}, z_b = {b_zero}: expanded == direct: {np.array_equal(direct, expanded)}")
    print("z_b = 0, qatcore's int8_gemm_int32 == direct:",
          np.array_equal(int8_gemm_int32(a_q, 128, b_q), matmul_direct(a_q, 128, b_q, 0)))


if __name__ == "__main__":
    main()
