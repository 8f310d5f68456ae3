"""Shape and routing ops: Flatten, Identity, Dropout, reshape, permute, transpose, cat.

QAT: their outputs are some of their input's values, so they keep the input's grid and
get no quantizer; a concatenation gets one after it (its inputs may be on other grids).

Conversion: they run on the integers, the grid carried through (``Int8Flatten``,
``Int8Reshape``, ``Int8Permute``; Identity and eval-mode dropout are nothing). A
concatenation followed by its quantizer (and maybe a ReLU) is ``Int8Cat`` on the output
grid: each input whose (scale, zero point) differ from the output's, or that a ReLU
clamps, is requantized first.

ONNX: Flatten / Reshape, Transpose, Concat (on the integers in an int8 model).

The functions imported ONNX graphs call (issue 20) -- ``F.take``, ``F.slice_axis``,
``F.unsqueeze``, ``F.squeeze``, ``F.expand``, ``F.pad`` -- stay float (float islands in an
int8 model; no int8 runtime module yet) and export as Gather, Slice, Unsqueeze, Squeeze,
Expand, Pad. ONNX import here: Flatten, Reshape, Concat, Identity, Dropout, Constant, Shape,
Transpose, Split, Slice, Unsqueeze, Squeeze, Expand.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from qatcore.errors import InteropError
from qatcore.graph import trace
from qatcore.graph.node import Node
from qatcore.nn import functional as F
from qatcore.nn.container import Sequential
from qatcore.nn.conv import Conv2d
from qatcore.nn.dropout import Dropout
from qatcore.nn.flatten import Flatten, Identity
from qatcore.nn.linear import Linear
from qatcore.quantization.int8_layers import Int8Module, Requantize, int_input
from qatcore.quantization.qat.operators.quantizer import int8_record, module_record
from qatcore.quantization.qat.operators.registry import (
    OperatorRule,
    QATRole,
    call_arguments,
    register,
    register_onnx_import,
)
from qatcore.quantization.qat.operators.transformer import import_table

__all__ = ["Int8Flatten", "Int8Reshape", "Int8Permute", "Int8Cat", "onnx_reshape"]


def onnx_reshape(x, shape):
    """ONNX Reshape (allowzero=0): a 0 in ``shape`` copies the input's dimension at that
    position, then ``F.reshape``. Imported Reshape nodes with 0 entries call this.

    >>> import numpy as np
    >>> onnx_reshape(np.zeros((5, 2, 3), np.float32), (0, -1, 2)).shape
    (5, 3, 2)
    """
    dims = np.shape(x.data if hasattr(x, "data") else x)
    return F.reshape(x, _resolve_zeros(shape, dims))


def _resolve_zeros(shape, dims) -> tuple[int, ...]:
    resolved = []
    for i, d in enumerate(shape):
        if d == 0:
            if i >= len(dims):
                raise InteropError(f"ONNX Reshape: shape entry {i} copies a dimension of a rank-{len(dims)} input")
            d = dims[i]
        resolved.append(int(d))
    return tuple(resolved)


# ---- the int8 runtime ---------------------------------------------------------------------------
class Int8Flatten(Int8Module):
    """Merge axes start_dim..end_dim of the integer array."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    CONFIG_KEYS = ("start_dim", "end_dim")

    def config(self) -> dict:
        return {"start_dim": self.start_dim, "end_dim": self.end_dim}

    def forward(self, x):
        q = int_input(self, x)
        start, end = self.start_dim % q.ndim, self.end_dim % q.ndim
        return q.reshape(q.shape[:start] + (-1,) + q.shape[end + 1:])


class Int8Reshape(Int8Module):
    """The integer array with a new shape; ``copy_zeros``: a 0 copies the input's dimension
    (ONNX's Reshape)."""

    def __init__(self, shape, copy_zeros: bool = False) -> None:
        super().__init__()
        self.shape, self.copy_zeros = tuple(int(d) for d in shape), bool(copy_zeros)

    CONFIG_KEYS = ("shape", "copy_zeros")

    def config(self) -> dict:
        return {"shape": list(self.shape), "copy_zeros": self.copy_zeros}

    def forward(self, x):
        q = int_input(self, x)
        return q.reshape(_resolve_zeros(self.shape, q.shape) if self.copy_zeros else self.shape)


