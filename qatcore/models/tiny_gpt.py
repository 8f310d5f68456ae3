"""``TinyGPT``: a small decoder-only transformer for character-level language modelling.

GPT-2's layout (Radford et al. 2019) at a size that trains in minutes on two cores, as
Karpathy's nanoGPT does: token and learned position embeddings, ``n_layer`` pre-norm
blocks, a final LayerNorm and a linear head over the vocabulary (its weight optionally
tied to the token embedding's):

    h_0 = tok[idx] + pos[0..T-1]                                     (B, T, C)
    h_l = a + mlp(ln_2(a)),   a = h_{l-1} + attn(ln_1(h_{l-1}))       l = 1 .. n_layer
    attn(x) = proj(concat_heads(softmax(q k^T / sqrt(C / H) + causal mask) v)),
              q, k, v = split(qkv(x))                                 H heads of C / H
    mlp(x)  = fc_2(gelu(fc_1(x)))                                     4 C hidden units
    logits  = head(ln_f(h_L))                                         (B, T, vocabulary)

Every weight of a Linear or an Embedding draws from N(0, 0.02^2) (GPT-2's init; the
residual projections from N(0, (0.02 / sqrt(2 n_layer))^2)), biases are zero, and the
LayerNorms start at (1, 0); all from ``rng``, in the order of the layers.

With the defaults (4 layers, 128 channels, 4 heads, 64 positions, 65 characters) it has
818,176 parameters with an untied head (809,856 tied).

>>> import numpy as np
>>> model = TinyGPT(vocabulary_size=65, block_size=8, n_layer=1, n_embd=16, n_head=2)
>>> model(np.zeros((2, 8), dtype=np.int64)).shape
(2, 8, 65)
"""

from __future__ import annotations

import math
import numbers

import numpy as np

import qatcore.nn.functional as F
from qatcore.errors import ConfigError, ShapeError
from qatcore.nn import GELU, Embedding, LayerNorm, Linear, Module, ModuleList
from qatcore.symbolic import SymbolicValue

__all__ = ["TinyGPT", "GPTBlock", "CausalSelfAttention"]

_INIT_STD = 0.02


def _normal_(linear_or_embedding, rng: np.random.Generator, std: float) -> None:
    weight = linear_or_embedding.weight
    weight.data[...] = rng.normal(0.0, std, size=weight.data.shape).astype(weight.data.dtype)
    bias = getattr(linear_or_embedding, "bias", None)
    if bias is not None:
        bias.data[...] = 0


class CausalSelfAttention(Module):
    """Multi-head causal self-attention of (B, T, C) inputs (module docstring's ``attn``)."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, rng: np.random.Generator,
                 proj_std: float) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.block_size = n_head, n_embd, block_size
        self.qkv = Linear(n_embd, 3 * n_embd, rng=rng)
        self.proj = Linear(n_embd, n_embd, rng=rng)
        _normal_(self.qkv, rng, _INIT_STD)
        _normal_(self.proj, rng, proj_std)

    def forward(self, x):
        # traced, the length is block_size (TinyGPT.forward); the graph then holds no shape reads
        t = self.block_size if isinstance(x, SymbolicValue) else x.shape[1]
        h, c = self.n_head, self.n_embd
        qkv = self.qkv(x).reshape(-1, t, 3, h, c // h).permute(2, 0, 3, 1, 4)  # (3, B, H, T, E)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)  # (B, H, T, E)
        return self.proj(y.permute(0, 2, 1, 3).reshape(-1, t, c))

    def decode(self, x, past: tuple | None):
        """Attention of new positions ``x`` (B, T, C) to the cached keys and values ``past``
        ((B, H, P, E) each, or None) and to themselves (causally): (output, (keys, values)
        with the new positions appended)."""
        b, t = x.shape[0], x.shape[1]
        h, c = self.n_head, self.n_embd
        qkv = self.qkv(x).reshape(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
        k, v = qkv[1], qkv[2]
        if past is not None:
            k, v = F.cat([past[0], k], dim=2), F.cat([past[1], v], dim=2)
        p = k.shape[2] - t
        # new position i sees the P cached ones and new ones 0..i
        mask = None if t == 1 else np.tril(np.ones((t, p + t), dtype=bool), k=p)
        y = F.scaled_dot_product_attention(qkv[0], k, v, attn_mask=mask)
        return self.proj(y.permute(0, 2, 1, 3).reshape(b, t, c)), (k, v)


class GPTBlock(Module):
    """One pre-norm transformer block: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(.))``."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, rng: np.random.Generator,
                 proj_std: float) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, rng, proj_std)
        self.ln_2 = LayerNorm(n_embd)
        self.fc_1 = Linear(n_embd, 4 * n_embd, rng=rng)
        self.gelu = GELU()
        self.fc_2 = Linear(4 * n_embd, n_embd, rng=rng)
        _normal_(self.fc_1, rng, _INIT_STD)
        _normal_(self.fc_2, rng, proj_std)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_2(self.gelu(self.fc_1(self.ln_2(x))))

    def decode(self, x, past: tuple | None):
        """``forward`` of new positions, attending to the cached ``past`` (CausalSelfAttention.decode)."""
        a, cache = self.attn.decode(self.ln_1(x), past)
        x = x + a
        return x + self.fc_2(self.gelu(self.fc_1(self.ln_2(x)))), cache


