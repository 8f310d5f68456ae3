"""Transformer layers: GELU, SiLU, LayerNorm, RMSNorm, Embedding (issue 19), as layers and as
functions.

QAT roles:

- GELU (both forms) and SiLU are activations: a quantizer after them, and between two
  quantizers they convert to an ``Int8Lookup`` table of their QAT results (``activation.py``),
  so they run integer-only and equal the QAT model bit for bit.
- LayerNorm and RMSNorm compute values off their input's grid (a division by a per-sample
  statistic): a new quantizer after them. They have no integer lowering yet (``lower=None``):
  the int8 model keeps them as float islands between a Dequantize and a Quantize, as it keeps
  ``F.sub`` or ``F.mul``.
- Embedding is a table lookup on integer indices; it stays float (``QATRole.FLOAT``): its
  weight is not fake-quantized and its output not quantized; the int8 model keeps the float
  layer. Its indices get no quantizer (``index_input``): preparation leaves a value that
  only embedding lookups read as it is. Per-group int8/int4 embedding weights are issue
  19's quantization part.

ONNX (float islands): GELU as x * (1 + Erf(x / sqrt 2)) / 2 or its tanh form, SiLU as
x * Sigmoid(x), LayerNorm as LayerNormalization-17, RMSNorm composed (ReduceMean of x^2,
Add eps, Sqrt, Div, Mul weight: RMSNormalization is opset 23 and the files are opset 21),
Embedding as Gather(weight, indices).

Not walked by the registry-wide test: Embedding, whose input is token indices while that
test feeds float inputs (a lookup with constant indices is computed while tracing, so it
cannot stand in a float-input example either). Its rules say so (``example_missing``), and
``tests/qat/test_transformer_rules.py`` walks a token model the same way instead.
"""

from __future__ import annotations

import math

import numpy as np

from qatcore.graph.node import Node
from qatcore.nn import functional as F
from qatcore.nn.activation import GELU, SiLU
from qatcore.nn.container import Sequential
from qatcore.nn.embedding import Embedding
from qatcore.nn.linear import Linear
from qatcore.nn.normalization import LayerNorm, RMSNorm
from qatcore.quantization.qat.operators.activation import (
    _lower_lookup,
    example_between_linears,
    example_functional,
)
from qatcore.quantization.qat.operators.lowbit import lower_lowbit_embedding
from qatcore.quantization.qat.operators.registry import (
    OperatorRule,
    QATRole,
    RecordRule,
    call_arguments,
    register,
    register_onnx_import,
)
from qatcore.quantization.qat.qat_layers import QATEmbedding

__all__ = ["import_table"]


# ---- ONNX export ----------------------------------------------------------------------------------
def _scalar(ex, name: str, value: float) -> str:
    return ex.b.constant(name, np.array(value, np.float32))


def _gelu_approximation(node, module) -> str:
    return module.approximate if module is not None else call_arguments(node)["approximate"]


def _export_gelu(ex, node, module):
    b, name, x = ex.b, ex.node_name(node), ex.unary_input(node)
    if _gelu_approximation(node, module) == "none":
        inner = b.node("Erf", [b.node("Mul", [x, _scalar(ex, f"{name}.inv_sqrt2", 1 / math.sqrt(2))],
                                      f"{name}/Scale")], f"{name}/Erf")
    else:  # tanh(sqrt(2/pi) * (x + 0.044715 x^3))
        cube = b.node("Mul", [b.node("Mul", [x, x], f"{name}/Square"), x], f"{name}/Cube")
        poly = b.node("Add", [x, b.node("Mul", [cube, _scalar(ex, f"{name}.cubic", 0.044715)], f"{name}/CubicTerm")],
                      f"{name}/Poly")
        inner = b.node("Tanh", [b.node("Mul", [poly, _scalar(ex, f"{name}.k", math.sqrt(2 / math.pi))],
                                       f"{name}/Scale")], f"{name}/Tanh")
    cdf = b.node("Mul", [b.node("Add", [inner, _scalar(ex, f"{name}.one", 1.0)], f"{name}/AddOne"),
                         _scalar(ex, f"{name}.half", 0.5)], f"{name}/Half")
    return b.node("Mul", [x, cdf], name), None


