"""Per-group and per-token fake quantization with dynamic qparams (docs/numerics.md,
"Per-group and per-token fake quantization"): the scale and zero point are computed
from the values on every call, no observer. Bit for bit torchao 0.18's
``IntxFakeQuantizer`` in float32 (weights: ``PerGroup(group_size)``; activations:
``PerToken()``, ``is_dynamic=True``).

A *block* is ``group_size`` consecutive elements along the last axis (per group; the
input features of a Linear weight) or a whole row over the last axis (per token). With
``b`` bits the grid is signed, ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``, in every
scheme (torchao's ``torch.int{b}`` bounds). Per block, in the input's float dtype:

    symmetric (per group; per token)   mn = min(min(x), 0);  mx = max(max(x), 0)
        s = max(max(-mn, mx) / ((qmax - qmin) / 2), tiny);   z = 0
    asymmetric per token               (mn, mx as above)
        s = max((mx - mn) / (qmax - qmin), tiny);   z = clamp(qmin - rne(mn / s), qmin, qmax)
    asymmetric per group               (torchao's tinygemm parameters; zero NOT included)
        s = max((max(x) - min(x)) / (2^b - 1), 1e-6)
        z = int32(min(x) + s * 2^(b-1))                       # truncated toward zero

    inv = 1 / s;   q = rne(x * inv) + z;   y = (clamp(q, qmin, qmax) - z) * s

Ternary weights with absmean scaling (BitNet b1.58, Ma et al. 2024), per tensor or per
group, with BitNet's arithmetic (its ``weight_quant``: a multiplier, then a division):

    inv = 1 / max(mean(|x|), 1e-5);   y = clamp(rne(x * inv), -1, 1) / inv

(the mean in float64, then rounded to x's dtype), and BitNet's straight-through estimator,
``dx = dy`` everywhere (``w + (u - w).detach()``: no clipping mask, so weights beyond the
grid keep learning).

``tiny`` is the dtype's smallest normal number; ``int32(v)`` truncates and gives
``-2^31`` for a value outside the int32 range, as PyTorch's conversion on x86 does.

Backward, torchao's straight-through estimator (its ``_Round`` passes the gradient,
``torch.clamp`` masks it, the qparams are constants):

    dx = where(qmin <= q <= qmax, dy * s, 0) * inv

(``(dy * s) * inv`` rounds twice, so inside the grid ``dx = dy`` to within a few ulp; not in an
all-zero block, whose ``s`` is ``tiny`` and ``dy * s`` a subnormal with fewer bits.)

>>> import numpy as np
>>> x = np.array([[0.0, 0.1, -0.2, 0.75]], dtype=np.float32)
>>> fake_quantize_per_group(x, group_size=4, bits=4)   # s = 0.75 / 7.5 = 0.1; 7.5 rounds to 8, clamps to 7
array([[ 0. ,  0.1, -0.2,  0.7]], dtype=float32)
"""

from __future__ import annotations

import numpy as np

from qatcore.autograd.function import Function
from qatcore.errors import ConfigError
from qatcore.tensor import Tensor

