"""Exercise 04: BatchNorm folding with Krishnamoorthi's batch correction.

Read first: docs/concepts.md, "6. BatchNorm folding"; docs/numerics.md, "BatchNorm folding"
(what qatcore folds, exactly).

Learning goal: fold a BatchNorm into the layer before it, for inference and for training, and
see that two different training folds agree in eval.

A BatchNorm after a linear layer (or a convolution: everything below holds per output channel)
normalises each output feature c with a mean mu and a standard deviation sigma, then applies
its own affine map (gamma, beta):

    y   = x @ W.T + b                       W: (out, in), one row per output feature
    out = gamma * (y - mu) / sigma + beta   sigma = sqrt(var + eps_bn)

While training, mu and var are the *batch* statistics mu_B, var_B (the mean and the biased
variance over the batch, sigma_B = sqrt(var_B + eps_bn)); in eval they are the *running*
statistics (running_mean, running_var, sigma = sqrt(running_var + eps_bn)). In eval the whole
thing is one linear layer, the *folded* one:

    W_fold = W * gamma / sigma                (row c scaled by gamma[c] / sigma[c])
    b_fold = beta + (b - running_mean) * gamma / sigma

The int8 model quantizes W_fold, so QAT should train against fake_quant(W_fold). The trouble
is that training normalises with batch statistics, which change every step.

qatcore (like PyTorch) trains with y = (x @ fake_quant(W_fold).T) / (gamma / sigma) followed by
an ordinary batch norm with batch statistics: dividing by gamma / sigma undoes the fold's
scale, so without quantization this is exactly the float layer plus batch norm.

Krishnamoorthi 2018 ("Quantizing deep convolutional networks for efficient inference: A
whitepaper", its batch normalization section under quantization-aware training) instead
computes the batch statistics from the float layer first, then uses the folded weights with a
*correction* sigma / sigma_B on the output:

    y_float = x @ W.T + b;   mu_B, var_B = mean and biased variance of y_float over the batch
    out     = (x @ fake_quant(W_fold).T) * (sigma / sigma_B) + beta + (b - mu_B) * gamma / sigma_B

Without quantization (fake_quant the identity) this is gamma * (y_float - mu_B) / sigma_B +
beta, the float layer with batch-statistics BatchNorm. Once the BatchNorm is frozen (running
statistics, mu_B -> running_mean, sigma_B -> sigma) the correction is 1 and the layer is
x @ fake_quant(W_fold).T + b_fold: the same as qatcore's in eval.

What to implement: ``fold_eval`` (W_fold, b_fold) and ``krishnamoorthi_forward`` (the corrected
training output, or the frozen one).
Hints: per-feature vectors broadcast along the last axis of (N, out) values; W_fold scales rows,
so use gamma_over_sigma[:, None]. Use float64 for the statistics; return float32.
What to observe (``main()``): without quantization, your training output equals the float
layer with batch norm; in eval, your fold equals qatcore's ``QATLinearBn1d.folded_parameters``.
Check: pytest docs/exercises -k ex04.
"""

import numpy as np

from qatcore.nn import BatchNorm1d, Linear
from qatcore.nn import functional as F
from qatcore.quantization.qat import QATLinearBn1d

EXERCISE_FUNCTIONS = ("fold_eval", "krishnamoorthi_forward")


def fold_eval(weight, bias, gamma, beta, running_mean, running_var, eps: float):
    """(W_fold, b_fold) from the running statistics (module docstring), as float32 arrays.

    Args:
        weight: (out, in); bias: (out,) (zeros if the layer has none).
        gamma, beta, running_mean, running_var: (out,) BatchNorm parameters and statistics.
        eps: the BatchNorm's eps_bn.
    """
    gamma_over_sigma = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(running_var, np.float64) + eps)
    folded_weight = np.asarray(weight, np.float64) * gamma_over_sigma[:, None]     # one row per feature
    folded_bias = np.asarray(beta, np.float64) + (np.asarray(bias, np.float64) - running_mean) * gamma_over_sigma
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


