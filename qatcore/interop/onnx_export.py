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

What ONNX Runtime computes differs from the int8 runtime only in roundings: ONNX
QuantizeLinear divides by the scale where qatcore multiplies by its inverse (docs/numerics.md), and
ONNX Runtime requantizes in float32 where we use the fixed-point multiplier. A value
changes only when it lies within about 1e-6 of a rounding boundary (see
docs/interop.md for the measured agreement).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from qatcore.errors import InteropError
from qatcore.graph import GraphModule
from qatcore.graph.graph import _resolve
from qatcore.graph.node import Node
from qatcore.interop.onnx_builder import OnnxBuilder
from qatcore.interop.onnx_import import onnx_reshape
from qatcore.nn import functional as F
from qatcore.nn.activation import LeakyReLU, LogSoftmax, ReLU, ReLU6, Sigmoid, Softmax, Tanh
from qatcore.nn.batchnorm import BatchNorm1d, BatchNorm2d
from qatcore.nn.conv import Conv2d
from qatcore.nn.dropout import Dropout
from qatcore.nn.flatten import Flatten, Identity
from qatcore.nn.linear import Linear
from qatcore.nn.module import Module
from qatcore.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.int8_layers import (
    Dequantize,
    Int8AvgPool2d,
    Int8Cat,
    Int8Flatten,
    Int8MaxPool2d,
    Quantize,
    QuantizedAdd,
    QuantizedConv2d,
    QuantizedLinear,
    Requantize,
    _Int8Module,
)
from qatcore.quantization.qat.qat_layers import QAT_LAYER_TYPES, QATConvBn2d, QATLinear
from qatcore.tensor import Tensor

__all__ = ["build_onnx_model", "model_kind", "weight_scales"]

_CONTAINERS = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16}


def model_kind(model: Module) -> str:
    """"int8" (a converted model), "qat" (prepared, with quantizers) or "float"."""
    modules = list(model.modules())
    if any(isinstance(m, _Int8Module) for m in modules):
        return "int8"
    if any(isinstance(m, (FakeQuantize, *QAT_LAYER_TYPES)) for m in modules):
        return "qat"
    return "float"


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


