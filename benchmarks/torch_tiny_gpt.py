"""``TorchTinyGPT``: qatcore's TinyGPT (``qatcore/models/tiny_gpt.py``) written in PyTorch, the
reference the transformer tests and ``bench_transformer.py`` compare against.

The same layout, layer for layer and under the same parameter names, so a state copy is the
identity name map (:func:`copy_weights_from_qatcore`):

    h_0 = tok[idx] + pos[0..T-1]                                     (B, T, C)
    h_l = a + fc_2(gelu(fc_1(ln_2(a)))),  a = h_{l-1} + attn(ln_1(h_{l-1}))
    attn(x) = proj(concat_heads(softmax(q k^T / sqrt(C / H) + causal mask) v)),
              q, k, v = split(qkv(x)),  qkv(x) reshaped (B, T, 3, H, C / H)
    logits  = head(ln_f(h_L))                          head: Linear(C, vocabulary, bias=False)

GELU is the exact (erf) form, the LayerNorms use eps 1e-5, attention is
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``.

Its own GPT-2 init, from torch's random numbers (``generator``, or torch's default generator
seeded by ``torch.manual_seed``): every Linear and Embedding weight N(0, 0.02^2), the residual
projections ``attn.proj`` and ``fc_2`` N(0, (0.02 / sqrt(2 n_layer))^2), biases 0, LayerNorms
(1, 0). The numbers differ from qatcore's (numpy's generator), the distribution is the same.

This file lives beside the benchmark scripts (run as scripts, so ``from torch_tiny_gpt import
...`` finds it); the tests load it by path, so there is one definition of the PyTorch model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["TorchTinyGPT", "copy_weights_from_qatcore"]

_INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention of (B, T, C) inputs, qatcore's layout."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        qkv = self.qkv(x).reshape(batch, time, 3, self.n_head, channels // self.n_head).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)  # (B, H, T, E)
        return self.proj(y.permute(0, 2, 1, 3).reshape(batch, time, channels))


class GPTBlock(nn.Module):
    """One pre-norm block: ``x + attn(ln_1(x))``, then ``+ fc_2(gelu(fc_1(ln_2(.))))``."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.fc_1 = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.fc_2 = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_2(self.gelu(self.fc_1(self.ln_2(x))))


class TorchTinyGPT(nn.Module):
    """qatcore's ``TinyGPT`` in PyTorch: the same arguments (``generator`` in place of ``rng``),
    the same parameter names and shapes, GPT-2's init drawn from ``generator``.

    >>> model = TorchTinyGPT(vocabulary_size=65, block_size=8, n_layer=1, n_embd=16, n_head=2)
    >>> tuple(model(torch.zeros(2, 8, dtype=torch.int64)).shape)
    (2, 8, 65)
    """

    def __init__(self, vocabulary_size: int = 65, block_size: int = 64, n_layer: int = 4, n_embd: int = 128,
                 n_head: int = 4, tie_weights: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"TorchTinyGPT: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.block_size = block_size
        self.tok = nn.Embedding(vocabulary_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList([GPTBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocabulary_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok.weight
        self._gpt2_init(n_layer, generator)

    @torch.no_grad()
    def _gpt2_init(self, n_layer: int, generator: torch.Generator | None) -> None:
        residual_std = _INIT_STD / math.sqrt(2 * n_layer)
        residual = {id(block.attn.proj) for block in self.blocks} | {id(block.fc_2) for block in self.blocks}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if id(module) in residual else _INIT_STD
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time = idx.shape[1]
        if time > self.block_size:
            raise ValueError(f"TorchTinyGPT: a sequence of {time} tokens is longer than block_size {self.block_size}")
        x = self.tok(idx) + self.pos.weight[:time]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def copy_weights_from_qatcore(torch_model: TorchTinyGPT, qat_model) -> None:
    """Copy every parameter of the qatcore ``TinyGPT`` ``qat_model`` into ``torch_model``, in
    place, cast to the torch parameter's dtype. The names are the same in both models, so the
    name map is the identity; ``load_state_dict(strict=True)`` raises on a missing, extra or
    misshapen name."""
    state = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in qat_model.state_dict().items()}
    torch_model.load_state_dict(state, strict=True)
