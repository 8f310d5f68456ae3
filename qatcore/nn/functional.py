"""The functional API: every op on Tensors, with PyTorch-compatible signatures.

Each function either applies one primitive :class:`~qatcore.autograd.Function`
from :mod:`qatcore.ops` (after validating its arguments) or composes several,
so this file is the single place where an op's public behaviour is defined;
Tensor methods and nn Modules call it.

Arguments that are not Tensors (Python numbers, numpy arrays) are taken as
constants (no gradient); a Python number takes the dtype of the Tensor it meets.

>>> import qatcore
>>> import qatcore.nn.functional as F
>>> x = qatcore.tensor([[1.0, -2.0, 3.0]], requires_grad=True)
>>> F.relu(x)
tensor([[1., 0., 3.]], grad_fn=Relu)
>>> loss = F.cross_entropy(x, qatcore.tensor([2]))
>>> round(loss.item(), 4)
0.1328
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np

from qatcore import ops
from qatcore.errors import ConfigError, DTypeError, ShapeError
from qatcore.process_group import current_group
from qatcore.random import generator_or_default
from qatcore.symbolic import find_symbolic
from qatcore.tensor import Tensor

__all__ = [
    "add", "sub", "mul", "div", "neg", "pow", "matmul", "linear",
    "sum", "mean", "max", "var",
    "reshape", "flatten", "transpose", "permute", "getitem", "cat", "cast",
    "exp", "log", "sqrt", "clamp", "relu", "relu6", "leaky_relu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "softmax", "log_softmax", "cross_entropy", "nll_loss", "mse_loss",
    "conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "batch_norm", "dropout",
]

_builtin_max = max


def _traceable(fn):
    """Let the graph tracer record calls of ``fn`` made on symbolic values.

    Outside tracing this costs one scan of the arguments; inside, the call is
    handed to the symbolic value, which records ``wrapper`` itself as the node's
    target, so running the recorded graph calls exactly this function again.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        symbolic = find_symbolic(args, kwargs)
        if symbolic is not None:
            return symbolic.record_function(wrapper, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _tensor(x: Any, like: Tensor | None = None) -> Tensor:
    """x as a Tensor; a Python number takes the dtype of ``like``."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (np.ndarray, np.generic)):
        return Tensor._from_array(np.asarray(x), requires_grad=False)
    if like is not None and isinstance(x, (int, float, bool)):
        return Tensor._from_array(np.asarray(x, dtype=like.dtype), requires_grad=False)
    return Tensor(x)


def _pair(value: Any, name: str, op: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise ConfigError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ConfigError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _require_float(x: Tensor, op: str, name: str = "input") -> None:
    if x.dtype.kind != "f":
        raise DTypeError(f"{op}: {name} must be a floating-point tensor, got dtype {x.dtype}")


# ---- arithmetic ---------------------------------------------------------------------
@_traceable
def add(a, b) -> Tensor:
    """a + b with broadcasting."""
    a = _tensor(a, b if isinstance(b, Tensor) else None)
    return ops.Add.apply(a, _tensor(b, a))


@_traceable
def sub(a, b) -> Tensor:
    """a - b with broadcasting."""
    a = _tensor(a, b if isinstance(b, Tensor) else None)
    return ops.Sub.apply(a, _tensor(b, a))


@_traceable
def mul(a, b) -> Tensor:
    """a * b with broadcasting."""
    a = _tensor(a, b if isinstance(b, Tensor) else None)
    return ops.Mul.apply(a, _tensor(b, a))


@_traceable
def div(a, b) -> Tensor:
    """a / b with broadcasting."""
    a = _tensor(a, b if isinstance(b, Tensor) else None)
    return ops.Div.apply(a, _tensor(b, a))


@_traceable
def neg(a) -> Tensor:
    """-a"""
    return ops.Neg.apply(_tensor(a))


@_traceable
def pow(a, exponent: float) -> Tensor:
    """a ** exponent for a constant (Python number) exponent."""
    if isinstance(exponent, Tensor):
        raise DTypeError("pow: the exponent must be a number; for a tensor exponent use exp(b * log(a))")
    return ops.Pow.apply(_tensor(a), exponent=float(exponent))


@_traceable
def matmul(a, b) -> Tensor:
    """Matrix product with numpy's (and PyTorch's) rules: 1-D operands are promoted and
    their axis removed afterwards; (..., M, K) @ (..., K, N) broadcasts the batch axes
    (``(B, 1, M, K) @ (H, K, N)`` is (B, H, M, N))."""
    a, b = _tensor(a), _tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError("matmul: both operands need at least one dimension")
    ka = a.shape[-1]
    kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if ka != kb:
        raise ShapeError(f"matmul: shapes {a.shape} and {b.shape} do not align ({ka} != {kb})")
    if a.ndim > 2 and b.ndim > 2:
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ShapeError(f"matmul: batch dimensions {a.shape[:-2]} and {b.shape[:-2]} (of shapes {a.shape} "
                             f"and {b.shape}) do not broadcast") from None
    return ops.MatMul.apply(a, b)


@_traceable
def linear(x, weight, bias=None) -> Tensor:
    """y = x @ weight^T + bias, with weight (out_features, in_features); ``x`` is
    (..., in_features) with any number of leading axes ((N, C), (B, T, C), ...)."""
    x, weight = _tensor(x), _tensor(weight)
    if weight.ndim != 2:
        raise ShapeError(f"linear: weight must be 2-D (out, in), got shape {weight.shape}")
    if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ShapeError(
            f"linear: input has {x.shape[-1] if x.ndim else 0} features (shape {x.shape}) "
            f"but weight expects {weight.shape[1]} (weight shape {weight.shape})"
        )
    y = ops.MatMul.apply(x, ops.Permute.apply(weight, dims=(1, 0)))
    if bias is not None:
        bias = _tensor(bias)
        if bias.shape != (weight.shape[0],):
            raise ShapeError(f"linear: bias has shape {bias.shape}, expected ({weight.shape[0]},)")
        y = ops.Add.apply(y, bias)
    return y


# ---- reductions ---------------------------------------------------------------------
@_traceable
def sum(x, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001 - PyTorch's name
    """Sum over ``dim`` (None: all axes; an int or a tuple)."""
    x = _tensor(x)
    return ops.Sum.apply(x, axes=ops.normalize_dims(dim, x.ndim), keepdim=keepdim)


@_traceable
def mean(x, dim=None, keepdim: bool = False) -> Tensor:
    """Mean over ``dim``: sum / count."""
    x = _tensor(x)
    axes = ops.normalize_dims(dim, x.ndim)
    count = math.prod(x.shape[a] for a in axes)
    total = ops.Sum.apply(x, axes=axes, keepdim=keepdim)
    return ops.Mul.apply(total, _tensor(1.0 / count if count else math.nan, x))


@_traceable
def max(x, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001 - PyTorch's name
    """Maximum over ``dim``; the gradient is shared equally among tied maxima."""
    x = _tensor(x)
    axes = ops.normalize_dims(dim, x.ndim)
    if any(x.shape[a] == 0 for a in axes):
        raise ShapeError(f"max: cannot reduce an empty axis of a tensor of shape {x.shape}")
    return ops.Max.apply(x, axes=axes, keepdim=keepdim)


@_traceable
def var(x, dim=None, keepdim: bool = False, correction: int = 1) -> Tensor:
    """Variance: sum((x - mean)^2) / (count - correction); correction=1 is unbiased."""
    x = _tensor(x)
    axes = ops.normalize_dims(dim, x.ndim)
    count = math.prod(x.shape[a] for a in axes)
    centered = sub(x, mean(x, axes, keepdim=True))
    total = ops.Sum.apply(mul(centered, centered), axes=axes, keepdim=keepdim)
    denominator = _builtin_max(count - correction, 0)
    return ops.Mul.apply(total, _tensor(1.0 / denominator if denominator else math.inf, x))


# ---- shape ----------------------------------------------------------------------------
@_traceable
def reshape(x, shape: Sequence[int]) -> Tensor:
    """View with a new shape (one entry may be -1: inferred from the size)."""
    x = _tensor(x)
    shape = [int(s) for s in shape]
    unknown = [i for i, s in enumerate(shape) if s == -1]
    known = math.prod(s for s in shape if s != -1)
    if len(unknown) > 1 or any(s < -1 for s in shape):
        raise ShapeError(f"reshape: invalid target shape {tuple(shape)}")
    if unknown:
        if known == 0 or x.data.size % known:
            raise ShapeError(f"reshape: cannot reshape a tensor of shape {x.shape} to {tuple(shape)}")
        shape[unknown[0]] = x.data.size // known
    if math.prod(shape) != x.data.size:
        raise ShapeError(f"reshape: cannot reshape a tensor of shape {x.shape} to {tuple(shape)}")
    return ops.Reshape.apply(x, shape=tuple(shape))


@_traceable
def flatten(x, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """Merge axes start_dim..end_dim (inclusive) into one."""
    x = _tensor(x)
    if x.ndim == 0:
        return reshape(x, (1,))
    start, end = start_dim % x.ndim, end_dim % x.ndim
    if start > end:
        raise ShapeError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
    shape = x.shape[:start] + (math.prod(x.shape[start:end + 1]),) + x.shape[end + 1:]
    return ops.Reshape.apply(x, shape=shape)


@_traceable
def permute(x, dims: Sequence[int]) -> Tensor:
    """Reorder axes: out.shape[i] = x.shape[dims[i]]."""
    x = _tensor(x)
    dims = tuple(int(d) % _builtin_max(x.ndim, 1) for d in dims)
    if sorted(dims) != list(range(x.ndim)):
        raise ShapeError(f"permute: dims {dims} is not a permutation of {x.ndim} axes")
    return ops.Permute.apply(x, dims=dims)


@_traceable
def transpose(x, dim0: int, dim1: int) -> Tensor:
    """Swap two axes."""
    x = _tensor(x)
    dims = list(range(x.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return ops.Permute.apply(x, dims=tuple(dims))


@_traceable
def getitem(x, index) -> Tensor:
    """x[index] with numpy indexing (Tensors in the index are used as arrays)."""
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return ops.GetItem.apply(_tensor(x), index=index)


@_traceable
def cat(tensors: Sequence, dim: int = 0) -> Tensor:
    """Join tensors along ``dim``; all other axes must match."""
    tensors = [_tensor(t) for t in tensors]
    if not tensors:
        raise ShapeError("cat: needs at least one tensor")
    ndim = tensors[0].ndim
    axis = dim % _builtin_max(ndim, 1)
    for i, t in enumerate(tensors):
        rest = t.shape[:axis] + t.shape[axis + 1:]
        if t.ndim != ndim or rest != tensors[0].shape[:axis] + tensors[0].shape[axis + 1:]:
            raise ShapeError(
                f"cat: tensor {i} has shape {t.shape}, which does not match {tensors[0].shape} "
                f"outside dim {dim}"
            )
    return ops.Cat.apply(*tensors, axis=axis)


@_traceable
def cast(x, dtype) -> Tensor:
    """Convert to ``dtype`` (differentiable between float dtypes)."""
    x = _tensor(x)
    if np.dtype(dtype) == x.dtype:
        return x
    return ops.Cast.apply(x, dtype=np.dtype(dtype))


# ---- elementwise ----------------------------------------------------------------------
@_traceable
def exp(x) -> Tensor:
    """e^x"""
    return ops.Exp.apply(_tensor(x))


@_traceable
def log(x) -> Tensor:
    """Natural logarithm."""
    return ops.Log.apply(_tensor(x))


@_traceable
def sqrt(x) -> Tensor:
    """Square root."""
    return ops.Sqrt.apply(_tensor(x))


@_traceable
def clamp(x, min=None, max=None) -> Tensor:  # noqa: A002 - PyTorch's names
    """min(max(x, min), max); the gradient passes where min <= x <= max."""
    return ops.Clamp.apply(_tensor(x), lo=min, hi=max)


@_traceable
def relu(x) -> Tensor:
    """max(x, 0)"""
    return ops.Relu.apply(_tensor(x))


@_traceable
def relu6(x) -> Tensor:
    """min(max(x, 0), 6)"""
    return ops.Clamp.apply(_tensor(x), lo=0.0, hi=6.0)


@_traceable
def leaky_relu(x, negative_slope: float = 0.01) -> Tensor:
    """x for x > 0, negative_slope * x otherwise: relu(x) - slope * relu(-x)."""
    x = _tensor(x)
    return sub(relu(x), mul(relu(neg(x)), negative_slope))


@_traceable
def sigmoid(x) -> Tensor:
    """1 / (1 + e^-x)"""
    return ops.Sigmoid.apply(_tensor(x))


@_traceable
def hardswish(x) -> Tensor:
    """x * relu6(x + 3) / 6 (Howard et al. 2019, MobileNetV3), in PyTorch's order of operations:
    0 below -3, x above 3, a parabola between."""
    x = _tensor(x)
    return div(mul(x, relu6(add(x, 3.0))), 6.0)


@_traceable
def hardsigmoid(x) -> Tensor:
    """relu6(x + 3) / 6, in PyTorch's order of operations: 0 below -3, 1 above 3, linear between."""
    return div(relu6(add(_tensor(x), 3.0)), 6.0)


