"""Attention: ``F.scaled_dot_product_attention``, ``F.attention_probabilities``,
``nn.MultiheadAttention`` (and ``operator.getitem``, which takes its output out of the
(output, weights) pair, or indexes a tensor: TinyGPT's ``qkv[0]``).

QAT: all stay float for now (``QATRole.FLOAT``): their outputs are not quantized and
MultiheadAttention's projection weights are not fake-quantized. The quantizers issue 19
plans (on the projections' weights, on q, k, v and the softmax probabilities) and their
int8 lowering are issue 20's; until then a prepared model trains with attention in float
between its quantized layers, and converts with it as a float island.

ONNX: the float composition, node for node what the functional code computes: MatMul,
Transpose, Mul by the scale, Add of the constant mask, Softmax, MatMul (and the projections,
head split and merge of MultiheadAttention as MatMul, Add, Reshape, Transpose).
"""

from __future__ import annotations

import inspect
import operator

import numpy as np

from qatcore.graph.node import Node
from qatcore.nn import functional as F
from qatcore.nn.attention import MultiheadAttention
from qatcore.nn.container import Sequential
from qatcore.nn.linear import Linear
from qatcore.quantization.qat.operators.quantizer import module_record
from qatcore.quantization.qat.operators.registry import OperatorRule, QATRole, call_arguments, register
from qatcore.quantization.qat.qat_attention import QATAttention

__all__: list[str] = []


# ---- ONNX export ----------------------------------------------------------------------------------
def _swap_last(rank: int) -> list[int]:
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return perm


def _attention_onnx(ex, name: str, q: str, k: str, v: str, q_shape: tuple, k_shape: tuple, attn_mask,
                    is_causal: bool, scale) -> str:
    """softmax(q k^T * scale + mask) v on tensor names; the mask a constant."""
    b = ex.b
    if isinstance(attn_mask, Node):
        raise ex.fail(ex.current, "an attention mask computed in the graph (only constant masks export)")
    additive, dead = F.additive_attention_mask(attn_mask, is_causal, q_shape, k_shape, np.float32)
    scale = 1.0 / np.sqrt(q_shape[-1]) if scale is None else scale
    k_t = b.node("Transpose", [k], f"{name}/key_T", perm=_swap_last(len(k_shape)))
    scores = b.node("MatMul", [q, k_t], f"{name}/scores")
    scores = b.node("Mul", [scores, b.constant(f"{name}.scale", np.float32(scale))], f"{name}/scaled")
    if additive is not None:
        scores = b.node("Add", [scores, b.constant(f"{name}.mask", np.asarray(additive, np.float32))], f"{name}/masked")
    probabilities = b.node("Softmax", [scores], f"{name}/softmax", axis=-1)
    if dead is not None:
        keep = b.constant(f"{name}.keep", (~dead).astype(np.float32))
        probabilities = b.node("Mul", [probabilities, keep], f"{name}/safe")
    return b.node("MatMul", [probabilities, v], name) if v is not None else probabilities


def _export_sdpa(ex, node, module):
    a = call_arguments(node)
    ex.current = node
    name = node.name
    q, k = ex.value(a["query"], name), ex.value(a["key"], name)
    v = ex.value(a["value"], name) if "value" in a else None
    return _attention_onnx(ex, name, q, k, v, ex.shape(a["query"]), ex.shape(a["key"]), a["attn_mask"],
                           a["is_causal"], a["scale"]), None