class Int8Permute(Int8Module):
    """Reordered axes of the integer array: ``dims`` (a permutation) or ``swap`` (two axes)."""

    def __init__(self, dims=None, swap=None) -> None:
        super().__init__()
        self.dims = None if dims is None else tuple(int(d) for d in dims)
        self.swap = None if swap is None else tuple(int(d) for d in swap)

    CONFIG_KEYS = ("dims", "swap")

    def config(self) -> dict:
        return {"dims": None if self.dims is None else list(self.dims),
                "swap": None if self.swap is None else list(self.swap)}

    def forward(self, x):
        q = int_input(self, x)
        if self.dims is not None:
            return np.transpose(q, self.dims)
        return np.swapaxes(q, *self.swap)


class Int8Cat(Int8Module):
    """Concatenate integer arrays that already share the output's qparams (the converter
    requantizes inputs whose qparams differ first)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    CONFIG_KEYS = ("dim",)

    def config(self) -> dict:
        return {"dim": self.dim}

    def forward(self, *xs):
        return np.concatenate([int_input(self, x) for x in xs], axis=self.dim)


# ---- conversion -----------------------------------------------------------------------------------
def _passthrough(ctx, node, module):
    """Identity, and dropout in eval mode: the input value itself."""
    if node.op == "call_function" and node.target is F.dropout:
        a = call_arguments(node)
        if a["training"] and a["p"] > 0:
            return None
    return ctx.env[node.args[0]] if ctx.env[node.args[0]][1] is not None else None


def _on_integers(make):
    """Lower to ``make(node, module)`` run on the integers, the grid carried through."""
    def lower(ctx, node, module):
        source, value = ctx.env[node.args[0]]
        if value is None:
            return None
        # same grid as the input, but this node's values: compare with this QAT node
        return ctx.add(node.name, make(node, module), (source,), replace(value, source=node.name))
    return lower


def _flatten_settings(node, module) -> tuple[int, int]:
    if module is not None:
        return module.start_dim, module.end_dim
    a = call_arguments(node)
    return a["start_dim"], a["end_dim"]


def _int8_flatten(node, module) -> Int8Flatten:
    return Int8Flatten(*_flatten_settings(node, module))


def _permute_of(node, module) -> Int8Permute:
    a = call_arguments(node)
    if node.target is F.permute:
        return Int8Permute(dims=a["dims"])
    return Int8Permute(swap=(a["dim0"], a["dim1"]))


def _lower_cat(ctx, node, module):
    """Concatenation then its quantizer (and maybe a ReLU): Int8Cat (module docstring)."""
    parts_in = call_arguments(node)["tensors"]
    if not isinstance(parts_in, (list, tuple)) or not all(isinstance(p, Node) for p in parts_in):
        return None
    quantizer, chain, relu = ctx.following_quantizer(node)
    inputs = [ctx.env[p] for p in parts_in]
    if quantizer is None or any(v is None for _, v in inputs):
        return None
    out = ctx.value_of(quantizer, chain[-1].name)
    parts = []
    for i, (new, value) in enumerate(inputs):
        if relu or (value.scale, value.zero_point) != (out.scale, out.zero_point):
            clamp_min = out.zero_point if relu else out.qmin
            new = ctx.add(f"{node.name}_requantize_{i}", Requantize(value.scale, value.zero_point, out.scale,
                                                                    out.zero_point, clamp_min, out.qmin, out.qmax,
                                                                    ctx.requantization),
                          (new,), None)[0]
        parts.append(new)
    ctx.absorb(chain, node)
    return ctx.add(chain[-1].name, Int8Cat(call_arguments(node)["dim"]), tuple(parts), out)


# ---- ONNX export ----------------------------------------------------------------------------------
def _export_passthrough(ex, node, module):
    return ex.unary_input(node), None


def _export_flatten(ex, node, module):
    arg = node.args[0]
    shape = ex.shape(arg)
    start, end = _flatten_settings(node, module)
    return ex.flatten(ex.node_name(node), ex.unary_input(node), len(shape), shape, start, end), None


def _export_reshape(ex, node, module):
    a = call_arguments(node)
    target = np.array([int(d) for d in a["shape"]], np.int64)
    name = node.name
    literal_zeros = node.target is F.reshape and 0 in target  # a zero-size axis, not a copied one
    return ex.b.node("Reshape", [ex.value(a["x"], name), ex.b.constant(f"{name}.shape", target)], name,
                     allowzero=1 if literal_zeros else None), None


def _export_permute(ex, node, module):
    a = call_arguments(node)
    rank = len(ex.shape(a["x"]))
    if node.target is F.permute:
        perm = [int(d) % rank for d in a["dims"]]
    else:
        perm = list(range(rank))
        i, j = int(a["dim0"]) % rank, int(a["dim1"]) % rank
        perm[i], perm[j] = perm[j], perm[i]
    return ex.b.node("Transpose", [ex.value(a["x"], node.name)], node.name, perm=perm), None


def _export_cat(ex, node, module):
    a = call_arguments(node)
    return ex.b.node("Concat", [ex.value(t, node.name) for t in a["tensors"]], node.name, axis=int(a["dim"])), None


def _export_int8_flatten(ex, node, module: Int8Flatten):
    grid = ex.same_grid_input(node)
    shape = ex.shape(node.args[0])
    return ex.flatten(node.target, ex.names[node.args[0]], len(shape), shape, module.start_dim,
                      module.end_dim), grid


def _export_int8_reshape(ex, node, module: Int8Reshape):
    grid = ex.same_grid_input(node)
    shape = np.array(module.shape, np.int64)
    if not module.copy_zeros and np.any(shape == 0):
        raise ex.fail(node, "a reshape to a zero-size dimension")
    name = node.target
    return ex.b.node("Reshape", [ex.names[node.args[0]], ex.b.constant(f"{name}.shape", shape)], name), grid


def _export_int8_permute(ex, node, module: Int8Permute):
    grid = ex.same_grid_input(node)
    rank = len(ex.shape(node.args[0]))
    if module.dims is not None:
        perm = [d % rank for d in module.dims]
    else:
        perm = list(range(rank))
        i, j = module.swap[0] % rank, module.swap[1] % rank
        perm[i], perm[j] = perm[j], perm[i]
    return ex.b.node("Transpose", [ex.names[node.args[0]]], node.target, perm=perm), grid


def _export_int8_cat(ex, node, module: Int8Cat):
    grid = ex.same_grid_input(node)
    return ex.b.node("Concat", [ex.names[a] for a in node.args], node.target, axis=int(module.dim)), grid


# ---- ONNX import ----------------------------------------------------------------------------------
def _import_flatten(imp, node):
    attrs = imp.attributes(node, {"axis"})
    if int(attrs.get("axis", 1)) != 1:
        raise imp.fail(node, f"axis={attrs['axis']} is not supported (only 1: keep the batch axis)")
    return imp.add_layer(node, Flatten(), (imp.runtime(node, 0),))


def _import_reshape(imp, node):
    """Reshape; its target may have one entry known only at run time (the batch, from a Shape
    node): that entry is -1. allowzero=0: a 0 copies the input's dimension; 1: a 0 is a 0."""
    attrs = imp.attributes(node, {"allowzero"})
    allowzero = int(attrs.get("allowzero", 0))
    shape = imp.constant(node, 1, partly_known=True)
    if shape.dtype.kind not in "iu" or shape.ndim != 1:
        raise imp.fail(node, f"the shape must be a constant 1-D integer tensor, got {shape.dtype} {shape.shape}")
    unknown = np.ma.getmaskarray(shape)
    target = tuple(-1 if u else int(d) for u, d in zip(unknown, np.ma.getdata(shape)))
    if unknown.sum() > 1 or (unknown.any() and target.count(-1) > 1):
        raise imp.fail(node, f"shape {shape.tolist()} has several entries known only at run time (the batch); "
                             f"export with a fixed batch size")
    if any(d < -1 for d in target) or target.count(-1) > 1 or (allowzero and 0 in target and -1 in target):
        raise imp.fail(node, f"shape {list(target)} is not a valid ONNX shape")
    x = imp.runtime(node, 0)
    if allowzero or 0 not in target:
        return imp.call(node, F.reshape, (x, target))
    leading = next((i for i, d in enumerate(target) if d != 0), len(target))
    if leading >= 1 and target[leading:] == (-1,):
        # [0, ..., 0, -1]: keep the first axes, merge the rest (a layer the QAT tools know)
        return imp.add_layer(node, Flatten(start_dim=leading), (x,))
    return imp.call(node, onnx_reshape, (x, target))