@_traceable
def tanh(x) -> Tensor:
    """Hyperbolic tangent."""
    return ops.Tanh.apply(_tensor(x))


@_traceable
def log_softmax(x, dim: int = -1) -> Tensor:
    """x_i - log(sum_j e^{x_j}) along ``dim``."""
    x = _tensor(x)
    _require_float(x, "log_softmax")
    return ops.LogSoftmax.apply(x, axis=ops.normalize_dims(dim, x.ndim)[0])


@_traceable
def softmax(x, dim: int = -1) -> Tensor:
    """e^{x_i} / sum_j e^{x_j} along ``dim`` (= exp(log_softmax))."""
    return exp(log_softmax(x, dim))


# ---- losses ---------------------------------------------------------------------------
_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Tensor, reduction: str, op: str) -> Tensor:
    if reduction == "mean":
        return mean(loss)
    if reduction == "sum":
        return sum(loss)
    if reduction == "none":
        return loss
    raise ConfigError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _class_targets(target, n: int, classes: int, op: str) -> np.ndarray:
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    if t.dtype.kind not in "iu":
        raise DTypeError(f"{op}: target must hold integer class indices, got dtype {t.dtype}")
    if t.shape != (n,):
        raise ShapeError(f"{op}: target has shape {t.shape}, expected ({n},) for input of {n} rows")
    if t.size and (t.min() < 0 or t.max() >= classes):
        raise ShapeError(f"{op}: target values must lie in [0, {classes - 1}], got [{t.min()}, {t.max()}]")
    return t


