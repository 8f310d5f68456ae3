"""Multi-head attention, PyTorch's ``nn.MultiheadAttention`` (batch_first)."""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError, DTypeError, ShapeError
from qatcore.nn import functional as F
from qatcore.nn import init
from qatcore.nn.linear import Linear
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter
from qatcore.random import generator_or_default
from qatcore.tensor import Tensor

__all__ = ["MultiheadAttention"]


class MultiheadAttention(Module):
    """out = out_proj(concat_h softmax(q_h k_h^T / sqrt(D) + mask) v_h), D = E / H,

    with q = query W_q^T + b_q, k = key W_k^T + b_k, v = value W_v^T + b_v, where
    (W_q; W_k; W_v) = ``in_proj_weight`` (3E, E) and (b_q; b_k; b_v) = ``in_proj_bias`` (3E,),
    and ``out_proj`` a :class:`Linear` (E, E): PyTorch's names and layout, so its
    ``state_dict`` loads here. Inputs are (B, L, E) (``batch_first=True``; False is refused).

    Initialisation as PyTorch's: ``in_proj_weight`` Xavier-uniform, the biases zero,
    ``out_proj.weight`` a Linear's, drawn from ``rng`` (or qatcore's default generator).

    >>> import numpy as np
    >>> mha = MultiheadAttention(8, 2, rng=np.random.default_rng(0))
    >>> x = np.zeros((3, 5, 8), dtype=np.float32)
    >>> out, weights = mha(x, x, x, need_weights=True)
    >>> out.shape, weights.shape
    ((3, 5, 8), (3, 5, 5))
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = True,
                 rng: np.random.Generator | None = None, dtype=np.float32) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"MultiheadAttention: {name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ConfigError(f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible by num_heads "
                              f"({num_heads})")
        if batch_first is not True:
            raise ConfigError(f"MultiheadAttention: only batch_first=True ((batch, length, embed_dim) inputs) is "
                              f"implemented, got batch_first={batch_first!r}; permute (L, B, E) inputs to (B, L, E)")
        rng = generator_or_default(rng, "MultiheadAttention: rng")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.batch_first = True
        self.in_proj_weight = Parameter(np.empty((3 * embed_dim, embed_dim), dtype=dtype))
        init.xavier_uniform_(self.in_proj_weight, 1.0, rng)
        if bias:
            self.in_proj_bias = Parameter(np.zeros(3 * embed_dim, dtype=dtype))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, rng=rng, dtype=dtype)
        if bias:
            init.zeros_(self.out_proj.bias)

    @property
    def bias(self) -> bool:
        return self.in_proj_bias is not None

    def _project(self, x: Tensor, part: int) -> Tensor:
        """x W_part^T + b_part, then (B, L, E) -> (B, H, L, D)."""
        rows = slice(part * self.embed_dim, (part + 1) * self.embed_dim)
        bias = None if self.in_proj_bias is None else F.getitem(self.in_proj_bias, rows)
        y = F.linear(x, F.getitem(self.in_proj_weight, rows), bias)
        batch, length = x.shape[0], x.shape[1]
        return F.transpose(F.reshape(y, (batch, length, self.num_heads, self.head_dim)), 1, 2)

    def _check(self, query, key, value) -> tuple[Tensor, Tensor, Tensor]:
        tensors = []
        for name, x in (("query", query), ("key", key), ("value", value)):
            x = x if isinstance(x, Tensor) else Tensor._from_array(np.asarray(x), requires_grad=False)
            if x.dtype.kind != "f":
                raise DTypeError(f"MultiheadAttention: {name} must be floating point, got dtype {x.dtype}")
            if x.ndim != 3 or x.shape[-1] != self.embed_dim:
                raise ShapeError(f"MultiheadAttention: {name} must be (batch, length, {self.embed_dim}) "
                                 f"(batch_first), got shape {x.shape}")
            tensors.append(x)
        q, k, v = tensors
        if k.shape != v.shape or q.shape[0] != k.shape[0]:
            raise ShapeError(f"MultiheadAttention: key and value must have one shape and the batch of query, got "
                             f"query {q.shape}, key {k.shape}, value {v.shape}")
        return q, k, v

    def _mask(self, attn_mask, batch: int, length: int, source: int):
        """PyTorch's MultiheadAttention mask (True: *not* allowed; float: added), (L, S) or
        (B * H, L, S), as the attention functions' mask (True: attend) over (B, H, L, S)."""
        if attn_mask is None:
            return None
        mask = attn_mask.data if isinstance(attn_mask, Tensor) and not attn_mask.requires_grad else attn_mask
        shape = tuple(np.shape(mask.data if isinstance(mask, Tensor) else mask))
        heads = batch * self.num_heads
        if shape not in ((length, source), (heads, length, source)):
            raise ShapeError(f"MultiheadAttention: attn_mask must be ({length}, {source}) or ({heads}, {length}, "
                             f"{source}) (batch * num_heads, L, S), got shape {shape}")
        if not isinstance(mask, Tensor):
            mask = np.asarray(mask)
            if mask.dtype == np.bool_:
                mask = ~mask
        if len(shape) == 3:
            mask = F.reshape(mask, (batch, self.num_heads, length, source)) if isinstance(mask, Tensor) else \
                mask.reshape(batch, self.num_heads, length, source)
        return mask

    def forward(self, query, key, value, attn_mask=None, need_weights: bool = False, is_causal: bool = False,
                average_attn_weights: bool = True):
        """(output (B, L, E), weights): weights None unless ``need_weights``, then the
        attention probabilities (B, L, S) averaged over the heads, or (B, H, L, S) with
        ``average_attn_weights=False``.

        ``attn_mask``: boolean, True where a position may *not* be attended (PyTorch's
        MultiheadAttention convention, the opposite of ``scaled_dot_product_attention``'s),
        or float, added to the scores; (L, S) or (B * H, L, S). ``is_causal=True`` without
        a mask applies the causal mask (PyTorch requires the mask too and takes the flag as
        a hint); with one, the mask is used, as PyTorch does when the hint is right.
        """
        q, k, v = self._check(query, key, value)
        batch, length, source = q.shape[0], q.shape[1], k.shape[1]
        mask = self._mask(attn_mask, batch, length, source)
        causal = bool(is_causal) and mask is None
        probabilities = F.attention_probabilities(self._project(q, 0), self._project(k, 1),
                                                  attn_mask=mask, is_causal=causal)
        heads = F.matmul(probabilities, self._project(v, 2))  # (B, H, L, D)
        merged = F.reshape(F.transpose(heads, 1, 2), (batch, length, self.embed_dim))
        output = self.out_proj(merged)
        if not need_weights:
            return output, None
        return output, F.mean(probabilities, 1) if average_attn_weights else probabilities

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, bias={self.bias}, batch_first=True"
