"""``QATAttention``: scaled dot-product attention with quantizers on the inputs of its two
matmuls (the config's ``attention`` spec), what preparation puts in place of a
``F.scaled_dot_product_attention`` call when that spec is set:

    p = fq_p(softmax(fq_q(q) fq_k(k)^T * scale + mask))          (..., L, S)
    y = p fq_v(v)                                                 (..., L, Ev)

With a per-token spec each quantizer's scales follow the operand's rows *along the
matmul's contraction axis*, so that an integer matmul could take every scale out of its
sums: q (..., L, E) and k (..., S, E) per row over E; p per row over S; v (..., S, Ev) per
column over S (it is quantized transposed, each of its Ev channels across the positions).
With a per-tensor spec each is one observed range, as any activation quantizer.

The softmax, the mask and the matmuls stay float: only their inputs are put on grids.

>>> import numpy as np
>>> from qatcore.quantization.config import QuantizationConfig
>>> spec = QuantizationConfig.int8_dynamic_activation_int4_weight().activation     # int8 per token
>>> attention = QATAttention(spec, "attn")
>>> q = np.random.default_rng(0).normal(size=(1, 2, 4, 8)).astype(np.float32)
>>> attention(q, q, q, is_causal=True).shape
(1, 2, 4, 8)
"""

from __future__ import annotations

from qatcore.nn import functional as F
from qatcore.nn.module import Module
from qatcore.quantization.block_fake_quantize import make_fake_quantize
from qatcore.quantization.config import QuantSpec

__all__ = ["QATAttention", "ATTENTION_OPERANDS"]

# the quantized operands, in the order the forward uses them
ATTENTION_OPERANDS = ("query", "key", "value", "probabilities")


class QATAttention(Module):
    """F.scaled_dot_product_attention with fake-quantized matmul inputs (module docstring)."""

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        super().__init__()
        self.name = name
        for operand in ATTENTION_OPERANDS:
            self.add_module(f"{operand}_fake_quant", make_fake_quantize(spec, f"{name}.{operand}"))

    def quantizers(self) -> list:
        return [self.get_child(f"{operand}_fake_quant") for operand in ATTENTION_OPERANDS]

    def forward(self, query, key, value, attn_mask=None, is_causal: bool = False, scale: float | None = None):
        q, k = self.query_fake_quant(query), self.key_fake_quant(key)
        if self.value_fake_quant.spec.scheme.per_token:  # per channel across the positions (docstring)
            v = F.transpose(self.value_fake_quant(F.transpose(value, -2, -1)), -2, -1)
        else:
            v = self.value_fake_quant(value)
        probabilities = F.attention_probabilities(q, k, attn_mask, is_causal, scale)
        return F.matmul(self.probabilities_fake_quant(probabilities), v)

    def extra_repr(self) -> str:
        spec = self.query_fake_quant.spec
        return f"int{spec.bits}, {spec.scheme.value}"