@_traceable
def nll_loss(log_probs, target, reduction: str = "mean") -> Tensor:
    """-log_probs[i, target_i], reduced; log_probs shaped (N, C)."""
    log_probs = _tensor(log_probs)
    if log_probs.ndim != 2:
        raise ShapeError(f"nll_loss: input must be (N, C), got shape {log_probs.shape}")
    n, c = log_probs.shape
    t = _class_targets(target, n, c, "nll_loss")
    picked = ops.GetItem.apply(log_probs, index=(np.arange(n), t))
    return _reduce(neg(picked), reduction, "nll_loss")


@_traceable
def cross_entropy(logits, target, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy with integer targets, logits shaped (N, C).

    loss_i = (1 - eps) * (-log p_{i, target_i}) + eps * mean_c(-log p_{i, c}),
    p = softmax(logits), eps = label_smoothing (PyTorch's definition).
    """
    logits = _tensor(logits)
    if logits.ndim != 2:
        raise ShapeError(f"cross_entropy: logits must be (N, C), got shape {logits.shape}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    log_probs = log_softmax(logits, 1)
    loss = nll_loss(log_probs, target, reduction="none")
    if label_smoothing:
        smooth = neg(mean(log_probs, 1))
        loss = add(mul(loss, 1.0 - label_smoothing), mul(smooth, label_smoothing))
    return _reduce(loss, reduction, "cross_entropy")


@_traceable
def mse_loss(prediction, target, reduction: str = "mean") -> Tensor:
    """(prediction - target)^2, reduced."""
    prediction = _tensor(prediction)
    target = _tensor(target, prediction)
    if prediction.shape != target.shape:
        raise ShapeError(f"mse_loss: prediction {prediction.shape} and target {target.shape} differ in shape")
    diff = sub(prediction, target)
    return _reduce(mul(diff, diff), reduction, "mse_loss")


# ---- convolution and pooling ------------------------------------------------------------
@_traceable
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """2-D cross-correlation of x (N, C, H, W) with weight (K, C/groups, kh, kw).

    out[n, k, i, j] = bias[k] + sum_{c, u, v} weight[k, c, u, v] *
                      x[n, g*C/groups + c, i*sh - ph + u*dh, j*sw - pw + v*dw]
    for the group g of output channel k; groups == C == K is depthwise, computed by
    :class:`~qatcore.ops.DepthwiseConv2d` (direct loops), every other case by
    :class:`~qatcore.ops.Conv2d` (im2col and GEMM).
    """
    x, weight = _tensor(x), _tensor(weight)
    _require_float(x, "conv2d")
    if x.ndim != 4 or weight.ndim != 4:
        raise ShapeError(
            f"conv2d: input must be (N, C, H, W) and weight (K, C/groups, kh, kw); "
            f"got {x.shape} and {weight.shape}"
        )
    stride = _pair(stride, "stride", "conv2d", 1)
    padding = _pair(padding, "padding", "conv2d", 0)
    dilation = _pair(dilation, "dilation", "conv2d", 1)
    k, cg, kh, kw = weight.shape
    if not isinstance(groups, (int, np.integer)) or groups < 1 or k % groups:
        raise ConfigError(f"conv2d: groups must be a positive divisor of out_channels {k}, got {groups}")
    if x.shape[1] != cg * groups:
        raise ShapeError(
            f"conv2d: input has {x.shape[1]} channels but weight {weight.shape} with "
            f"groups={groups} expects {cg * groups}"
        )
    for axis, (size, kern, s, p, d) in enumerate(zip(x.shape[2:], (kh, kw), stride, padding, dilation)):
        if ops.conv_output_size(size, kern, s, p, d) < 1:
            raise ShapeError(
                f"conv2d: kernel {(kh, kw)} with dilation {dilation} does not fit input "
                f"{x.shape[2:]} padded by {padding} (axis {axis + 2})"
            )
    if bias is not None:
        bias = _tensor(bias)
        if bias.shape != (k,):
            raise ShapeError(f"conv2d: bias has shape {bias.shape}, expected ({k},)")
    if weight.dtype != x.dtype:
        raise DTypeError(f"conv2d: input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    if cg == 1 and groups == k == x.shape[1]:
        # depthwise with channel multiplier 1: direct loops, not C one-row GEMMs
        return ops.DepthwiseConv2d.apply(x, weight, bias, stride=stride, padding=padding, dilation=dilation)
    return ops.Conv2d.apply(
        x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=int(groups)
    )


def _pool_args(x: Tensor, op: str, kernel_size, stride, padding, dilation=1):
    x = _tensor(x)
    _require_float(x, op)
    if x.ndim != 4:
        raise ShapeError(f"{op}: input must be (N, C, H, W), got shape {x.shape}")
    kernel = _pair(kernel_size, "kernel_size", op, 1)
    stride = kernel if stride is None else _pair(stride, "stride", op, 1)
    padding = _pair(padding, "padding", op, 0)
    dilation = _pair(dilation, "dilation", op, 1)
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise ConfigError(f"{op}: padding {padding} must be at most half the kernel size {kernel}")
    for size, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation):
        if ops.conv_output_size(size, k, s, p, d) < 1:
            raise ShapeError(f"{op}: kernel {kernel} does not fit input {x.shape[2:]} padded by {padding}")
    return x, kernel, stride, padding, dilation


@_traceable
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1) -> Tensor:
    """Maximum over each kernel window (stride defaults to kernel_size)."""
    x, kernel, stride, padding, dilation = _pool_args(x, "max_pool2d", kernel_size, stride, padding, dilation)
    return ops.MaxPool2d.apply(x, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)


@_traceable
def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> Tensor:
    """Mean over each kernel window (stride defaults to kernel_size)."""
    x, kernel, stride, padding, _ = _pool_args(x, "avg_pool2d", kernel_size, stride, padding)
    return ops.AvgPool2d.apply(
        x, kernel_size=kernel, stride=stride, padding=padding, count_include_pad=bool(count_include_pad)
    )


@_traceable
def adaptive_avg_pool2d(x, output_size=1) -> Tensor:
    """Average-pool to ``output_size``; 1 (global average pooling) is the mean over
    H and W; larger sizes must divide H and W."""
    x = _tensor(x)
    if x.ndim != 4:
        raise ShapeError(f"adaptive_avg_pool2d: input must be (N, C, H, W), got shape {x.shape}")
    oh, ow = _pair(output_size, "output_size", "adaptive_avg_pool2d", 1)
    h, w = x.shape[2:]
    if (oh, ow) == (1, 1):
        return mean(x, (2, 3), keepdim=True)
    if h % oh or w % ow:
        raise ShapeError(
            f"adaptive_avg_pool2d: output size {(oh, ow)} must divide the input size {(h, w)}"
        )
    return avg_pool2d(x, (h // oh, w // ow))


# ---- normalization and regularization ------------------------------------------------
@_traceable
def batch_norm(
    x, running_mean, running_var, weight=None, bias=None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5,
) -> Tensor:
    """Batch normalization over axis 1 of (N, C) or (N, C, H, W) input.

    xhat = (x - mu) / sqrt(var + eps),  out = weight * xhat + bias, with batch
    statistics while training (and the running statistics updated in place:
    r <- (1 - momentum) * r + momentum * batch_stat, the variance unbiased), the
    running statistics otherwise. Inside a data-parallel group
    (``qatcore.process_group.current_group()``) training uses the global batch's
    statistics, reduced over the ranks (``qatcore.ops.normalization``).
    """
    x = _tensor(x)
    _require_float(x, "batch_norm")
    if x.ndim < 2:
        raise ShapeError(f"batch_norm: input must be (N, C, ...), got shape {x.shape}")
    c = x.shape[1]
    stats = []
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        arr = value.data if isinstance(value, Tensor) else value
        if arr is not None and (not isinstance(arr, np.ndarray) or arr.shape != (c,)):
            raise ShapeError(f"batch_norm: {name} must be an array of shape ({c},)")
        stats.append(arr)
    if not training and (stats[0] is None or stats[1] is None):
        raise ConfigError("batch_norm: eval mode (training=False) needs running_mean and running_var")
    # in a data-parallel group the global batch counts, and the op checks it after its reduction
    if training and x.data.size // c < 2 and current_group() is None:
        raise ShapeError(
            f"batch_norm: training needs more than one value per channel, got input shape {x.shape}"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ConfigError(f"batch_norm: momentum must be in [0, 1], got {momentum}")
    params = []
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            value = _tensor(value)
            if value.shape != (c,):
                raise ShapeError(f"batch_norm: {name} has shape {value.shape}, expected ({c},)")
        params.append(value)
    return ops.BatchNorm.apply(
        x, params[0], params[1], running_mean=stats[0], running_var=stats[1],
        training=bool(training), momentum=float(momentum), eps=float(eps),
    )


@_traceable
def dropout(x, p: float = 0.5, training: bool = True, generator: np.random.Generator | None = None) -> Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p).

    The mask comes from ``generator`` (an ``np.random.Generator``), or without one
    from qatcore's default generator (:func:`qatcore.manual_seed` fixes it).
    """
    x = _tensor(x)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    generator = generator_or_default(generator, "dropout: generator")
    if p == 1.0:
        return mul(x, np.zeros(x.shape, dtype=x.dtype))
    keep = generator.random(x.shape) >= p
    return mul(x, (keep / (1.0 - p)).astype(x.dtype))


# ==== attention (issue 19): scaled dot-product attention ===============================
# Self-contained block: composed from matmul, transpose, mul, add and softmax above.
__all__ += ["scaled_dot_product_attention", "attention_probabilities", "additive_attention_mask"]


def additive_attention_mask(attn_mask, is_causal: bool, query_shape: tuple, key_shape: tuple, dtype,
                            op: str = "scaled_dot_product_attention"):
    """What ``attn_mask`` / ``is_causal`` add to the scores (..., L, S) of a query
    (..., L, E) and a key (..., S, E): (additive, dead) with ``additive`` None, a constant
    array of ``dtype`` (0 where attended, -inf where not), or the mask Tensor itself (a
    float mask that requires grad), and ``dead`` a boolean array (..., L, 1) of the rows
    where nothing is attended (their mask is made 0 and their probabilities 0), or None."""
    length, source = query_shape[-2], key_shape[-2]
    if is_causal and attn_mask is not None:
        raise ConfigError(f"{op}: give attn_mask or is_causal=True, not both (as in PyTorch)")
    if is_causal:
        causal = np.tril(np.ones((length, source), dtype=bool))
        return np.where(causal, 0.0, -np.inf).astype(dtype), (None if source else np.ones((length, 1), bool))
    if attn_mask is None:
        return None, None
    mask = attn_mask if isinstance(attn_mask, Tensor) else _tensor(np.asarray(attn_mask))
    scores_shape = np.broadcast_shapes(tuple(query_shape[:-2]), tuple(key_shape[:-2])) + (length, source)
    try:
        fits = mask.ndim <= len(scores_shape) and np.broadcast_shapes(mask.shape, scores_shape) == scores_shape
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(f"{op}: attn_mask of shape {mask.shape} does not broadcast to the scores' shape "
                         f"{scores_shape} (..., L, S)")
    if mask.dtype == np.bool_:
        additive = np.where(mask.data, 0.0, -np.inf).astype(dtype)
        dead = ~np.any(mask.data, axis=-1, keepdims=True)
    elif mask.dtype.kind == "f":
        additive = mask if mask.requires_grad else mask.data.astype(dtype)
        dead = np.all(np.isneginf(mask.data), axis=-1, keepdims=True)
    else:
        raise DTypeError(f"{op}: attn_mask must be boolean (True: attend) or floating point (added to the "
                         f"scores), got dtype {mask.dtype}")
    if not dead.any():
        return additive, None
    if isinstance(additive, Tensor):
        raise ConfigError(f"{op}: a float attn_mask that requires grad must leave every row a finite entry "
                          f"(some rows are all -inf)")
    return np.where(dead, 0.0, additive).astype(dtype), dead


@_traceable
def attention_probabilities(query, key, attn_mask=None, is_causal: bool = False, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) over the last axis: the attention weights (..., L, S)
    of ``scaled_dot_product_attention`` (arguments as there). A row with no position to
    attend is all zeros (PyTorch's safe softmax), with a zero gradient."""
    op = "attention_probabilities"
    query, key = _tensor(query), _tensor(key)
    for name, t in (("query", query), ("key", key)):
        _require_float(t, op, name)
        if t.ndim < 2:
            raise ShapeError(f"{op}: {name} must be (..., length, embedding), got shape {t.shape}")
    if query.shape[-1] != key.shape[-1]:
        raise ShapeError(f"{op}: query and key must share the embedding size (last axis), got shapes "
                         f"{query.shape} and {key.shape}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ConfigError(f"{op}: scale must be a finite number or None (1/sqrt(E)), got {scale!r}")
    additive, dead = additive_attention_mask(attn_mask, is_causal, query.shape, key.shape, query.dtype, op)
    scores = mul(matmul(query, transpose(key, -2, -1)), _tensor(float(scale), query))
    if additive is not None:
        scores = add(scores, additive)
    probabilities = softmax(scores, -1)
    if dead is not None:
        probabilities = mul(probabilities, (~dead).astype(query.dtype))
    return probabilities


@_traceable
def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    """softmax(q k^T / sqrt(E) + mask) v, PyTorch's ``F.scaled_dot_product_attention``.

    Args:
        query: (..., L, E); key: (..., S, E); value: (..., S, Ev); the batch axes
            ((B, H) or (B,)) broadcast.
        attn_mask: boolean (True: the position takes part) or float (added to the
            scores), broadcasting to (..., L, S).
        is_causal: query i attends to keys 0..i only (``tril`` of an (L, S) matrix of
            ones, top-left aligned as in PyTorch); an error together with ``attn_mask``.
        scale: the factor of the scores; None is 1/sqrt(E).

    Returns: (..., L, Ev). The softmax is computed as exp(log_softmax), which subtracts
    each row's maximum first (docs/numerics.md, "Attention").

    >>> import numpy as np
    >>> q = np.zeros((1, 2, 3, 4)); v = np.arange(24.0).reshape(1, 2, 3, 4)
    >>> scaled_dot_product_attention(q, q, v, is_causal=True).numpy()[0, 0, :, 0]
    array([0., 2., 4.])
    """
    value = _tensor(value)
    key_t = _tensor(key)
    _require_float(value, "scaled_dot_product_attention", "value")
    if value.ndim < 2 or key_t.ndim < 2 or value.shape[-2] != key_t.shape[-2]:
        raise ShapeError(f"scaled_dot_product_attention: value (..., S, Ev) must have as many positions as key "
                         f"(..., S, E), got shapes {value.shape} and {key_t.shape}")
    probabilities = attention_probabilities(query, key_t, attn_mask, is_causal, scale)
    return matmul(probabilities, value)


# ==== transformer layers (issue 19): layer_norm, rms_norm, gelu, silu, embedding ===============
# Self-contained block: its helpers are prefixed _tf_ and its names join __all__ here.
__all__ += ["layer_norm", "rms_norm", "gelu", "silu", "embedding"]

_GELU_APPROXIMATIONS = ("none", "tanh")


def _tf_normalized_shape(x: Tensor, normalized_shape, op: str) -> tuple[int, ...]:
    """normalized_shape as a tuple of ints that ends x's shape."""
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    if not shape or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
        raise ConfigError(f"{op}: normalized_shape must be a positive int or a non-empty sequence of positive "
                          f"ints, got {normalized_shape!r}")
    shape = tuple(int(s) for s in shape)
    if x.ndim < len(shape) or x.shape[x.ndim - len(shape):] != shape:
        raise ShapeError(f"{op}: input of shape {x.shape} does not end with normalized_shape {shape}")
    return shape


def _tf_affine(value, shape: tuple[int, ...], x: Tensor, name: str, op: str) -> Tensor | None:
    """An optional weight or bias of the normalized shape and x's dtype."""
    if value is None:
        return None
    value = _tensor(value)
    if value.shape != shape:
        raise ShapeError(f"{op}: {name} has shape {value.shape}, expected normalized_shape {shape}")
    if value.dtype != x.dtype:
        raise DTypeError(f"{op}: {name} dtype {value.dtype} differs from the input dtype {x.dtype}")
    return value


def _tf_eps(eps, op: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps >= 0:
        raise ConfigError(f"{op}: eps must be a number >= 0, got {eps!r}")
    return float(eps)


@_traceable
def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` axes (Ba et al. 2016):

        out = (x - mean) / sqrt(var + eps) * weight + bias

    with the mean and the biased variance over those axes, per sample (docs/numerics.md,
    "Layer norm and RMS norm"; ``qatcore.ops.layer_norm``).

    >>> import numpy as np
    >>> y = layer_norm(np.array([[1.0, 2.0, 3.0]]), (3,), eps=0.0)
    >>> [round(v, 6) for v in y.numpy()[0].tolist()]
    [-1.224745, 0.0, 1.224745]
    """
    x = _tensor(x)
    _require_float(x, "layer_norm")
    shape = _tf_normalized_shape(x, normalized_shape, "layer_norm")
    weight = _tf_affine(weight, shape, x, "weight", "layer_norm")
    bias = _tf_affine(bias, shape, x, "bias", "layer_norm")
    return ops.LayerNorm.apply(x, weight, bias, normalized_ndim=len(shape), eps=_tf_eps(eps, "layer_norm"))


@_traceable
def rms_norm(x, normalized_shape, weight=None, eps: float | None = None) -> Tensor:
    """RMS normalization over the trailing ``normalized_shape`` axes (Zhang and Sennrich 2019):

        out = x / sqrt(mean(x^2) + eps) * weight

    eps None is the input dtype's machine epsilon (``np.finfo(dtype).eps``, PyTorch's default).

    >>> import numpy as np
    >>> y = rms_norm(np.array([[3.0, 4.0]]), (2,), eps=0.0)
    >>> [round(v, 6) for v in y.numpy()[0].tolist()]
    [0.848528, 1.131371]
    """
    x = _tensor(x)
    _require_float(x, "rms_norm")
    shape = _tf_normalized_shape(x, normalized_shape, "rms_norm")
    weight = _tf_affine(weight, shape, x, "weight", "rms_norm")
    eps = float(np.finfo(x.dtype).eps) if eps is None else _tf_eps(eps, "rms_norm")
    return ops.RMSNorm.apply(x, weight, normalized_ndim=len(shape), eps=eps)


@_traceable
def gelu(x, approximate: str = "none") -> Tensor:
    """GELU (Hendrycks and Gimpel 2016): x * Phi(x), Phi the standard normal CDF.

    approximate="none": Phi(x) = (1 + erf(x / sqrt 2)) / 2 (exact);
    approximate="tanh": x / 2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).

    >>> import numpy as np
    >>> [round(v, 6) for v in gelu(np.array([-1.0, 0.0, 1.0])).numpy().tolist()]
    [-0.158655, 0.0, 0.841345]
    """
    if approximate not in _GELU_APPROXIMATIONS:
        raise ConfigError(f"gelu: approximate must be one of {_GELU_APPROXIMATIONS}, got {approximate!r}")
    x = _tensor(x)
    _require_float(x, "gelu")
    return (ops.Gelu if approximate == "none" else ops.GeluTanh).apply(x)


@_traceable
def silu(x) -> Tensor:
    """SiLU (swish): x * sigmoid(x)."""
    x = _tensor(x)
    _require_float(x, "silu")
    return ops.Silu.apply(x)


@_traceable
def embedding(input, weight, padding_idx: int | None = None) -> Tensor:  # noqa: A002 - PyTorch's name
    """Rows of ``weight`` (num_embeddings, embedding_dim) picked by the integer ``input``:
    out has shape input.shape + (embedding_dim,). With ``padding_idx`` (negative counts from
    the end) that row receives no gradient. ``input`` is a constant (no gradient).

    >>> import numpy as np
    >>> embedding(np.array([[2, 0]]), np.arange(6.0).reshape(3, 2)).numpy().tolist()
    [[[4.0, 5.0], [0.0, 1.0]]]
    """
    weight = _tensor(weight)
    indices = input.data if isinstance(input, Tensor) else np.asarray(input)
    if weight.ndim != 2:
        raise ShapeError(f"embedding: weight must be 2-D (num_embeddings, embedding_dim), got shape {weight.shape}")
    _require_float(weight, "embedding", "weight")
    if indices.dtype.kind not in "iu":
        raise DTypeError(f"embedding: input must hold integer indices, got dtype {indices.dtype}")
    rows = weight.shape[0]
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= rows):
        raise ShapeError(f"embedding: input indices must lie in [0, {rows - 1}] (num_embeddings {rows}), got "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)) \
                or not -rows <= padding_idx < rows:
            raise ConfigError(f"embedding: padding_idx must be None or an int in [{-rows}, {rows - 1}], "
                              f"got {padding_idx!r}")
        padding_idx = int(padding_idx) % rows
    return ops.Embedding.apply(weight, indices=indices.astype(np.intp, copy=False), padding_idx=padding_idx)


# ==== ONNX import (issue 20): erf, where, take, slice_axis, unsqueeze, squeeze, expand, pad =======
# Self-contained block: the ops imported ONNX graphs call that the sections above lack; all but
# erf and where are composed from the shape primitives (GetItem, Reshape, Cat) and add.
__all__ += ["erf", "where", "take", "slice_axis", "unsqueeze", "squeeze", "expand", "pad"]


def _ox_axis(dim, ndim: int, op: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not -ndim <= dim < _builtin_max(ndim, 1):
        raise ShapeError(f"{op}: dim {dim!r} is out of range for a tensor of {ndim} axes")
    return int(dim) % _builtin_max(ndim, 1)


def _ox_axes(dims, ndim: int, op: str) -> tuple[int, ...]:
    """dims (an int or a sequence of ints, negative counting from the end) as distinct axes."""
    axes = tuple(_ox_axis(d, ndim, op) for d in ((dims,) if isinstance(dims, (int, np.integer)) else dims))
    if len(set(axes)) != len(axes):
        raise ShapeError(f"{op}: dims {dims!r} name an axis twice")
    return axes


@_traceable
def erf(x) -> Tensor:
    """The error function, erf(x) = 2/sqrt(pi) * integral_0^x e^(-t^2) dt, elementwise.

    >>> import numpy as np
    >>> [round(v, 6) for v in erf(np.array([-1.0, 0.0, 0.5])).numpy().tolist()]
    [-0.842701, 0.0, 0.5205]
    """
    x = _tensor(x)
    _require_float(x, "erf")
    return ops.Erf.apply(x)


@_traceable
def where(condition, x, y) -> Tensor:
    """x where ``condition`` is True, else y; the three broadcast (numpy's rules). The
    condition is a constant boolean array (no gradient); x and y get theirs where chosen.

    >>> import numpy as np
    >>> where(np.array([True, False]), np.array([1.0, 2.0]), -np.inf).numpy().tolist()
    [1.0, -inf]
    """
    cond = condition.data if isinstance(condition, Tensor) else np.asarray(condition)
    if cond.dtype != np.bool_:
        raise DTypeError(f"where: condition must be boolean, got dtype {cond.dtype}")
    x = _tensor(x, y if isinstance(y, Tensor) else None)
    y = _tensor(y, x)
    if x.dtype != y.dtype:
        raise DTypeError(f"where: x and y differ in dtype ({x.dtype} and {y.dtype})")
    try:
        np.broadcast_shapes(cond.shape, x.shape, y.shape)
    except ValueError:
        raise ShapeError(f"where: condition {cond.shape}, x {x.shape} and y {y.shape} do not broadcast") from None
    return ops.Where.apply(x, y, condition=cond)


@_traceable
def take(x, indices, dim: int = 0) -> Tensor:
    """The entries of x at the integer ``indices`` along ``dim`` (numpy's ``take``, ONNX's Gather):
    the result has shape x.shape[:dim] + indices.shape + x.shape[dim + 1:], so a single index
    removes the axis. Negative indices count from the end; ``indices`` is a constant.

    >>> import numpy as np
    >>> take(np.arange(6.0).reshape(2, 3), np.array([2, 0]), 1).numpy().tolist()
    [[2.0, 0.0], [5.0, 3.0]]
    """
    x = _tensor(x)
    index = indices.data if isinstance(indices, Tensor) else np.asarray(indices)
    if index.dtype.kind not in "iu":
        raise DTypeError(f"take: indices must be integers, got dtype {index.dtype}")
    axis = _ox_axis(dim, x.ndim, "take")
    size = x.shape[axis]
    if index.size and (int(index.min()) < -size or int(index.max()) >= size):
        raise ShapeError(f"take: indices must lie in [{-size}, {size - 1}] along dim {dim} of shape {x.shape}, "
                         f"got [{int(index.min())}, {int(index.max())}]")
    selected = int(index) if index.ndim == 0 else index.astype(np.intp, copy=False)
    return ops.GetItem.apply(x, index=(slice(None),) * axis + (selected,))


@_traceable
def slice_axis(x, dim: int, start, end, step: int = 1) -> Tensor:
    """x[..., start:end:step, ...] along ``dim``, with Python's slice rules (negative values
    count from the end, bounds are clamped; ``None`` for an open end), as ONNX's Slice.

    >>> import numpy as np
    >>> slice_axis(np.arange(10.0), 0, -3, None).numpy().tolist()
    [7.0, 8.0, 9.0]
    """
    x = _tensor(x)
    axis = _ox_axis(dim, x.ndim, "slice_axis")
    for name, value in (("start", start), ("end", end), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ConfigError(f"slice_axis: {name} must be an int or None, got {value!r}")
    if step == 0:
        raise ConfigError("slice_axis: step must not be 0")
    bounds = slice(None if start is None else int(start), None if end is None else int(end), int(step))
    return ops.GetItem.apply(x, index=(slice(None),) * axis + (bounds,))


@_traceable
def unsqueeze(x, dim) -> Tensor:
    """x with new axes of size 1 at ``dim`` (an int or several; positions in the result, negative
    counting from its end), as ONNX's Unsqueeze.

    >>> import numpy as np
    >>> unsqueeze(np.zeros((2, 3)), (0, -1)).shape
    (1, 2, 3, 1)
    """
    x = _tensor(x)
    count = 1 if isinstance(dim, (int, np.integer)) else len(dim)
    axes = set(_ox_axes(dim, x.ndim + count, "unsqueeze"))
    rest = iter(x.shape)
    return ops.Reshape.apply(x, shape=tuple(1 if i in axes else next(rest) for i in range(x.ndim + count)))


@_traceable
def squeeze(x, dim=None) -> Tensor:
    """x without the axes ``dim`` (an int or several), each of size 1; None removes every axis of
    size 1 (ONNX's Squeeze).

    >>> import numpy as np
    >>> squeeze(np.zeros((1, 2, 1)), -1).shape
    (1, 2)
    """
    x = _tensor(x)
    axes = tuple(i for i, s in enumerate(x.shape) if s == 1) if dim is None else _ox_axes(dim, x.ndim, "squeeze")
    wide = [a for a in axes if x.shape[a] != 1]
    if wide:
        raise ShapeError(f"squeeze: axes {wide} of shape {x.shape} do not have size 1")
    return ops.Reshape.apply(x, shape=tuple(s for i, s in enumerate(x.shape) if i not in axes))


@_traceable
def expand(x, shape: Sequence[int]) -> Tensor:
    """x broadcast with ``shape`` (ONNX's Expand: numpy's rules in both directions, so a 1 in
    ``shape`` keeps x's axis; unlike PyTorch's expand, -1 is not an entry). Computed as
    x + zeros(shape), whose gradient sums back to x's shape.

    >>> import numpy as np
    >>> expand(np.ones((3, 1)), (2, 1, 4)).shape
    (2, 3, 4)
    """
    x = _tensor(x)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ShapeError(f"expand: shape {shape} has a negative entry")
    try:
        np.broadcast_shapes(x.shape, shape)
    except ValueError:
        raise ShapeError(f"expand: a tensor of shape {x.shape} does not broadcast with {shape}") from None
    return ops.Add.apply(x, _tensor(np.zeros(shape, x.dtype)))


@_traceable
def pad(x, pad: Sequence[int], value: float = 0.0) -> Tensor:  # noqa: A002 - PyTorch's names
    """x padded with the constant ``value``, PyTorch's ``F.pad`` (constant mode): ``pad`` holds
    (before, after) counts for the last axis first, then the one before it, and so on
    ((left, right, top, bottom) for an (N, C, H, W) input). Counts are >= 0. Composed of
    concatenations, so the gradient is the matching slice.

    >>> import numpy as np
    >>> pad(np.ones((1, 2)), (1, 0), -np.inf).numpy().tolist()
    [[-inf, 1.0, 1.0]]
    """
    x = _tensor(x)
    counts = [int(p) for p in pad]
    if len(counts) % 2 or len(counts) // 2 > x.ndim or any(p < 0 for p in counts):
        raise ConfigError(f"pad: pad must hold non-negative (before, after) pairs for at most {x.ndim} axes, "
                          f"got {tuple(pad)}")
    out = x
    for i in range(len(counts) // 2):
        axis, before, after = x.ndim - 1 - i, counts[2 * i], counts[2 * i + 1]
        if before or after:
            parts = [_ox_filler(out, axis, before, value), out, _ox_filler(out, axis, after, value)]
            out = ops.Cat.apply(*[p for p in parts if p is not None], axis=axis)
    return out


def _ox_filler(x: Tensor, axis: int, count: int, value: float) -> Tensor | None:
    """``count`` slices of ``value`` along ``axis``, shaped as x otherwise (None for 0)."""
    if not count:
        return None
    return _tensor(np.full(x.shape[:axis] + (count,) + x.shape[axis + 1:], value, x.dtype))