def _import_concat(imp, node):
    """F.cat of computed values and float constants (buffers); all-constant ones are folded."""
    attrs = imp.attributes(node, {"axis"})
    if "axis" not in attrs:
        raise imp.fail(node, "the axis attribute is required")
    parts = [imp.operand(node, i) for i in range(len(node.input))]
    if any(isinstance(p, float) for p in parts):
        raise imp.fail(node, "a scalar (rank 0) input cannot be concatenated")
    axis, shape = int(attrs["axis"]), imp.static_shape(node.input[0])
    if shape is not None and not -len(shape) <= axis < len(shape):
        raise imp.fail(node, f"axis {axis} is out of range for inputs of rank {len(shape)}")
    return imp.call(node, F.cat, (parts,), {"dim": axis})


def _import_identity(imp, node):
    imp.attributes(node, {"seed", "ratio"} if node.op_type == "Dropout" else set())
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = imp.constant(node, 2)
        if bool(mode.reshape(())):
            raise imp.fail(node, "training_mode=True dropout is not supported")
    value = imp.env.get(node.input[0]) if node.input else None
    if value is None:
        raise imp.fail(node, "input 0 is missing")
    return value  # a computed value, or a constant (shared weights pass through Identity)


def _import_constant(imp, node):
    attrs = node.attribute
    if len(attrs) != 1 or attrs[0].name != "value":
        raise imp.fail(node, "only the 'value' attribute (a tensor) is supported")
    return imp.tensor_array(attrs[0].t, f"Constant {node.name!r}")