def _export_silu(ex, node, module):
    b, name, x = ex.b, ex.node_name(node), ex.unary_input(node)
    return b.node("Mul", [x, b.node("Sigmoid", [x], f"{name}/Sigmoid")], name), None


def _norm_arguments(ex, node, module, with_bias: bool):
    """(x, normalized rank, weight, bias, eps) of a LayerNorm/RMSNorm module or function node;
    weight and bias are tensor names or None."""
    name = ex.node_name(node)
    if module is not None:
        x = ex.single_float_input(node)
        k, eps = len(module.normalized_shape), module.eps
        weight = None if module.weight is None else ex.b.constant(f"{name}.weight", module.weight.data)
        bias = getattr(module, "bias", None) if with_bias else None
        bias = None if bias is None else ex.b.constant(f"{name}.bias", bias.data)
        return x, k, weight, bias, eps, module.normalized_shape
    a = call_arguments(node)
    x = ex.unary_input(node)
    shape = a["normalized_shape"]
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    weight = None if a["weight"] is None else ex.value(a["weight"], f"{name}.weight")
    bias = a.get("bias") if with_bias else None
    bias = None if bias is None else ex.value(bias, f"{name}.bias")
    return x, len(shape), weight, bias, a["eps"], shape


def _export_layer_norm(ex, node, module):
    b, name = ex.b, ex.node_name(node)
    x, k, weight, bias, eps, shape = _norm_arguments(ex, node, module, with_bias=True)
    if weight is None:
        weight = b.constant(f"{name}.ones", np.ones(shape, np.float32))
    inputs = [x, weight] + ([bias] if bias is not None else [])
    return b.node("LayerNormalization", inputs, name, axis=-k, epsilon=float(eps)), None


def _export_rms_norm(ex, node, module):
    b, name = ex.b, ex.node_name(node)
    x, k, weight, _, eps, _ = _norm_arguments(ex, node, module, with_bias=False)
    rank = len(ex.shape(node.args[0]))
    if eps is None:
        eps = float(np.finfo(np.float32).eps)  # the int8 model's float islands run in float32
    axes = b.constant(f"{name}.axes", np.arange(rank - k, rank, dtype=np.int64))
    mean_square = b.node("ReduceMean", [b.node("Mul", [x, x], f"{name}/Square"), axes], f"{name}/ReduceMean",
                         keepdims=1)
    root = b.node("Sqrt", [b.node("Add", [mean_square, _scalar(ex, f"{name}.eps", eps)], f"{name}/AddEps")],
                  f"{name}/Sqrt")
    if weight is None:
        return b.node("Div", [x, root], name), None
    return b.node("Mul", [b.node("Div", [x, root], f"{name}/Div"), weight], name), None


def _export_embedding(ex, node, module):
    b, name = ex.b, ex.node_name(node)
    if module is not None:
        table, indices = b.constant(f"{name}.weight", module.weight.data), node.args[0]
    else:
        a = call_arguments(node)
        table, indices = ex.value(a["weight"], f"{name}.weight"), a["input"]
    index = b.node("Cast", [ex.names[indices]], f"{name}/Cast", to=7)  # TensorProto.INT64
    return b.node("Gather", [table, index], name, axis=0), None


# ---- int8 model files -----------------------------------------------------------------------------
def _record(cls, *settings: str, build_kwargs=None) -> RecordRule:
    """A float layer kept in an int8 model: its settings; the file holds its Parameters beside."""
    def config(module) -> dict:
        return {s: list(v) if isinstance(v := getattr(module, s), tuple) else v for s in settings}

    def build(config: dict):
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        return cls(**kwargs, **(build_kwargs() if build_kwargs else {}))

    return RecordRule(config=config, build=build)


def _layer_norm_record() -> RecordRule:
    def config(ln) -> dict:
        return {"normalized_shape": list(ln.normalized_shape), "eps": ln.eps,
                "elementwise_affine": ln.elementwise_affine, "bias": ln.bias is not None}

    def build(config: dict):
        return LayerNorm(tuple(config["normalized_shape"]), config["eps"], config["elementwise_affine"],
                         config["bias"])

    return RecordRule(config=config, build=build)