class TinyGPT(Module):
    """A decoder-only transformer over ``vocabulary_size`` tokens (module docstring).

    Args:
        vocabulary_size: number of distinct tokens (65 for the Tiny Shakespeare characters).
        block_size: the longest sequence (number of learned positions).
        n_layer, n_embd, n_head: blocks, channels, attention heads (``n_embd`` a multiple of
            ``n_head``).
        tie_weights: the head uses the token embedding's weight (GPT-2 does).
        rng: the generator every weight is drawn from (default ``np.random.default_rng(0)``).

    ``forward(idx)`` takes (B, T) integer tokens, T <= block_size, and returns the (B, T,
    vocabulary_size) logits of the next token at each position.
    """

    def __init__(self, vocabulary_size: int = 65, block_size: int = 64, n_layer: int = 4, n_embd: int = 128,
                 n_head: int = 4, tie_weights: bool = False, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        for name, value in (("vocabulary_size", vocabulary_size), ("block_size", block_size),
                            ("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"TinyGPT: {name} must be a positive int, got {value!r}")
        if n_embd % n_head:
            raise ConfigError(f"TinyGPT: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        if not isinstance(tie_weights, bool):
            raise ConfigError(f"TinyGPT: tie_weights must be True or False, got {tie_weights!r}")
        rng = np.random.default_rng(0) if rng is None else rng
        self.block_size, self.tie_weights = int(block_size), tie_weights
        self.tok = Embedding(vocabulary_size, n_embd, rng=rng)
        self.pos = Embedding(block_size, n_embd, rng=rng)
        _normal_(self.tok, rng, _INIT_STD)
        _normal_(self.pos, rng, _INIT_STD)
        proj_std = _INIT_STD / math.sqrt(2 * n_layer)
        self.blocks = ModuleList([GPTBlock(n_embd, n_head, block_size, rng, proj_std) for _ in range(n_layer)])
        self.ln_f = LayerNorm(n_embd)
        self.head = Linear(n_embd, vocabulary_size, bias=False, rng=rng)
        if tie_weights:
            self.head.weight = self.tok.weight
        else:
            _normal_(self.head, rng, _INIT_STD)

    def forward(self, idx):
        if isinstance(idx, SymbolicValue):
            # traced: the whole position table, read as the parameter itself (a slice by a
            # traced length could not be recorded), so a traced TinyGPT takes block_size tokens
            positions = self.pos.weight
        else:
            shape = np.shape(idx.data if hasattr(idx, "data") else idx)
            if len(shape) != 2:
                raise ShapeError(f"TinyGPT: expected (batch, time) tokens, got shape {tuple(shape)}")
            if shape[1] > self.block_size:
                raise ShapeError(f"TinyGPT: a sequence of {shape[1]} tokens is longer than block_size "
                                 f"{self.block_size}")
            positions = self.pos.weight if shape[1] == self.block_size else self.pos.weight[:shape[1]]
        x = self.tok(idx) + positions
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def decode(self, idx, cache: list | None = None) -> tuple:
        """Incremental decoding with a key/value cache: the (B, T, vocabulary_size) logits of
        the new tokens ``idx`` (B, T) that follow the positions ``cache`` holds, and the cache
        with them appended (None: nothing yet). Equal to ``forward`` on the whole sequence up to
        float rounding (a shorter softmax); one token at a time, each Linear is a matrix-vector
        product, the case low-bit weights speed up. Works on an eager-mode converted model
        too (its layers are the runtime's).

        >>> import numpy as np
        >>> model = TinyGPT(vocabulary_size=65, block_size=8, n_layer=1, n_embd=16, n_head=2)
        >>> idx = np.arange(6).reshape(1, 6)
        >>> first, cache = model.decode(idx[:, :5])
        >>> last, cache = model.decode(idx[:, 5:], cache)
        >>> bool(np.allclose(last.numpy()[0, -1], model(idx).numpy()[0, -1], atol=1e-5))
        True
        """
        array = np.asarray(idx.data if hasattr(idx, "data") else idx)
        past = 0 if cache is None else cache[0][0].shape[2]
        if array.ndim != 2 or past + array.shape[1] > self.block_size:
            raise ShapeError(f"TinyGPT.decode: expected (batch, time) tokens that fit block_size {self.block_size} "
                             f"after the {past} cached positions, got shape {array.shape}")
        x = self.tok(array) + self.pos.weight[past:past + array.shape[1]]
        caches = []
        for i, block in enumerate(self.blocks):
            x, kv = block.decode(x, None if cache is None else cache[i])
            caches.append(kv)
        return self.head(self.ln_f(x)), caches