# ---- ONNX import (issue 20): Shape, Transpose, Split, Slice, Unsqueeze, Squeeze, Expand ------------
def _import_shape(imp, node):
    """The input's shape as a constant; a dimension that follows the batch is a masked entry
    (known only at run time: a Reshape target may hold one, as -1)."""
    attrs = imp.attributes(node, {"start", "end"})
    imp.runtime(node, 0)  # a computed value: a constant's Shape is folded before it gets here
    shape = imp.static_shape(node.input[0])
    if shape is None:
        raise imp.fail(node, "the input's rank is not known")
    dims = shape[int(attrs.get("start", 0)):attrs.get("end")]
    values = np.array([0 if d is None else d for d in dims], np.int64)
    unknown = [d is None for d in dims]
    return np.ma.masked_array(values, mask=unknown) if any(unknown) else values


def _import_transpose(imp, node):
    attrs = imp.attributes(node, {"perm"})
    x = imp.runtime(node, 0)
    perm, shape = attrs.get("perm"), imp.static_shape(node.input[0])
    if perm is None:  # reversed axes
        if shape is None:
            raise imp.fail(node, "without perm, the input's rank must be known")
        perm = range(len(shape) - 1, -1, -1)
    perm = tuple(int(p) for p in perm)
    if sorted(perm) != list(range(len(perm))) or (shape is not None and len(perm) != len(shape)):
        raise imp.fail(node, f"perm {list(perm)} is not a permutation of the input's "
                             f"{'' if shape is None else len(shape)} axes")
    return imp.call(node, F.permute, (x, perm))