class _Exporter:
    """Walks one GraphModule (its nodes carry ``meta["shape"]``) into an OnnxBuilder."""

    def __init__(self, gm: GraphModule, kind: str, form: str) -> None:
        self.gm, self.kind, self.form = gm, kind, form
        self.b = OnnxBuilder()
        self.names: dict[Node, str] = {}
        self.grids: dict[Node, Grid | None] = {}

    # ---- helpers ------------------------------------------------------------------------------
    def fail(self, node: Node, what: str) -> InteropError:
        return InteropError(f"ONNX export: node {node.name!r} ({what}) has no ONNX counterpart here; "
                            f"supported: see docs/interop.md")

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
                inputs.append((node.target, np.float32, ("batch", *shape[1:])))
            elif node.op == "output":
                outputs = self.outputs(node)
            elif node.op == "get_attr":
                value = _resolve(self.gm, node.target, node)
                array = np.asarray(value.data if isinstance(value, Tensor) else value)
                if array.dtype == np.float64:
                    array = array.astype(np.float32)  # the float ops of the file are float32
                self.names[node] = self.b.constant(node.target, array)
                self.grids[node] = None
            elif node.op == "call_module":
                self.names[node], self.grids[node] = self.call_module(node, self.gm.get_submodule(node.target))
            else:
                self.names[node], self.grids[node] = self.call_function(node), None
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

    # ---- modules ------------------------------------------------------------------------------
    def call_module(self, node: Node, module: Module) -> tuple[str, Grid | None]:
        name = node.target
        args = [a for a in node.args if isinstance(a, Node)]
        if isinstance(module, _Int8Module):
            return self.int8_module(node, module, name, args)
        if isinstance(module, FakeQuantize):
            return self.fake_quantize(node, module, name), None
        if isinstance(module, QAT_LAYER_TYPES):
            return self.qat_layer(node, module, name), None
        if len(args) != 1 or len(node.args) != 1 or node.kwargs:
            raise self.fail(node, f"{type(module).__name__} called with {len(node.args)} arguments")
        x = self.float_input(node, args[0])
        return self.float_module(node, module, name, x, args[0]), None

    def float_module(self, node: Node, module: Module, name: str, x: str, arg: Node) -> str:
        b = self.b
        if isinstance(module, (Identity, Dropout)):
            return x
        if isinstance(module, Conv2d):
            w, bias = self.constants(name, module.weight.data, None if module.bias is None else module.bias.data)
            return self.conv(name, x, w, bias, module.weight.shape[2:], _geometry(module))
        if isinstance(module, Linear):
            return self.linear(name, x, self.shape(arg), module.weight.data,
                               None if module.bias is None else module.bias.data)
        if isinstance(module, (BatchNorm2d, BatchNorm1d)):
            return self.batch_norm(name, x, module)
        if isinstance(module, ReLU):
            return b.node("Relu", [x], name)
        if isinstance(module, ReLU6):
            return self.clip(name, x, 0.0, 6.0)
        if isinstance(module, LeakyReLU):
            return b.node("LeakyRelu", [x], name, alpha=float(module.negative_slope))
        if isinstance(module, Sigmoid):
            return b.node("Sigmoid", [x], name)
        if isinstance(module, Tanh):
            return b.node("Tanh", [x], name)
        if isinstance(module, (Softmax, LogSoftmax)):
            op = "Softmax" if isinstance(module, Softmax) else "LogSoftmax"
            return b.node(op, [x], name, axis=int(module.dim))
        if isinstance(module, MaxPool2d):
            return self.max_pool(name, x, module.kernel_size, module.stride, module.padding, module.dilation)
        if isinstance(module, AvgPool2d):
            return self.avg_pool(node, name, x, module.kernel_size, module.stride, module.padding,
                                 module.count_include_pad)
        if isinstance(module, AdaptiveAvgPool2d):
            return self.global_pool(node, name, x, module.output_size)
        if isinstance(module, Flatten):
            return self.flatten(name, x, len(self.shape(arg)), self.shape(arg), module.start_dim, module.end_dim)
        raise self.fail(node, f"module {type(module).__name__}")

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

    def avg_pool(self, node: Node, name: str, x: str, kernel, stride, padding, count_include_pad=True) -> str:
        return self.b.node("AveragePool", [x], name, kernel_shape=_pair(kernel), strides=_pair(stride or kernel),
                           pads=_pads(padding), count_include_pad=int(bool(count_include_pad)))

    def global_pool(self, node: Node, name: str, x: str, output_size) -> str:
        if output_size not in (1, (1, 1), [1, 1]):
            raise self.fail(node, f"adaptive average pooling to {output_size}; only 1 (GlobalAveragePool)")
        return self.b.node("GlobalAveragePool", [x], name)

    def flatten(self, name: str, x: str, rank: int, shape: tuple, start_dim: int, end_dim: int) -> str:
        start, end = start_dim % rank, end_dim % rank
        if start == 1 and end == rank - 1:
            return self.b.node("Flatten", [x], name, axis=1)
        target = [0] * start + [-1] + [int(d) for d in shape[end + 1:]]
        return self.b.node("Reshape", [x, self.b.constant(f"{name}.shape", np.array(target, np.int64))], name)

    # ---- functions ----------------------------------------------------------------------------
    def call_function(self, node: Node) -> str:
        fn = node.target
        try:
            bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError) as e:
            raise self.fail(node, f"function {getattr(fn, '__name__', fn)}: {e}") from e
        bound.apply_defaults()
        a = bound.arguments
        name = node.name
        b = self.b
        for arg in node.all_input_nodes:
            self.float_input(node, arg)
        binary = {F.add: "Add", F.sub: "Sub", F.mul: "Mul", F.div: "Div", F.matmul: "MatMul"}
        if fn in binary:
            return b.node(binary[fn], [self.value(a["a"], name), self.value(a["b"], name)], name)
        unary = {F.relu: "Relu", F.sigmoid: "Sigmoid", F.tanh: "Tanh", F.neg: "Neg", F.exp: "Exp", F.log: "Log",
                 F.sqrt: "Sqrt"}
        if fn in unary:
            return b.node(unary[fn], [self.value(a["x"], name)], name)
        if fn is F.relu6:
            return self.clip(name, self.value(a["x"], name), 0.0, 6.0)
        if fn is F.clamp:
            return self.clip(name, self.value(a["x"], name), a["min"], a["max"])
        if fn is F.leaky_relu:
            return b.node("LeakyRelu", [self.value(a["x"], name)], name, alpha=float(a["negative_slope"]))
        if fn in (F.softmax, F.log_softmax):
            op = "Softmax" if fn is F.softmax else "LogSoftmax"
            return b.node(op, [self.value(a["x"], name)], name, axis=int(a["dim"]))
        if fn is F.cat:
            return b.node("Concat", [self.value(t, name) for t in a["tensors"]], name, axis=int(a["dim"]))
        if fn is F.flatten:
            shape = self.shape(a["x"])
            return self.flatten(name, self.value(a["x"], name), len(shape), shape, a["start_dim"], a["end_dim"])
        if fn is F.reshape or fn is onnx_reshape:  # onnx_reshape: an imported Reshape (0 copies a dimension)
            target = np.array([int(d) for d in a["shape"]], np.int64)
            return b.node("Reshape", [self.value(a["x"], name), b.constant(f"{name}.shape", target)], name)
        if fn in (F.transpose, F.permute):
            rank = len(self.shape(a["x"]))
            if fn is F.permute:
                perm = [int(d) % rank for d in a["dims"]]
            else:
                perm = list(range(rank))
                i, j = int(a["dim0"]) % rank, int(a["dim1"]) % rank
                perm[i], perm[j] = perm[j], perm[i]
            return b.node("Transpose", [self.value(a["x"], name)], name, perm=perm)
        if fn is F.linear:
            weight = a["weight"]
            return self.linear(name, self.value(a["x"], name), self.shape(a["x"]), _data(weight), _data(a["bias"]),
                               self.names[weight] if isinstance(weight, Node) else None,
                               self.names[a["bias"]] if isinstance(a["bias"], Node) else None)
        if fn is F.conv2d:
            weight, bias = a["weight"], a["bias"]
            kernel = (self.shape(weight) if isinstance(weight, Node) else np.shape(_data(weight)))[2:]
            return self.conv(name, self.value(a["x"], name), self.value(weight, f"{name}.weight"),
                             None if bias is None else self.value(bias, f"{name}.bias"), kernel,
                             (a["stride"], a["padding"], a["dilation"], a["groups"]))
        if fn is F.max_pool2d:
            return self.max_pool(name, self.value(a["x"], name), a["kernel_size"], a["stride"], a["padding"],
                                 a["dilation"])
        if fn is F.avg_pool2d:
            return self.avg_pool(node, name, self.value(a["x"], name), a["kernel_size"], a["stride"], a["padding"],
                                 a["count_include_pad"])
        if fn is F.adaptive_avg_pool2d:
            return self.global_pool(node, name, self.value(a["x"], name), a["output_size"])
        raise self.fail(node, f"function {getattr(fn, '__name__', fn)}")

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
        narrow = not on_grid and (qparams.quant_min, qparams.quant_max) != (low, high)
        if narrow and container in (np.int16, np.uint16):
            if axis is not None:
                raise InteropError(f"ONNX export: quantizer {quantizer.name or name!r} is per channel with "
                                   f"{dtype}; a narrowed 16-bit range is exported per tensor only")
            lo = np.float32((qparams.quant_min - int(zero_point)) * scale)
            hi = np.float32((qparams.quant_max - int(zero_point)) * scale)
            x = self.clip(f"{name}/Clip", x, float(lo), float(hi))
        s = self.b.constant(f"{name}.scale", scale)
        z = self.b.constant(f"{name}.zero_point", zero_point)
        q = self.b.node("QuantizeLinear", [x, s, z], f"{name}/QuantizeLinear", axis=axis)
        if narrow and container in (np.int8, np.uint8):
            q = self.b.node("Clip", [q, self.b.constant(f"{name}.clip_min", np.array(qparams.quant_min, container)),
                                     self.b.constant(f"{name}.clip_max", np.array(qparams.quant_max, container))],
                            f"{name}/Clip")
        return self.b.node("DequantizeLinear", [q, s, z], f"{name}/DequantizeLinear", axis=axis)

    def fake_quantize(self, node: Node, module: FakeQuantize, name: str) -> str:
        return self.qdq(self.float_input(node, node.args[0]), module, name)

    def qat_layer(self, node: Node, layer, name: str) -> str:
        arg = node.args[0]
        x = self.float_input(node, arg)
        b = self.b
        is_linear = isinstance(layer, QATLinear)
        if not layer.enabled:
            bias = None if layer.bias is None else layer.bias.data
            if is_linear:
                y = self.linear(name, x, self.shape(arg), layer.weight.data, bias)
            else:
                y = self.conv(name, x, *self.constants(name, layer.weight.data, bias), layer.weight.shape[2:],
                              _geometry(layer))
                if isinstance(layer, QATConvBn2d):
                    y = self.batch_norm(layer.bn_name, y, layer.bn)
            return b.node("Relu", [y], f"{name}/Relu") if layer.relu else y
        weight = layer.weight.data
        bias = None if layer.bias is None else layer.bias.data
        dead = None
        if isinstance(layer, QATConvBn2d):
            weight, bias, dead = layer.folded_parameters()
        weight_quantizer = layer.weight_fake_quant
        if isinstance(weight_quantizer, FakeQuantize) and bool(weight_quantizer.fake_quant_enabled.data):
            qparams = weight_quantizer.calculate_qparams()
            weight = qparams.dequantize(qparams.quantize(weight))  # the grid values the layer computes with
            if dead is not None and np.any(dead):
                weight[dead] = 0
            w_name = self.qdq(b.constant(f"{name}.weight", weight), weight_quantizer, f"{name}.weight", on_grid=True)
        else:
            w_name = b.constant(f"{name}.weight", weight)
        if bias is not None:
            bias = np.asarray(layer._eval_bias(bias), dtype=np.float32)  # what the QAT eval path adds
        if is_linear:
            y = self.linear(name, x, self.shape(arg), weight, bias, weight_name=w_name)
        else:
            y = self.conv(name, x, w_name, None if bias is None else b.constant(f"{name}.bias", bias),
                          weight.shape[2:], _geometry(layer))
        if layer.relu:
            y = b.node("Relu", [y], f"{name}/Relu")
        if isinstance(layer.output_fake_quant, FakeQuantize):
            y = self.qdq(y, layer.output_fake_quant, f"{name}.output")
        return y

    # ---- int8 ---------------------------------------------------------------------------------
    def out_grid(self, module: _Int8Module) -> Grid:
        qmin, qmax = (int(v) for v in module.output_range.data)
        return Grid(float(module.output_scale.data), int(module.output_zero_point.data), qmin, qmax,
                    module.out_dtype)

    def int8_module(self, node: Node, module: _Int8Module, name: str, args: list[Node]) -> tuple[str, Grid | None]:
        b = self.b
        if isinstance(module, Quantize):
            grid = self.out_grid(module)
            return self.quantize(self.float_input(node, args[0]), grid, name), grid
        if isinstance(module, Dequantize):
            return self.dequantize(args[0], name), None
        if isinstance(module, (Int8MaxPool2d, Int8Flatten, Int8Cat)):
            grids = [self.grids.get(a) for a in args]
            if any(g is None for g in grids) or len({(g.scale, g.zero_point) for g in grids}) != 1:
                raise InteropError(f"ONNX export: int8 node {name!r} needs integer inputs on one grid")
            x = self.names[args[0]]
            if isinstance(module, Int8MaxPool2d):
                return self.max_pool(name, x, module.kernel_size, module.stride, module.padding,
                                     module.dilation), grids[0]
            if isinstance(module, Int8Flatten):
                shape = self.shape(args[0])
                return self.flatten(name, x, len(shape), shape, module.start_dim, module.end_dim), grids[0]
            return b.node("Concat", [self.names[a] for a in args], name, axis=int(module.dim)), grids[0]
        grid = self.out_grid(module)
        clamps_at_zero = isinstance(module, (QuantizedConv2d, QuantizedLinear, QuantizedAdd, Requantize)) and \
            int(module.clamp_min.data) == grid.zero_point
        # a Relu where the clamp starts at the zero point (a Requantize keeps it even where the
        # range starts there too: see quantize(separate=True))
        relu = clamps_at_zero and (grid.zero_point > grid.lo or isinstance(module, Requantize))
        if isinstance(module, (QuantizedConv2d, QuantizedLinear)):
            return self.weighted(node, module, name, args[0], grid, relu), grid
        if isinstance(module, Requantize):
            return self.quantize(self.dequantize(args[0], name), grid, name, relu, separate=True), grid
        if isinstance(module, QuantizedAdd):
            y = b.node("Add", [self.dequantize(args[0], f"{name}.a"), self.dequantize(args[1], f"{name}.b")],
                       f"{name}/Add")
            return self.quantize(y, grid, name, relu), grid
        if isinstance(module, Int8AvgPool2d):
            x = self.dequantize(args[0], name)
            y = (b.node("GlobalAveragePool", [x], f"{name}/GlobalAveragePool") if module.kernel_size is None
                 else self.avg_pool(node, f"{name}/AveragePool", x, module.kernel_size, module.stride, 0))
            return self.quantize(y, grid, name), grid
        raise self.fail(node, f"int8 module {type(module).__name__}")

    def weighted(self, node: Node, module, name: str, arg: Node, out: Grid, relu: bool) -> str:
        b = self.b
        x_grid = self.grids.get(arg)
        if x_grid is None or x_grid.zero_point != int(module.input_zero_point.data):
            raise InteropError(f"ONNX export: int8 layer {name!r} expects the integer input of its conversion")
        weight_q = module.weight_q.data
        s_w = weight_scales(module, x_grid.scale)
        channels = weight_q.shape[0]
        is_linear = isinstance(module, QuantizedLinear)
        w_q = b.constant(f"{name}.weight_quantized", weight_q)
        w_s = b.constant(f"{name}.weight_scale", s_w)
        w_z = b.constant(f"{name}.weight_zero_point", np.zeros(channels, np.int8))
        bias_q = b.constant(f"{name}.bias_quantized", module.bias_q.data.astype(np.int32))
        if self.form == "qoperator":
            return self.qlinear(node, module, name, arg, x_grid, out, relu, (w_q, w_s, w_z, bias_q))
        x = self.dequantize(arg, name)
        w = b.node("DequantizeLinear", [w_q, w_s, w_z], f"{name}.weight/DequantizeLinear", axis=0)
        bias_scale = (np.float64(x_grid.scale) * s_w.astype(np.float64)).astype(np.float32)
        bias = b.node("DequantizeLinear", [bias_q, b.constant(f"{name}.bias_scale", bias_scale),
                                           b.constant(f"{name}.bias_zero_point", np.zeros(channels, np.int32))],
                      f"{name}.bias/DequantizeLinear", axis=0)
        if is_linear:
            y = self.linear(f"{name}/Gemm", x, self.shape(arg), None, None, weight_name=w, bias_name=bias)
        else:
            y = self.conv(f"{name}/Conv", x, w, bias, weight_q.shape[2:], _geometry(module))
        return self.quantize(y, out, name, relu)

    def qlinear(self, node: Node, module, name: str, arg: Node, x_grid: Grid, out: Grid, relu: bool,
                weights: tuple[str, str, str, str]) -> str:
        """QLinearConv for convolutions; QLinearMatMul for linear layers without a bias, a 1x1
        QLinearConv (which takes the int32 bias) for those with one; the fused ReLU and narrow
        ranges as an integer Clip after it."""
        b = self.b
        w_q, w_s, w_z, bias_q = weights
        x_s, x_z = self.grid_constants(x_grid, f"{name}.input")
        y_s, y_z = self.grid_constants(out, f"{name}.output")
        x = self.names[arg]
        if isinstance(module, QuantizedLinear) and not np.any(module.bias_q.data):
            # no bias: QLinearMatMul on x @ W^T, per-column weight scales
            w_t = b.constant(f"{name}.weight_quantized_t", np.ascontiguousarray(module.weight_q.data.T))
            q = b.node("QLinearMatMul", [x, x_s, x_z, w_t, w_s, w_z, y_s, y_z], name)
        elif isinstance(module, QuantizedLinear):
            # QLinearMatMul has no bias input: a 1x1 QLinearConv on (N, K, 1, 1) takes the int32 bias
            shape = self.shape(arg)
            if len(shape) != 2:
                raise InteropError(f"ONNX export: int8 linear {name!r} with a bias takes a rank-{len(shape)} "
                                   f"input; the qoperator form handles matrices there (use format='qdq')")
            w4 = b.node("Unsqueeze", [w_q, b.constant(f"{name}.axes", np.array([2, 3], np.int64))],
                        f"{name}.weight/Unsqueeze")
            x4 = b.node("Unsqueeze", [x, b.constant(f"{name}.input_axes", np.array([2, 3], np.int64))],
                        f"{name}/Unsqueeze")
            y4 = b.node("QLinearConv", [x4, x_s, x_z, w4, w_s, w_z, y_s, y_z, bias_q], f"{name}/QLinearConv",
                        kernel_shape=[1, 1])
            q = b.node("Flatten", [y4], name, axis=1)
        else:
            q = b.node("QLinearConv", [x, x_s, x_z, w_q, w_s, w_z, y_s, y_z, bias_q], name,
                       kernel_shape=list(module.weight_q.data.shape[2:]), strides=_pair(module.stride),
                       pads=_pads(module.padding), dilations=_pair(module.dilation), group=int(module.groups))
        # no Relu before these operators: the fused ReLU is the clip's lower bound
        return self.clip_integers(q, replace(out, lo=out.zero_point) if relu else out, name)


