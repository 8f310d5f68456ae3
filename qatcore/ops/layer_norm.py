"""Per-sample normalization over the trailing axes: layer norm and RMS norm.

Both normalize each sample over its last k axes (``normalized_shape``, m = their product
of sizes), with statistics over those axes only, so there is no running state and training
and eval compute the same thing. With ``axes`` the last k axes and every mean over them:

    layer norm:  mu = mean(x),  var = mean((x - mu)^2)      (biased, as PyTorch)
                 r = 1 / sqrt(var + eps),  xhat = (x - mu) * r,  out = w * xhat + b
                 dxhat = g * w
                 dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

    RMS norm:    r = 1 / sqrt(mean(x^2) + eps),  xhat = x * r,  out = w * xhat
                 dx = r * (dxhat - xhat * mean(dxhat * xhat))

and for both dw = sum over the leading axes of g * xhat, db = sum of g. eps sits inside
the square root in both (PyTorch's ``F.layer_norm`` and ``F.rms_norm``). The weight and
bias have the normalized shape; either may be None (1 and 0).
"""

from __future__ import annotations

import numpy as np

from qatcore.autograd.function import Function

__all__ = ["LayerNorm", "RMSNorm"]


def _lead_axes(ndim: int, k: int) -> tuple[int, ...]:
    return tuple(range(ndim - k))


class LayerNorm(Function):
    """Layer norm over the last ``normalized_ndim`` axes (module docstring); eps inside the root."""

    def forward(self, x, weight, bias, normalized_ndim: int, eps: float):
        axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
        mu = x.mean(axis=axes, keepdims=True)
        centered = x - mu
        var = (centered * centered).mean(axis=axes, keepdims=True)
        self.inv_std = (1 / np.sqrt(var + np.asarray(eps, x.dtype))).astype(x.dtype, copy=False)
        self.xhat = centered * self.inv_std
        self.axes, self.weight, self.k = axes, weight, normalized_ndim
        out = self.xhat if weight is None else self.xhat * weight
        return out if bias is None else out + bias

    def backward(self, g):
        xhat, axes = self.xhat, self.axes
        dx = None
        if self.needs_input_grad[0]:
            dxhat = g if self.weight is None else g * self.weight
            dx = self.inv_std * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                                 - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))
        lead = _lead_axes(g.ndim, self.k)
        dweight = (g * xhat).sum(axis=lead) if self.needs_input_grad[1] else None
        dbias = g.sum(axis=lead) if self.needs_input_grad[2] else None
        return dx, dweight, dbias


class RMSNorm(Function):
    """RMS norm over the last ``normalized_ndim`` axes (module docstring); eps inside the root."""

    def forward(self, x, weight, normalized_ndim: int, eps: float):
        axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
        mean_square = (x * x).mean(axis=axes, keepdims=True)
        self.inv_rms = (1 / np.sqrt(mean_square + np.asarray(eps, x.dtype))).astype(x.dtype, copy=False)
        self.xhat = x * self.inv_rms
        self.axes, self.weight, self.k = axes, weight, normalized_ndim
        return self.xhat if weight is None else self.xhat * weight

    def backward(self, g):
        xhat, axes = self.xhat, self.axes
        dx = None
        if self.needs_input_grad[0]:
            dxhat = g if self.weight is None else g * self.weight
            dx = self.inv_rms * (dxhat - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))
        dweight = (g * xhat).sum(axis=_lead_axes(g.ndim, self.k)) if self.needs_input_grad[1] else None
        return dx, dweight