def _import_split(imp, node):
    """One F.slice_axis per output, from ``split`` sizes (input 1, or the attribute before
    opset 13), else equal parts (``num_outputs`` from opset 18: the last one may be smaller)."""
    attrs = imp.attributes(node, {"axis", "split", "num_outputs"})
    x = imp.runtime(node, 0)
    axis, outputs = int(attrs.get("axis", 0)), len(node.output)
    sizes = list(attrs["split"]) if "split" in attrs else imp.integers(node, 1, optional=True)
    shape = imp.static_shape(node.input[0])
    length = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
    if sizes is None:
        parts = int(attrs.get("num_outputs", outputs))
        if length is None or parts != outputs or parts < 1 or ("num_outputs" not in attrs and length % parts):
            raise imp.fail(node, f"without split sizes, {outputs} outputs need an axis length known and "
                                 f"divisible (num_outputs {attrs.get('num_outputs')}, length {length})")
        chunk = -(-length // parts)
        sizes = [chunk] * (parts - 1) + [length - chunk * (parts - 1)]
    if len(sizes) != outputs or min(sizes) < 0 or (length is not None and sum(sizes) != length):
        raise imp.fail(node, f"split sizes {sizes} do not cut an axis of length {length} into {outputs} outputs")
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return tuple(imp.call(node, F.slice_axis, (x, axis, starts[i], starts[i + 1]), suffix=str(i))
                 for i in range(outputs))


def _import_slice(imp, node):
    """One F.slice_axis per sliced axis. A 2-D float initializer sliced (a position table:
    ``pos.weight[:T]``) is read from an Embedding that holds it, so it trains."""
    if imp.opset < 10:
        attrs = imp.attributes(node, {"starts", "ends", "axes"})
        starts, ends, axes, steps = attrs.get("starts"), attrs.get("ends"), attrs.get("axes"), None
        if starts is None or ends is None:
            raise imp.fail(node, "the starts and ends attributes are required")
    else:
        imp.attributes(node, set())
        starts, ends = imp.integers(node, 1), imp.integers(node, 2)
        axes, steps = imp.integers(node, 3, optional=True), imp.integers(node, 4, optional=True)
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else list(steps)
    if not len(starts) == len(ends) == len(axes) == len(steps) or 0 in steps:
        raise imp.fail(node, f"starts {list(starts)}, ends {list(ends)}, axes {axes} and steps {steps} must have one "
                             f"entry per sliced axis, steps non-zero")
    if isinstance(imp.env.get(node.input[0]), np.ndarray):
        path = import_table(imp, node)
        if path is None:
            return imp.fold(node)
        x = imp.read(f"{path}.weight")
    else:
        x = imp.runtime(node, 0)
    rank = len(imp.static_shape(node.input[0]) or axes)
    if len({a % rank if -rank <= a < rank else a for a in axes}) != len(axes):
        raise imp.fail(node, f"axes {axes} name an axis twice")
    for i, (start, end, axis, step) in enumerate(zip(starts, ends, axes, steps)):
        x = imp.call(node, F.slice_axis, (x, int(axis), int(start), int(end), int(step)),
                     suffix=str(i) if len(axes) > 1 else "")
    return x


def _axes(imp, node) -> tuple[int, ...] | None:
    """The axes of Unsqueeze / Squeeze: the attribute before opset 13, input 1 after."""
    attrs = imp.attributes(node, {"axes"})
    if "axes" in attrs:
        return tuple(int(a) for a in attrs["axes"])
    axes = imp.integers(node, 1, optional=True)
    return None if axes is None else tuple(axes)


def _import_unsqueeze(imp, node):
    axes = _axes(imp, node)
    if axes is None:
        raise imp.fail(node, "the axes are required")
    return imp.call(node, F.unsqueeze, (imp.runtime(node, 0), axes))


def _import_squeeze(imp, node):
    return imp.call(node, F.squeeze, (imp.runtime(node, 0), _axes(imp, node)))


def _import_expand(imp, node):
    imp.attributes(node, set())
    return imp.call(node, F.expand, (imp.runtime(node, 0), tuple(imp.integers(node, 1))))


# ---- examples -------------------------------------------------------------------------------------
class _Between(Sequential):
    """conv -> fn(x, *args) -> flatten -> linear: a shape op between quantized layers."""

    def __init__(self, fn, args, features: int) -> None:
        rng = np.random.default_rng(0)
        super().__init__(Conv2d(2, 3, 3, padding=1, rng=rng), Linear(features, 4, rng=rng))
        self.fn, self.fn_args = fn, args

    def forward(self, x):
        return self[1](F.flatten(self.fn(self[0](x), *self.fn_args), 1))


class _Concat(Sequential):
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        super().__init__(Conv2d(2, 3, 3, padding=1, rng=rng), Conv2d(2, 2, 1, rng=rng), Flatten(),
                         Linear(5 * 16, 4, rng=rng))

    def forward(self, x):
        return self[3](self[2](F.relu(F.cat([self[0](x), self[1](x)], 1))))


def _onnx_reshape_example():
    """A traced model whose reshape is the ONNX one (as an imported Reshape with zeros is)."""
    gm = trace(_Between(F.reshape, ((2, 3, 16),), 48))
    for node in gm.graph.nodes:
        if node.target is F.reshape:
            node.target = onnx_reshape
            node.args = (node.args[0], (0, 3, 16))
    return gm, (2, 2, 4, 4)


def _module_example(make):
    return lambda: (_ModuleBetween(make()), (2, 2, 4, 4))


class _ModuleBetween(Sequential):
    def __init__(self, module) -> None:
        rng = np.random.default_rng(0)
        super().__init__(Conv2d(2, 3, 3, padding=1, rng=rng), module, Flatten(), Linear(48, 4, rng=rng))


register(
    OperatorRule(Flatten, qat=QATRole.INPUT_GRID, lower=_on_integers(_int8_flatten), export=_export_flatten,
                 record=module_record(Flatten, "start_dim", "end_dim"), example=_module_example(Flatten)),
    OperatorRule(F.flatten, qat=QATRole.INPUT_GRID, lower=_on_integers(_int8_flatten), export=_export_flatten,
                 example=lambda: (_Between(F.flatten, (2,), 48), (2, 2, 4, 4))),
    OperatorRule(Identity, qat=QATRole.INPUT_GRID, lower=_passthrough, export=_export_passthrough,
                 record=module_record(Identity),
                 example=_module_example(Identity)),
    OperatorRule(Dropout, qat=QATRole.INPUT_GRID, lower=_passthrough, export=_export_passthrough,
                 record=module_record(Dropout, "p"),
                 example=_module_example(lambda: Dropout(0.5, rng=np.random.default_rng(0)))),
    OperatorRule(F.dropout, qat=QATRole.INPUT_GRID, lower=_passthrough, export=_export_passthrough,
                 example=lambda: (_Between(F.dropout, (0.0,), 48), (2, 2, 4, 4))),
    OperatorRule(F.reshape, qat=QATRole.INPUT_GRID,
                 lower=_on_integers(lambda n, m: Int8Reshape(call_arguments(n)["shape"])), export=_export_reshape,
                 example=lambda: (_Between(F.reshape, ((2, 3, 16),), 48), (2, 2, 4, 4))),
    OperatorRule(onnx_reshape, qat=QATRole.INPUT_GRID,
                 lower=_on_integers(lambda n, m: Int8Reshape(call_arguments(n)["shape"], copy_zeros=True)),
                 export=_export_reshape, example=_onnx_reshape_example),
    OperatorRule(F.permute, qat=QATRole.INPUT_GRID, lower=_on_integers(_permute_of), export=_export_permute,
                 example=lambda: (_Between(F.permute, ((0, 2, 3, 1),), 48), (2, 2, 4, 4))),
    OperatorRule(F.transpose, qat=QATRole.INPUT_GRID, lower=_on_integers(_permute_of), export=_export_permute,
                 example=lambda: (_Between(F.transpose, (1, 3), 48), (2, 2, 4, 4))),
    OperatorRule(F.cat, qat=QATRole.NEW_GRID, quantize_after_activation=True, lower=_lower_cat, export=_export_cat,
                 example=lambda: (_Concat(), (2, 2, 4, 4))),
    OperatorRule(Int8Flatten, export=_export_int8_flatten, record=int8_record(Int8Flatten)),
    OperatorRule(Int8Reshape, export=_export_int8_reshape, record=int8_record(Int8Reshape)),
    OperatorRule(Int8Permute, export=_export_int8_permute, record=int8_record(Int8Permute)),
    OperatorRule(Int8Cat, export=_export_int8_cat, record=int8_record(Int8Cat)),
)
# ---- the functions imported ONNX graphs call (issue 20): take, slice_axis, unsqueeze, squeeze, ----
# ---- expand, pad. They stay float (a float island in an int8 model): no int8 runtime yet. ---------
_INT64 = np.iinfo(np.int64)


def _ints(ex, name: str, values) -> str:
    return ex.b.constant(name, np.array(values, np.int64))


def _export_take(ex, node, module):
    a = call_arguments(node)
    rank = len(ex.shape(a["x"]))
    indices = np.asarray(a["indices"].data if hasattr(a["indices"], "data") else a["indices"], np.int64)
    return ex.b.node("Gather", [ex.value(a["x"], node.name), _ints(ex, f"{node.name}.indices", indices)],
                     node.name, axis=int(a["dim"]) % rank), None


def _export_slice_axis(ex, node, module):
    a = call_arguments(node)
    step = int(a["step"])
    start = a["start"] if a["start"] is not None else (0 if step > 0 else _INT64.max)
    end = a["end"] if a["end"] is not None else (_INT64.max if step > 0 else _INT64.min)
    inputs = [ex.value(a["x"], node.name)] + [_ints(ex, f"{node.name}.{k}", [int(v)]) for k, v in
                                              (("starts", start), ("ends", end), ("axes", a["dim"]), ("steps", step))]
    return ex.b.node("Slice", inputs, node.name), None


def _export_squeeze_like(op_type: str):
    def export(ex, node, module):
        a = call_arguments(node)
        dim = a["dim"]
        if dim is None:  # squeeze: every axis of size 1 of the recorded input shape
            dim = [i for i, d in enumerate(ex.shape(a["x"])) if d == 1]
        axes = [int(d) for d in ((dim,) if isinstance(dim, (int, np.integer)) else dim)]
        return ex.b.node(op_type, [ex.value(a["x"], node.name), _ints(ex, f"{node.name}.axes", axes)],
                         node.name), None
    return export


def _export_expand(ex, node, module):
    a = call_arguments(node)
    return ex.b.node("Expand", [ex.value(a["x"], node.name), _ints(ex, f"{node.name}.shape", list(a["shape"]))],
                     node.name), None


def _export_pad(ex, node, module):
    """PyTorch's (before, after) pairs from the last axis back, as ONNX's [begins..., ends...]."""
    a = call_arguments(node)
    rank = len(ex.shape(a["x"]))
    counts = [int(p) for p in a["pad"]]
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(counts) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = counts[2 * i], counts[2 * i + 1]
    value = ex.b.constant(f"{node.name}.value", np.float32(a["value"]))
    return ex.b.node("Pad", [ex.value(a["x"], node.name), _ints(ex, f"{node.name}.pads", begins + ends), value],
                     node.name, mode="constant"), None


register(
    OperatorRule(F.take, export=_export_take,
                 example=lambda: (_Between(F.take, (np.array([0, 2]), 1), 32), (2, 2, 4, 4))),
    OperatorRule(F.slice_axis, export=_export_slice_axis,
                 example=lambda: (_Between(F.slice_axis, (3, -1, None, -2), 24), (2, 2, 4, 4))),
    OperatorRule(F.unsqueeze, export=_export_squeeze_like("Unsqueeze"),
                 example=lambda: (_Between(F.unsqueeze, ((1, -1),), 48), (2, 2, 4, 4))),
    OperatorRule(F.squeeze, export=_export_squeeze_like("Squeeze"),
                 example=lambda: (_Between(lambda x: F.squeeze(F.unsqueeze(x, 2), 2), (), 48), (2, 2, 4, 4))),
    OperatorRule(F.expand, export=_export_expand,
                 example=lambda: (_Between(F.expand, ((2, 1, 1, 1, 1),), 96), (2, 2, 4, 4))),
    OperatorRule(F.pad, export=_export_pad,
                 example=lambda: (_Between(F.pad, ((1, 0, 0, 1), -1.0), 75), (2, 2, 4, 4))),
)

register_onnx_import("Flatten", _import_flatten)
register_onnx_import("Reshape", _import_reshape)
register_onnx_import("Concat", _import_concat)
register_onnx_import("Identity", _import_identity)
register_onnx_import("Dropout", _import_identity)
register_onnx_import("Constant", _import_constant)
register_onnx_import("Shape", _import_shape)
register_onnx_import("Transpose", _import_transpose)
register_onnx_import("Split", _import_split)
register_onnx_import("Slice", _import_slice, reads_tables=True)
register_onnx_import("Unsqueeze", _import_unsqueeze)
register_onnx_import("Squeeze", _import_squeeze)
register_onnx_import("Expand", _import_expand)