def _projection(ex, name: str, x: str, weight: np.ndarray, bias, shape: tuple, heads: int) -> str:
    """x W^T + b, then (B, L, E) -> (B, H, L, D)."""
    b = ex.b
    y = b.node("MatMul", [x, b.constant(f"{name}.weight_T", np.ascontiguousarray(weight.T, np.float32))],
               f"{name}/MatMul")
    if bias is not None:
        y = b.node("Add", [y, b.constant(f"{name}.bias", np.asarray(bias, np.float32))], f"{name}/Add")
    batch, length, embed = shape
    split = b.constant(f"{name}.heads", np.array([batch, length, heads, embed // heads], np.int64))
    y = b.node("Reshape", [y, split], f"{name}/Reshape")
    return b.node("Transpose", [y], f"{name}/Transpose", perm=[0, 2, 1, 3])


def _export_multihead_attention(ex, node, module: MultiheadAttention):
    a = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    a.apply_defaults()
    a = a.arguments
    if a["need_weights"]:
        raise ex.fail(node, "MultiheadAttention with need_weights=True (only the output exports)")
    ex.current = node
    name, b, e, h = ex.node_name(node), ex.b, module.embed_dim, module.num_heads
    weight = module.in_proj_weight.data
    bias = None if module.in_proj_bias is None else module.in_proj_bias.data
    shapes = [ex.shape(a[k]) if isinstance(a[k], Node) else np.shape(F._tensor(a[k]).data)
              for k in ("query", "key", "value")]
    heads = [_projection(ex, f"{name}.{part}", ex.value(a[part], name), weight[i * e:(i + 1) * e],
                         None if bias is None else bias[i * e:(i + 1) * e], shapes[i], h)
             for i, part in enumerate(("query", "key", "value"))]
    batch, length, source = shapes[0][0], shapes[0][1], shapes[1][1]
    mask = a["attn_mask"]
    if isinstance(mask, Node):
        raise ex.fail(node, "an attention mask computed in the graph (only constant masks export)")
    if mask is not None:
        mask = np.asarray(mask.data if hasattr(mask, "data") else mask)
        mask = ~mask if mask.dtype == np.bool_ else mask
        if mask.ndim == 3:
            mask = mask.reshape(batch, h, length, source)
    causal = bool(a["is_causal"]) and mask is None
    attended = _attention_onnx(ex, f"{name}/attention", *heads, (batch, h, length, e // h),
                               (batch, h, source, e // h), mask, causal, None)
    merged = b.node("Transpose", [attended], f"{name}/merge", perm=[0, 2, 1, 3])
    merged = b.node("Reshape", [merged, b.constant(f"{name}.merged", np.array([batch, length, e], np.int64))],
                    f"{name}/merged")
    out = module.out_proj
    return _projection_out(ex, name, merged, out), None


def _projection_out(ex, name: str, x: str, out: Linear) -> str:
    b = ex.b
    y = b.node("MatMul", [x, b.constant(f"{name}.out_proj.weight_T", np.ascontiguousarray(out.weight.data.T,
                                                                                           np.float32))],
               f"{name}/out_proj" if out.bias is None else f"{name}/out_proj/MatMul")
    if out.bias is not None:
        y = b.node("Add", [y, b.constant(f"{name}.out_proj.bias", out.bias.data.astype(np.float32))],
                   f"{name}/out_proj")
    return y


def _export_getitem(ex, node, module):
    """The output of a MultiheadAttention's (output, weights) pair: its exported tensor; a
    tensor indexed by integers and slices (``qkv[0]``): Slice, then a Gather per integer."""
    source, index = node.args
    if isinstance(source, Node) and source.op == "call_module" \
            and isinstance(ex.gm.get_submodule(source.target), MultiheadAttention):
        if index != 0:
            raise ex.fail(node, "indexing other than [0] of a MultiheadAttention's (output, weights)")
        return ex.names[source], None
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) or (isinstance(i, (int, np.integer)) and not isinstance(i, bool))
               for i in items) or len(items) > len(ex.shape(source)):
        raise ex.fail(node, f"indexing by {index!r} (integers and slices export)")
    b, name = ex.b, node.name
    x = whole = ex.value(source, name)
    sliced = [(axis, i) for axis, i in enumerate(items) if isinstance(i, slice) and i != slice(None)]
    if sliced:
        big = np.iinfo(np.int64).max
        bounds = [(0 if i.start is None else i.start, big if i.stop is None else i.stop) if (i.step or 1) > 0 else
                  (big if i.start is None else i.start, -big - 1 if i.stop is None else i.stop) for _, i in sliced]
        x = b.node("Slice", [x, b.constant(f"{name}.starts", np.array([s for s, _ in bounds], np.int64)),
                             b.constant(f"{name}.ends", np.array([e for _, e in bounds], np.int64)),
                             b.constant(f"{name}.axes", np.array([a for a, _ in sliced], np.int64)),
                             b.constant(f"{name}.steps", np.array([i.step or 1 for _, i in sliced], np.int64))],
                   f"{name}/Slice")
    for axis, i in reversed([(axis, i) for axis, i in enumerate(items) if not isinstance(i, slice)]):
        x = b.node("Gather", [x, b.constant(f"{name}.index", np.array(int(i), np.int64))], f"{name}/Gather",
                   axis=axis)  # a scalar index drops the axis, as Python's does
    return (x if x != whole else b.node("Identity", [x], name)), None


# ---- examples -------------------------------------------------------------------------------------
class _AttentionThenLinear(Sequential):
    """attend(x) on (2, 4, 6) inputs -> flatten -> Linear(24, 4)."""

    def __init__(self, attend, *layers) -> None:
        super().__init__(*layers, Linear(24, 4, rng=np.random.default_rng(1)))
        self.attend = attend

    def forward(self, x):
        return self[-1](F.flatten(self.attend(self, x), 1))


def _example_sdpa():
    mask = np.tril(np.ones((4, 4), bool))[::-1].copy()  # every row attends somewhere
    return _AttentionThenLinear(lambda m, x: F.scaled_dot_product_attention(x, F.mul(x, 0.5), x, mask)), \
        (2, 4, 6)


def _example_probabilities():
    return _AttentionThenLinear(lambda m, x: F.matmul(F.attention_probabilities(x, x, None, True), x)), (2, 4, 6)


def _example_multihead_attention():
    return _AttentionThenLinear(lambda m, x: m[0](x, x, x, None, False, True)[0],
                                MultiheadAttention(6, 2, rng=np.random.default_rng(0))), (2, 4, 6)


register(
    OperatorRule(F.scaled_dot_product_attention, qat=QATRole.FLOAT, export=_export_sdpa, example=_example_sdpa),
    OperatorRule(F.attention_probabilities, qat=QATRole.FLOAT, export=_export_sdpa, example=_example_probabilities),
    OperatorRule(MultiheadAttention, qat=QATRole.FLOAT, export=_export_multihead_attention,
                 record=module_record(MultiheadAttention, "embed_dim", "num_heads", "bias"),
                 example=_example_multihead_attention),
    OperatorRule(operator.getitem, qat=QATRole.FLOAT, export=_export_getitem, example=_example_multihead_attention),
    # attention with quantized matmul inputs (the config's attention spec): a float island
    # whose inputs are fake-quantized inside it
    OperatorRule(QATAttention, qat=QATRole.FLOAT),
)