__all__ = [
    "fake_quantize_per_group", "fake_quantize_per_token", "fake_quantize_ternary", "group_qparams", "token_qparams",
    "absmean_inverse_scale", "BlockFakeQuantizeFunction", "TernaryFakeQuantizeFunction",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# torchao's get_groupwise_affine_qparams: the minimum scale of asymmetric groups
_GROUP_AFFINE_EPS = 1e-6
# BitNet b1.58's weight_quant: the smallest mean(|w|) it divides by
_ABSMEAN_EPS = 1e-5


def _grid(bits: int) -> tuple[int, int]:
    half = 2 ** (bits - 1)
    return -half, half - 1


def _int32(v: np.ndarray) -> np.ndarray:
    """PyTorch's float -> int32 conversion on x86 (``cvttss2si``): truncation toward
    zero, and ``-2^31`` for NaN and anything outside [-2^31, 2^31). Kept in ``v``'s dtype."""
    inside = (v >= -(2.0**31)) & (v < 2.0**31)
    return np.where(inside, np.trunc(np.where(inside, v, 0)), -(2.0**31)).astype(v.dtype)


def _symmetric_qparams(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    qmin, qmax = _grid(bits)
    dtype = blocks.dtype
    mn = np.minimum(blocks.min(axis=-1), dtype.type(0))
    mx = np.maximum(blocks.max(axis=-1), dtype.type(0))
    scale = np.maximum(np.maximum(-mn, mx) / dtype.type((qmax - qmin) / 2), np.finfo(dtype).tiny)
    return scale, np.zeros_like(scale)


def group_qparams(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each group: ``blocks`` is (..., group_size); both results
    have shape ``blocks.shape[:-1]`` and its dtype (the zero point holds integers)."""
    if symmetric:
        return _symmetric_qparams(blocks, bits)
    dtype = blocks.dtype
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    scale = np.maximum((hi - lo) / dtype.type(2**bits - 1), dtype.type(_GROUP_AFFINE_EPS))
    return scale, _int32(lo + scale * dtype.type(2 ** (bits - 1)))


def token_qparams(rows: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each row over the last axis (shape ``rows.shape[:-1]``)."""
    if symmetric:
        return _symmetric_qparams(rows, bits)
    qmin, qmax = _grid(bits)
    dtype = rows.dtype
    mn = np.minimum(rows.min(axis=-1), dtype.type(0))
    mx = np.maximum(rows.max(axis=-1), dtype.type(0))
    scale = np.maximum((mx - mn) / dtype.type(qmax - qmin), np.finfo(dtype).tiny)
    return scale, np.clip(dtype.type(qmin) - np.rint(mn / scale), qmin, qmax).astype(dtype)


def _fake_quantize(x: np.ndarray, group_size: int | None, bits: int, symmetric: bool):
    """(y, inside, scale, inv): the output, and what the straight-through backward needs, in
    x's blocks' shape (..., blocks, n). ``group_size`` None: one block per row (per token)."""
    size = x.shape[-1] if group_size is None else group_size
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
    qparams = token_qparams if group_size is None else group_qparams
    qmin, qmax = _grid(bits)
    # +-inf and NaN go through the float arithmetic as torchao's do, without numpy warnings
    with np.errstate(over="ignore", invalid="ignore"):
        scale, zero_point = qparams(blocks, bits, symmetric)
        s, z = scale[..., None], zero_point[..., None]
        inv = x.dtype.type(1) / s
        q = np.rint(blocks * inv) + z
        y = (np.clip(q, qmin, qmax) - z) * s
    return y.reshape(x.shape), (q >= qmin) & (q <= qmax), s, inv


def absmean_inverse_scale(blocks: np.ndarray) -> np.ndarray:
    """``1 / max(mean(|x|), 1e-5)`` of each block over its last axis (shape
    ``blocks.shape[:-1]``, blocks' dtype; the mean taken in float64)."""
    mean = np.abs(blocks).mean(axis=-1, dtype=np.float64)
    return (1.0 / np.maximum(mean, _ABSMEAN_EPS)).astype(blocks.dtype)


def _fake_quantize_ternary(x: np.ndarray, group_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(y, inv): the ternary output and each block's ``inv`` (module docstring)."""
    blocks = x.reshape(1, -1) if group_size is None else x.reshape(*x.shape[:-1], x.shape[-1] // group_size,
                                                                  group_size)
    inv = absmean_inverse_scale(blocks)[..., None]
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.clip(np.rint(blocks * inv), -1, 1) / inv
    return y.reshape(x.shape).astype(x.dtype, copy=False), inv


class TernaryFakeQuantizeFunction(Function):
    """y = ternary(x) (module docstring), backward ``dx = dy`` (BitNet's estimator)."""

    def forward(self, x, group_size, on_backward=None):
        y, inv = _fake_quantize_ternary(x, group_size)
        if on_backward is not None:  # statistics: the elements beyond the grid
            blocks = x.reshape(inv.shape[:-1] + (-1,))
            self.on_backward, self.clipped = on_backward, np.abs(np.rint(blocks * inv)) > 1
        return y

    def backward(self, g):
        if getattr(self, "on_backward", None) is not None:
            self.on_backward(g, g, self.clipped, None)
        return (g,)


class BlockFakeQuantizeFunction(Function):
    """y = fake_quant(x) with qparams from x's own blocks (per group, or per token when
    ``group_size`` is None); backward is torchao's straight-through estimator."""

    def forward(self, x, group_size, bits, symmetric, on_backward=None):
        y, inside, scale, inv = _fake_quantize(x, group_size, bits, symmetric)
        if self.needs_input_grad[0]:
            self.inside, self.scale, self.inv = inside, scale, inv
        self.on_backward = on_backward  # statistics: (dx, dy, clipped, None) on sample steps
        return y

    def backward(self, g):
        grad = g.reshape(self.inside.shape)
        with np.errstate(over="ignore", invalid="ignore"):
            dx = np.where(self.inside, grad * self.scale, grad.dtype.type(0)) * self.inv
        dx = dx.reshape(g.shape)
        if self.on_backward is not None:
            self.on_backward(dx, g, ~self.inside, None)
        return (dx,)


def _check(name: str, x, group_size: int | None, bits: int, symmetric: bool) -> np.ndarray:
    array = x.data if isinstance(x, Tensor) else np.asarray(x)
    if array.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"{name}: x must be a float32 or float64 Tensor or array, got dtype {array.dtype}")
    if array.ndim == 0 or array.shape[-1] == 0:
        raise ConfigError(f"{name}: x needs a non-empty last axis to quantize along, got shape {array.shape}")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ConfigError(f"{name}: bits must be an int from 2 to 8, got {bits!r}")
    if not isinstance(symmetric, (bool, np.bool_)):
        raise ConfigError(f"{name}: symmetric must be True or False, got {symmetric!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
            raise ConfigError(f"{name}: group_size must be a positive int, got {group_size!r}")
        if array.shape[-1] % group_size:
            raise ConfigError(
                f"{name}: x's last axis ({array.shape[-1]}, shape {array.shape}) is not divisible by "
                f"group_size={group_size}; choose a group_size that divides it"
            )
    return array


def _apply(name: str, x, group_size: int | None, bits: int, symmetric: bool):
    array = _check(name, x, group_size, bits, symmetric)
    params = dict(group_size=None if group_size is None else int(group_size), bits=int(bits),
                  symmetric=bool(symmetric))
    if isinstance(x, Tensor):
        return BlockFakeQuantizeFunction.apply(x, **params)
    return _fake_quantize(array, **params)[0]


def fake_quantize_per_group(x, group_size: int, bits: int, symmetric: bool = True):
    """Fake-quantize ``x`` in groups of ``group_size`` consecutive elements along its last
    axis, each group with its own scale (and zero point) computed from its values.

    Args:
        x: a float32 or float64 Tensor (-> a differentiable Tensor, straight-through
            backward) or numpy array (-> array); its last axis must be divisible by
            ``group_size``.
        group_size: elements per group (a positive int).
        bits: 2 to 8; the grid is ``[-2^(bits-1), 2^(bits-1) - 1]``.
        symmetric: ``True``: ``s = max|x| / ((qmax - qmin) / 2)``, ``z = 0``; ``False``:
            torchao's asymmetric group parameters (module docstring).

    Returns:
        ``x``'s shape and dtype; equal to torchao 0.18's
        ``IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int{bits}, PerGroup(group_size),
        is_symmetric=symmetric))`` bit for bit in float32.

    >>> import qatcore
    >>> w = qatcore.tensor([[1.0, -0.5, 0.2, 0.0, 3.0, 1.0, -1.0, 0.4]], requires_grad=True)
    >>> y = fake_quantize_per_group(w, group_size=4, bits=2)
    >>> y.data.tolist()   # group 1: s = 1 / 1.5, group 2: s = 3 / 1.5 = 2
    [[0.6666666865348816, -0.6666666865348816, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0]]
    >>> y.sum().backward(); w.grad.tolist()   # 1.0 / s = 1.5 and 3.0 / s = 1.5 round to 2 > qmax = 1
    [[0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]]
    """
    return _apply("fake_quantize_per_group", x, group_size, bits, symmetric)


def fake_quantize_per_token(x, bits: int = 8, symmetric: bool = False):
    """Fake-quantize each row of ``x`` over its last axis (one token's features) with a
    scale and zero point computed from that row, dynamically on every call.

    Args:
        x: a float32 or float64 Tensor (-> a differentiable Tensor, straight-through
            backward) or numpy array (-> array), any number of leading axes.
        bits: 2 to 8; the grid is ``[-2^(bits-1), 2^(bits-1) - 1]`` (int8: -128..127).
        symmetric: ``False`` (default): ``s = (mx - mn) / (qmax - qmin)``,
            ``z = clamp(qmin - rne(mn / s), qmin, qmax)`` with the row's range widened to
            include 0; ``True``: the symmetric rule of ``fake_quantize_per_group`` over the row.

    Returns:
        ``x``'s shape and dtype. Asymmetric: equal to torchao 0.18's
        ``IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int{bits}, PerToken(),
        is_symmetric=False))`` bit for bit in float32. torchao has no symmetric per-token
        quantizer; symmetric equals its per-channel one (``PerAxis(0)``) on the rows.

    >>> import numpy as np
    >>> fake_quantize_per_token(np.array([[0.0, 1.0, 2.55]], np.float32))   # s = 0.01, z = -128
    array([[0.  , 1.  , 2.55]], dtype=float32)
    """
    return _apply("fake_quantize_per_token", x, None, bits, symmetric)


def fake_quantize_ternary(x, group_size: int | None = None):
    """Ternary fake quantization with absmean scaling (BitNet b1.58): every element becomes
    -s, 0 or s with ``s = mean(|x|)`` over the whole tensor (``group_size`` None) or over
    each group of ``group_size`` consecutive elements along the last axis.

    Args:
        x: a float32 or float64 Tensor (-> a differentiable Tensor whose backward passes the
            gradient unchanged, BitNet's estimator) or numpy array (-> array).
        group_size: None, or a positive int dividing the last axis.

    >>> import numpy as np
    >>> fake_quantize_ternary(np.array([[0.1, -0.3, 0.9, -0.3]], np.float32))   # s = 0.4
    array([[ 0. , -0.4,  0.4, -0.4]], dtype=float32)
    """
    array = _check("fake_quantize_ternary", x, group_size, 2, True)
    size = None if group_size is None else int(group_size)
    if isinstance(x, Tensor):
        return TernaryFakeQuantizeFunction.apply(x, group_size=size)
    return _fake_quantize_ternary(array, size)[0]
