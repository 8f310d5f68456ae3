"""Export of qatcore graphs to ONNX: float models, QAT models (QDQ), int8 models.

The model's graph is walked in order (a model that is not a GraphModule is traced
first) and every node becomes ONNX nodes. What a node becomes depends on the kind
of model:

**float** (no quantizers): the float op set (Conv, Gemm / MatMul, BatchNormalization,
Relu, pools, Flatten, Reshape, Concat, Add, ...). Module calls keep their dotted
path as the ONNX node name and their parameter names in the initializer names
(``conv1.weight``), so :func:`~qatcore.interop.onnx_import.import_onnx` gives back a
model with the same state_dict keys.

**QAT** (the eval-mode computation of a prepared model, in float with QDQ pairs):
every enabled ``FakeQuantize`` becomes ``QuantizeLinear -> DequantizeLinear`` with
its current qparams; a QAT layer's weight is stored fake-quantized (the grid values
(q - z) * s, BatchNorm folded for QATConvBn2d) behind its own QDQ pair, so any
toolchain that re-quantizes it with the stored scale gets our integers exactly; its
bias is the one the QAT eval path adds (rounded to the s_x * s_w grid).

**int8** (a converted model), ``format="qdq"``: every integer value is an ONNX
uint8/int8 tensor with the scale and zero point the converter gave it; each
integer op becomes ``DequantizeLinear -> float op -> QuantizeLinear`` (Conv/Gemm
with int8 weights and an int32 bias behind DequantizeLinear, per-channel weight
scales on axis 0), which ONNX Runtime fuses into its integer kernels. Max pooling,
flatten and concatenation run on the integers themselves. ``format="qoperator"``:
convolutions become ``QLinearConv``, linear layers ``QLinearMatMul`` (no bias) or a
1x1 ``QLinearConv`` (QLinearMatMul has no bias input; QLinearConv takes the int32
bias); add, average pooling and requantization have no standard-domain QLinear
operator and stay in the QDQ form.

A fused ReLU is ``Relu`` before the QuantizeLinear (relu then round is exactly the
clamp at the zero point); an integer range narrower than its container (4-bit values
in int8, say) is an integer ``Clip`` after it.

What ONNX Runtime computes equals the int8 runtime at every value when the model uses
the ``"float32"`` requantization arithmetic (its QuantizeLinear's division, its float32
requantization; docs/numerics.md). With ``"fixed_point"`` (the default) a value differs
by a step where it lies within float32 precision of a rounding boundary
(``qatcore.interop.onnxruntime_agreement`` measures it; docs/interop.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from qatcore import kernels
from qatcore.errors import InteropError
from qatcore.graph import GraphModule
from qatcore.graph.graph import resolve_attribute
from qatcore.graph.node import Node
from qatcore.interop.onnx_builder import OnnxBuilder
from qatcore.nn.module import Module
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.int8_layers import Int8Module
from qatcore.quantization.qat.operators import UnregisteredOperatorError, call_arguments, rule_for_node
from qatcore.quantization.qat.operators.weighted import weight_scales
from qatcore.quantization.qat.qat_layers import QATLayer
from qatcore.tensor import Tensor

__all__ = ["build_onnx_model", "model_kind", "reads_indices_only", "weight_scales"]

_CONTAINERS = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16}


def model_kind(model: Module) -> str:
    """"int8" (a converted model), "qat" (prepared, with quantizers) or "float"."""
    modules = list(model.modules())
    if any(isinstance(m, Int8Module) for m in modules):
        return "int8"
    if any(isinstance(m, (FakeQuantize, QATLayer)) for m in modules):
        return "qat"
    return "float"


def reads_indices_only(gm: GraphModule, node: Node) -> bool:
    """Whether every user of ``node`` reads it as the indices of a lookup (its rule's
    ``index_input``, as its first argument): such an input is int64 token indices in the file."""
    def lookup(user: Node) -> bool:
        module = gm.get_submodule(user.target) if user.op == "call_module" else None
        try:
            rule = rule_for_node(user, module)
        except UnregisteredOperatorError:
            return False
        return rule.index_input and bool(user.args) and user.args[0] is node
    return bool(node.users) and all(lookup(user) for user in node.users)


@dataclass(frozen=True)
class Grid:
    """How an ONNX integer tensor encodes reals: (q - zero_point) * scale, q in [lo, hi],
    stored as ``dtype``."""

    scale: float
    zero_point: int
    lo: int
    hi: int
    dtype: np.dtype

    @property
    def container(self) -> tuple[int, int]:
        info = np.iinfo(self.dtype)
        return int(info.min), int(info.max)


def _pair(value) -> list[int]:
    return [value, value] if isinstance(value, int) else [int(v) for v in value]


def _pads(padding) -> list[int]:
    ph, pw = _pair(padding)
    return [ph, pw, ph, pw]


def _data(value):
    if value is None or isinstance(value, Node):
        return None
    return value.data if isinstance(value, Tensor) else np.asarray(value)


class _Exporter:
    """Walks one GraphModule (its nodes carry ``meta["shape"]``) into an OnnxBuilder."""

    def __init__(self, gm: GraphModule, kind: str, form: str) -> None:
        self.gm, self.kind, self.form = gm, kind, form
        self.b = OnnxBuilder()
        self.names: dict[Node, str] = {}
        self.grids: dict[Node, Grid | None] = {}

    # ---- helpers (the operator rules' export functions call these) ------------------------------
    pair = staticmethod(_pair)
    pads = staticmethod(_pads)
    data = staticmethod(_data)
    arguments = staticmethod(call_arguments)

    def fail(self, node: Node, what: str) -> InteropError:
        return InteropError(f"ONNX export: node {node.name!r} ({what}) has no ONNX counterpart here; "
                            f"supported: see docs/interop.md")

    def node_name(self, node: Node) -> str:
        """The ONNX name of a node: a module call keeps its dotted path (``conv1``)."""
        return node.target if node.op == "call_module" else node.name

    def single_float_input(self, node: Node) -> str:
        """The float input of a module called on exactly one value."""
        args = [a for a in node.args if isinstance(a, Node)]
        if len(args) != 1 or len(node.args) != 1 or node.kwargs:
            raise self.fail(node, f"{node.target} called with {len(node.args)} arguments")
        return self.float_input(node, args[0])

    def unary_input(self, node: Node) -> str:
        """The input of a one-input op, module call or function call (its first argument)."""
        if node.op == "call_module":
            return self.single_float_input(node)
        for arg in node.all_input_nodes:
            self.float_input(node, arg)
        return self.value(node.args[0], node.name)

    def same_grid_input(self, node: Node) -> Grid:
        """The grid shared by all of an int8 node's inputs (max pool, flatten, cat)."""
        grids = [self.grids.get(a) for a in node.args if isinstance(a, Node)]
        if not grids or any(g is None for g in grids) or len({(g.scale, g.zero_point) for g in grids}) != 1:
            raise InteropError(f"ONNX export: int8 node {node.target!r} needs integer inputs on one grid")
        return grids[0]

    def shape(self, node: Node) -> tuple:
        shape = node.meta.get("shape")
        if shape is None or (shape and isinstance(shape[0], tuple)):
            raise InteropError(f"ONNX export: node {node.name!r} has no single array shape recorded")
        return shape

    def value(self, arg, base: str) -> str:
        """The tensor name of an argument: a node's tensor, or a float32 constant."""
        if isinstance(arg, Node):
            return self.names[arg]
        array = arg.data if isinstance(arg, Tensor) else np.asarray(arg)
        if array.dtype.kind not in "biuf":
            raise InteropError(f"ONNX export: node {base!r} takes a constant of dtype {array.dtype}")
        return self.b.constant(f"{base}_const", array.astype(np.float32))  # operands of float ops

    def float_input(self, node: Node, arg: Node) -> str:
        if self.grids.get(arg) is not None:
            raise InteropError(f"ONNX export: node {node.name!r} receives the integer value {arg.name!r}")
        return self.names[arg]

    def dequantize(self, arg: Node, name: str) -> str:
        grid = self.grids.get(arg)
        if grid is None:
            raise InteropError(f"ONNX export: node {name!r} expects an integer value, got float {arg.name!r}")
        return self.b.node("DequantizeLinear", [self.names[arg], *self.grid_constants(grid, name)],
                           f"{name}/DequantizeLinear")

    def int4_constant(self, base: str, values: np.ndarray) -> str:
        """An INT4 initializer holding ``values`` (integers in [-8, 7], any shape). ONNX packs
        INT4 as qatcore does (two's complement, two to a byte, the first in the low nibble,
        row-major), so ``kernels.lowbit_pack`` writes its raw bytes."""
        values = np.asarray(values)
        if values.size and (int(values.min()) < -8 or int(values.max()) > 7):
            raise InteropError(f"ONNX export: {base!r} holds integers in [{int(values.min())}, "
                               f"{int(values.max())}], outside INT4's [-8, 7]")
        packed = kernels.lowbit_pack.pack_lowbit(values.reshape(1, -1), 4)
        name = self.b.fresh(base)
        self.b.initializers.append(helper.make_tensor(name, TensorProto.INT4, values.shape, packed.tobytes(),
                                                      raw=True))
        return name

    def grid_constants(self, grid: Grid, name: str) -> tuple[str, str]:
        return (self.b.constant(f"{name}.scale", np.float32(grid.scale)),
                self.b.constant(f"{name}.zero_point", np.array(grid.zero_point, dtype=grid.dtype)))

    def quantize(self, y: str, grid: Grid, name: str, relu: bool = False, separate: bool = False) -> str:
        """QuantizeLinear onto ``grid``: a ``Relu`` first when ``relu`` (the clamp at the zero
        point), an integer ``Clip`` after when the range is narrower than the container.
        ``separate``: ``y`` comes straight from a DequantizeLinear (a requantization); put a float
        ``Clip`` to the grid's range between them when there is no Relu (a no-op, as QuantizeLinear
        clamps there too), so that ONNX Runtime's DoubleQDQPairsRemover cannot merge
        Q -> DQ -> Q -> DQ into a single quantization to a recomputed grid."""
        if relu:
            y = self.b.node("Relu", [y], f"{name}/Relu")
        elif separate:
            low = np.float32(grid.lo - grid.zero_point) * np.float32(grid.scale)
            high = np.float32(grid.hi - grid.zero_point) * np.float32(grid.scale)
            y = self.clip(f"{name}/Clip_range", y, float(low), float(high))
        q = self.b.node("QuantizeLinear", [y, *self.grid_constants(grid, name)], f"{name}/QuantizeLinear")
        return self.clip_integers(q, grid, name, relu)

    def clip_integers(self, q: str, grid: Grid, name: str, relu: bool = False) -> str:
        """An integer Clip to the grid's range where it is narrower than the container (with
        ``relu`` the Relu before QuantizeLinear has already clamped at the zero point)."""
        low, high = grid.container
        lo = grid.zero_point if relu else grid.lo
        if (relu or lo == low) and grid.hi == high:
            return q
        return self.b.node("Clip", [q, self.b.constant(f"{name}.clip_min", np.array(lo, grid.dtype)),
                                    self.b.constant(f"{name}.clip_max", np.array(grid.hi, grid.dtype))],
                           f"{name}/Clip")

    # ---- the walk -----------------------------------------------------------------------------
    def run(self, graph_name: str) -> onnx.ModelProto:
        inputs, outputs = [], []
        for node in self.gm.graph.nodes:
            if node.op == "input":
                self.names[node] = self.b.reserve(node.target)
                self.grids[node] = None
                shape = self.shape(node)
                indices = np.dtype(node.meta["dtype"]).kind in "iu"  # token indices (export_onnx checked)
                inputs.append((node.target, np.int64 if indices else np.float32, ("batch", *shape[1:])))
            elif node.op == "output":
                outputs = self.outputs(node)
            elif node.op == "get_attr":
                value = resolve_attribute(self.gm, node.target, node)
                array = np.asarray(value.data if isinstance(value, Tensor) else value)
                if array.dtype == np.float64:
                    array = array.astype(np.float32)  # the float ops of the file are float32
                self.names[node] = self.b.constant(node.target, array)
                self.grids[node] = None
            else:
                self.names[node], self.grids[node] = self.call(node)
        return self.b.model(inputs, outputs, graph_name, doc=f"exported by qatcore ({self.kind} model)")

    def outputs(self, node: Node) -> list[tuple[str, Any, tuple]]:
        leaves: list[Node] = []
        constants: list[Any] = []
        _walk_outputs(node.args[0], leaves.append, constants.append)
        if constants:
            raise InteropError(f"ONNX export: the model returns a constant ({constants[0]!r}) among its outputs; "
                               f"ONNX outputs are computed tensors")
        result, used = [], set()
        for leaf in leaves:
            name = self.names[leaf]
            if leaf.op == "input" or name in used:
                name = self.b.node("Identity", [name], f"{leaf.name}/output")
            used.add(name)
            grid = self.grids.get(leaf)
            shape = self.shape(leaf)
            result.append((name, np.float32 if grid is None else grid.dtype, ("batch", *shape[1:])))
        return result

    # ---- one node: its operator rule's export ---------------------------------------------------
    def call(self, node: Node) -> tuple[str, Grid | None]:
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        try:
            rule = rule_for_node(node, module)
        except UnregisteredOperatorError as e:
            raise InteropError(f"ONNX export: node {node.name!r}: {e}") from None
        if rule.export is None:
            raise self.fail(node, rule.name)
        if module is None:
            for arg in node.all_input_nodes:
                self.float_input(node, arg)
        return rule.export(self, node, module)

    # ---- float building blocks ----------------------------------------------------------------
    def conv(self, name: str, x: str, w: str, b: str | None, kernel, geometry: tuple) -> str:
        """Conv(x, w[, b]) for tensor names w and b; geometry is (stride, padding, dilation, groups)."""
        stride, padding, dilation, groups = geometry
        return self.b.node("Conv", [x, w] + ([b] if b else []), name, kernel_shape=[int(k) for k in kernel],
                           strides=_pair(stride), pads=_pads(padding), dilations=_pair(dilation), group=int(groups))

    def constants(self, name: str, weight: np.ndarray, bias: np.ndarray | None) -> tuple[str, str | None]:
        """Initializers ``<name>.weight`` and ``<name>.bias`` (None without a bias)."""
        return (self.b.constant(f"{name}.weight", weight),
                None if bias is None else self.b.constant(f"{name}.bias", bias))

    def linear(self, name: str, x: str, x_shape: tuple, weight, bias, weight_name: str | None = None,
               bias_name: str | None = None) -> str:
        """Gemm(x, W, b, transB=1) on a matrix; MatMul(x, W^T) (+ Add b) on higher ranks."""
        b = self.b
        if bias_name is None and bias is not None:
            bias_name = b.constant(f"{name}.bias", bias)
        if len(x_shape) == 2:
            w = weight_name or b.constant(f"{name}.weight", weight)
            return b.node("Gemm", [x, w] + ([bias_name] if bias_name else []), name, transB=1)
        if weight_name is None:
            w = b.constant(f"{name}.weight_t", np.ascontiguousarray(np.asarray(weight).T))
        else:
            w = b.node("Transpose", [weight_name], f"{name}/Transpose", perm=[1, 0])
        y = b.node("MatMul", [x, w], name if bias_name is None else f"{name}/MatMul")
        return b.node("Add", [y, bias_name], name) if bias_name else y

    def batch_norm(self, name: str, x: str, bn) -> str:
        b = self.b
        c = bn.num_features
        gamma = bn.weight.data if bn.weight is not None else np.ones(c, np.float32)
        beta = bn.bias.data if bn.bias is not None else np.zeros(c, np.float32)
        if bn.running_mean is None:
            raise InteropError(f"ONNX export: BatchNorm {name!r} tracks no running statistics; ONNX "
                               f"BatchNormalization needs them")
        inputs = [b.constant(f"{name}.weight", gamma), b.constant(f"{name}.bias", beta),
                  b.constant(f"{name}.running_mean", bn.running_mean.data),
                  b.constant(f"{name}.running_var", bn.running_var.data)]
        return b.node("BatchNormalization", [x, *inputs], name, epsilon=float(bn.eps),
                      momentum=float(1.0 - bn.momentum))

    def clip(self, name: str, x: str, low: float | None, high: float | None) -> str:
        inputs = [x, "" if low is None else self.b.constant(f"{name}.min", np.float32(low)),
                  "" if high is None else self.b.constant(f"{name}.max", np.float32(high))]
        while inputs[-1] == "":
            inputs.pop()
        return self.b.node("Clip", inputs, name)

    def max_pool(self, name: str, x: str, kernel, stride, padding, dilation) -> str:
        return self.b.node("MaxPool", [x], name, kernel_shape=_pair(kernel), strides=_pair(stride or kernel),
                           pads=_pads(padding), dilations=_pair(dilation))

    def avg_pool(self, name: str, x: str, kernel, stride, padding, count_include_pad=True) -> str:
        return self.b.node("AveragePool", [x], name, kernel_shape=_pair(kernel), strides=_pair(stride or kernel),
                           pads=_pads(padding), count_include_pad=int(bool(count_include_pad)))

    def flatten(self, name: str, x: str, rank: int, shape: tuple, start_dim: int, end_dim: int) -> str:
        start, end = start_dim % rank, end_dim % rank
        if start == 1 and end == rank - 1:
            return self.b.node("Flatten", [x], name, axis=1)
        target = [0] * start + [-1] + [int(d) for d in shape[end + 1:]]
        return self.b.node("Reshape", [x, self.b.constant(f"{name}.shape", np.array(target, np.int64))], name)

    # ---- QAT ----------------------------------------------------------------------------------
    def qdq(self, x: str, quantizer: FakeQuantize, name: str, on_grid: bool = False) -> str:
        """QuantizeLinear -> DequantizeLinear with the quantizer's qparams now (``x`` itself when
        its fake quantization is off). A range narrower than the container is clipped: on the
        integers after QuantizeLinear in an 8-bit container, on the reals before it in a 16-bit
        one (ONNX Runtime has no 16-bit integer Clip); both equal the clamp after rounding.
        ``on_grid``: ``x`` holds grid values already (weights), so no clip is needed."""
        if not bool(quantizer.fake_quant_enabled.data):
            return x
        qparams = quantizer.calculate_qparams()
        dtype = qparams.dtype
        container = _CONTAINERS.get((8 if dtype.bits <= 8 else 16, dtype.signed))
        if container is None or dtype.bits > 16:
            raise InteropError(f"ONNX export: quantizer {quantizer.name or name!r} uses {dtype}; ONNX "
                               f"QuantizeLinear holds at most 16 bits")
        axis = qparams.axis
        scale = qparams.scale.astype(np.float32)
        zero_point = qparams.zero_point.astype(container)
        if axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        low, high = int(np.iinfo(container).min), int(np.iinfo(container).max)
        narrow = not on_grid and (qparams.qmin, qparams.qmax) != (low, high)
        if narrow and container in (np.int16, np.uint16):
            if axis is not None:
                raise InteropError(f"ONNX export: quantizer {quantizer.name or name!r} is per channel with "
                                   f"{dtype}; a narrowed 16-bit range is exported per tensor only")
            lo = np.float32((qparams.qmin - int(zero_point)) * scale)
            hi = np.float32((qparams.qmax - int(zero_point)) * scale)
            x = self.clip(f"{name}/Clip", x, float(lo), float(hi))
        s = self.b.constant(f"{name}.scale", scale)
        z = self.b.constant(f"{name}.zero_point", zero_point)
        q = self.b.node("QuantizeLinear", [x, s, z], f"{name}/QuantizeLinear", axis=axis)
        if narrow and container in (np.int8, np.uint8):
            q = self.b.node("Clip", [q, self.b.constant(f"{name}.clip_min", np.array(qparams.qmin, container)),
                                     self.b.constant(f"{name}.clip_max", np.array(qparams.qmax, container))],
                            f"{name}/Clip")
        return self.b.node("DequantizeLinear", [q, s, z], f"{name}/DequantizeLinear", axis=axis)

    # ---- int8 ---------------------------------------------------------------------------------
    def out_grid(self, module: Int8Module) -> Grid:
        qmin, qmax = (int(v) for v in module.output_range.data)
        return Grid(float(module.output_scale.data), int(module.output_zero_point.data), qmin, qmax,
                    module.out_dtype)


def _walk_outputs(value, on_node, on_constant) -> None:
    """Call ``on_node`` on every Node of a (nested) output structure, ``on_constant`` on anything else."""
    if isinstance(value, Node):
        on_node(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _walk_outputs(item, on_node, on_constant)
    elif isinstance(value, dict):
        for item in value.values():
            _walk_outputs(item, on_node, on_constant)
    else:
        on_constant(value)


def build_onnx_model(gm: GraphModule, kind: str, form: str) -> onnx.ModelProto:
    """The ONNX model of ``gm`` (its nodes already carry shapes); see the module docstring."""
    return _Exporter(gm, kind, form).run(gm.class_name)