# ---- examples -------------------------------------------------------------------------------------
def _example_norm(make):
    """Linear -> norm layer -> Linear on (3, 12) inputs."""
    def example():
        rng = np.random.default_rng(0)
        return Sequential(Linear(12, 8, rng=rng), make(), Linear(8, 4, rng=rng)), (3, 12)
    return example


class _FunctionalNorm(Sequential):
    """Linear -> F.layer_norm / F.rms_norm with a weight Parameter -> Linear (the further
    arguments positional: an int8 model file stores no keyword arguments)."""

    def __init__(self, fn, *args) -> None:
        rng = np.random.default_rng(0)
        super().__init__(Linear(12, 8, rng=rng), Linear(8, 4, rng=rng))
        self.fn, self.fn_args = fn, args
        self.norm_weight = LayerNorm(8).weight
        self.norm_weight.data[...] = rng.uniform(0.5, 1.5, 8)

    def forward(self, x):
        return self[1](self.fn(self[0](x), (8,), self.norm_weight, *self.fn_args))


_NO_EMBEDDING_EXAMPLE = ("its input is token indices and the registry-wide walk feeds float inputs; "
                         "tests/qat/test_transformer_rules.py walks an Embedding model instead")

register(
    OperatorRule(GELU, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_gelu,
                 record=_record(GELU, "approximate"), example=example_between_linears(GELU)),
    OperatorRule(F.gelu, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_gelu,
                 example=example_functional(F.gelu, "tanh")),
    OperatorRule(SiLU, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_silu,
                 record=_record(SiLU), example=example_between_linears(SiLU)),
    OperatorRule(F.silu, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_silu,
                 example=example_functional(F.silu)),
    OperatorRule(LayerNorm, qat=QATRole.NEW_GRID, export=_export_layer_norm, record=_layer_norm_record(),
                 example=_example_norm(lambda: LayerNorm(8))),
    OperatorRule(F.layer_norm, qat=QATRole.NEW_GRID, export=_export_layer_norm,
                 example=lambda: (_FunctionalNorm(F.layer_norm, None, 1e-5), (3, 12))),
    OperatorRule(RMSNorm, qat=QATRole.NEW_GRID, export=_export_rms_norm,
                 record=_record(RMSNorm, "normalized_shape", "eps", "elementwise_affine"),
                 example=_example_norm(lambda: RMSNorm(8, eps=1e-6))),
    OperatorRule(F.rms_norm, qat=QATRole.NEW_GRID, export=_export_rms_norm,
                 example=lambda: (_FunctionalNorm(F.rms_norm), (3, 12))),
    OperatorRule(Embedding, index_input=True, export=_export_embedding,
                 record=_record(Embedding, "num_embeddings", "embedding_dim", "padding_idx",
                                build_kwargs=lambda: {"rng": np.random.default_rng(0)}),
                 example_missing=_NO_EMBEDDING_EXAMPLE),
    OperatorRule(F.embedding, index_input=True, export=_export_embedding, example_missing=_NO_EMBEDDING_EXAMPLE),
    # an Embedding with quantized weights (the config's embedding spec): a lookup of the
    # fake-quantized table; converted to a LowBitEmbedding (lowbit.py)
    OperatorRule(QATEmbedding, qat=QATRole.QUANTIZER, index_input=True, lower=lower_lowbit_embedding),
)


# ---- F.erf (issue 20, for imported ONNX graphs: the exact GELU as Erf) -----------------------------
# An elementwise activation: between two quantizers it converts to an Int8Lookup, as GELU does.
def _export_erf(ex, node, module):
    return ex.b.node("Erf", [ex.unary_input(node)], ex.node_name(node)), None


register(OperatorRule(F.erf, qat=QATRole.ACTIVATION, lower=_lower_lookup, export=_export_erf,
                      example=example_functional(F.erf)))


# ---- ONNX import (issue 20): LayerNormalization, Gelu, Erf, Gather ---------------------------------
def import_table(imp, node, index: int = 0) -> str | None:
    """The module path of an Embedding holding the float initializer at input ``index``, a 2-D
    table whose rows a Gather or a Slice reads (registered once per initializer, named after it:
    ``tok.weight`` -> ``tok``), so its lookups train it; None for any other constant."""
    name = node.input[index]
    table = imp.env.get(name)
    if name not in imp.initializers or not isinstance(table, np.ndarray) or table.ndim != 2 \
            or table.dtype.kind != "f":
        return None
    if name not in imp.tables:
        weight = imp.weight(node, index, rank=2)
        embedding = Embedding(*weight.shape, rng=np.random.default_rng(0))
        embedding.weight.data = weight
        imp.tables[name] = imp.register_layer(node, embedding, name)
    return imp.tables[name]