def krishnamoorthi_forward(x, weight, bias, gamma, beta, running_mean, running_var, eps: float,
                           weight_fake_quant, use_batch_statistics: bool = True) -> np.ndarray:
    """The layer's output with Krishnamoorthi's fold (module docstring), float32 (N, out).

    Args:
        x: (N, in) inputs.
        weight, bias, gamma, beta, running_mean, running_var, eps: as for ``fold_eval``.
        weight_fake_quant: a function W_fold -> fake_quant(W_fold) (the identity for none).
        use_batch_statistics: True while training (batch statistics and the correction
            sigma / sigma_B); False once frozen (running statistics: no correction).
    """
    x64 = np.asarray(x, np.float64)
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
    folded_weight, _ = fold_eval(weight, bias, gamma, beta, running_mean, running_var, eps)
    quantized = np.asarray(weight_fake_quant(folded_weight), np.float64)
    if use_batch_statistics:
        # the statistics come from the float layer: an extra matmul, but BatchNorm then sees what
        # it would see without quantization, and the quantized path is only rescaled
        y_float = x64 @ np.asarray(weight, np.float64).T + np.asarray(bias, np.float64)
        mean, sigma_batch = y_float.mean(axis=0), np.sqrt(y_float.var(axis=0) + eps)
    else:
        mean, sigma_batch = np.asarray(running_mean, np.float64), sigma
    correction = sigma / sigma_batch                        # 1 once frozen
    shift = beta + (np.asarray(bias, np.float64) - mean) * gamma / sigma_batch
    return ((x64 @ quantized.T) * correction + shift).astype(np.float32)


def layer_and_batch(seed: int = 0, features_in: int = 6, features_out: int = 4, batch: int = 32):
    """A Linear + BatchNorm1d with non-trivial statistics and a batch of inputs (given):
    returns (linear, bn, x), qatcore modules and a float32 array."""
    rng = np.random.default_rng(seed)
    linear, bn = Linear(features_in, features_out, rng=rng), BatchNorm1d(features_out)
    bn.running_mean.data[...] = rng.normal(size=features_out)
    bn.running_var.data[...] = rng.uniform(0.5, 2.0, size=features_out)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, size=features_out) * rng.choice([-1, 1], size=features_out)
    bn.bias.data[...] = rng.normal(size=features_out)
    x = (rng.normal(size=(batch, features_in)) * 2 + 0.5).astype(np.float32)
    return linear, bn, x


def parameters(linear, bn) -> dict:
    """The arrays of ``fold_eval``'s and ``krishnamoorthi_forward``'s arguments (given)."""
    return {"weight": linear.weight.data, "bias": linear.bias.data, "gamma": bn.weight.data, "beta": bn.bias.data,
            "running_mean": bn.running_mean.data, "running_var": bn.running_var.data, "eps": bn.eps}


def main() -> None:
    """Print what the module docstring asks you to observe."""
    linear, bn, x = layer_and_batch()
    p = parameters(linear, bn)
    mine = krishnamoorthi_forward(x, **p, weight_fake_quant=lambda w: w)
    reference = F.batch_norm(F.linear(x, linear.weight, linear.bias), p["running_mean"].copy(),
                             p["running_var"].copy(), bn.weight, bn.bias, training=True).numpy()
    print("training, no quantization: largest |yours - float layer + batch norm| =", np.abs(mine - reference).max())
    folded_weight, folded_bias = fold_eval(**p)
    q_weight, q_bias, _ = QATLinearBn1d(linear, bn, "bn", None, None).folded_parameters()
    print("eval fold: largest |W_fold - qatcore's| =", np.abs(folded_weight - q_weight).max(),
          ", |b_fold - qatcore's| =", np.abs(folded_bias - q_bias).max())


if __name__ == "__main__":
    main()