def _geometry(layer) -> tuple:
    """(stride, padding, dilation, groups) of a conv layer (float, QAT or int8)."""
    return layer.stride, layer.padding, layer.dilation, layer.groups


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


def _data(value):
    if value is None or isinstance(value, Node):
        return None
    return value.data if isinstance(value, Tensor) else np.asarray(value)


def weight_scales(module, input_scale: float) -> np.ndarray:
    """The float32 weight scales s_w of an int8 layer, per output channel.

    The int8 layer keeps M = s_x * s_w / s_y as the fixed-point pair (M0, n), M = M0 * 2^-(31+n),
    which the converter computed in float64 from the float32 scales. M * s_y / s_x recovers s_w
    within 2^-30 relative, far inside half a float32 ulp (2^-24), so rounding it to float32
    gives back the converter's s_w exactly.
    """
    multiplier = module.multiplier.data.astype(np.float64)
    real = multiplier * np.exp2(-(31.0 + module.shift.data.astype(np.float64)))
    s_w = (real * np.float64(module.output_scale.data) / np.float64(input_scale)).astype(np.float32)
    channels = module.weight_q.data.shape[0]
    return np.broadcast_to(s_w, (channels,)).copy() if s_w.size == 1 else s_w


def build_onnx_model(gm: GraphModule, kind: str, form: str) -> onnx.ModelProto:
    """The ONNX model of ``gm`` (its nodes already carry shapes); see the module docstring."""
    return _Exporter(gm, kind, form).run(gm.class_name)