def _import_gather(imp, node):
    """Rows of a float initializer picked by computed indices: its Embedding; by constant
    indices: ``F.take`` of the Embedding's weight. A computed value at constant indices:
    ``F.take``."""
    attrs = imp.attributes(node, {"axis"})
    axis = int(attrs.get("axis", 0))
    if len(node.input) < 2 or not node.input[1]:
        raise imp.fail(node, "input 1 (the indices) is missing")
    indices = imp.env.get(node.input[1])
    if isinstance(imp.env.get(node.input[0]), np.ndarray):
        path = import_table(imp, node)
        if path is None or axis % 2:
            if isinstance(indices, np.ndarray):
                return imp.fold(node)
            raise imp.fail(node, "computed indices can only pick the rows (axis 0) of a 2-D float table")
        if isinstance(indices, Node):
            return imp.create("call_module", path, (indices,), name=path.replace(".", "_"))
        return imp.call(node, F.take, (imp.read(f"{path}.weight"), imp.constant(node, 1), 0))
    x = imp.runtime(node, 0)
    index = imp.constant(node, 1)
    if index.dtype.kind not in "iu":
        raise imp.fail(node, f"the indices must be integers, got {index.dtype}")
    return imp.call(node, F.take, (x, index, axis))


def _import_layer_norm(imp, node):
    """nn.LayerNorm over the axes from ``axis`` on, weight and bias from Scale and B."""
    attrs = imp.attributes(node, {"axis", "epsilon", "stash_type"})
    if int(attrs.get("stash_type", 1)) != 1:
        raise imp.fail(node, f"stash_type={attrs['stash_type']} is not supported (1: float32 statistics)")
    x = imp.runtime(node, 0)
    scale, bias = imp.weight(node, 1), imp.weight(node, 2, optional=True)
    axis, shape = int(attrs.get("axis", -1)), imp.static_shape(node.input[0])
    if shape is not None:
        if not -len(shape) <= axis < len(shape):
            raise imp.fail(node, f"axis {axis} is out of range for an input of rank {len(shape)}")
        normalized = shape[axis:] if axis >= 0 else shape[len(shape) + axis:]
    elif axis < 0:
        normalized = scale.shape[axis:] if scale.ndim >= -axis else (None,)
    else:
        raise imp.fail(node, f"axis {axis} needs the input's rank, which the file does not fix")
    if None in normalized:
        raise imp.fail(node, f"the normalized axes must have known sizes, got {normalized}")
    layer = LayerNorm(tuple(normalized), eps=float(attrs.get("epsilon", 1e-5)), bias=bias is not None)
    try:
        layer.weight.data = np.broadcast_to(scale, normalized).copy()  # writable: the optimizer updates it
        if bias is not None:
            layer.bias.data = np.broadcast_to(bias, normalized).copy()
    except ValueError:
        raise imp.fail(node, f"Scale {scale.shape} and B {None if bias is None else bias.shape} do not broadcast "
                             f"to the normalized shape {tuple(normalized)}") from None
    return imp.add_layer(node, layer, (x,), tensor=node.input[1])


def _import_gelu(imp, node):
    attrs = imp.attributes(node, {"approximate"})
    approximate = attrs.get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate not in ("none", "tanh"):
        raise imp.fail(node, f"approximate={approximate!r} is not 'none' or 'tanh'")
    return imp.add_layer(node, GELU(approximate), (imp.runtime(node, 0),))


def _import_erf(imp, node):
    imp.attributes(node, set())
    return imp.call(node, F.erf, (imp.runtime(node, 0),))


register_onnx_import("LayerNormalization", _import_layer_norm)
register_onnx_import("Gelu", _import_gelu)
register_onnx_import("Erf", _import_erf)
register_onnx_import("Gather", _import_gather, reads_tables=True)
