"""Import of a float ONNX model as a trainable qatcore GraphModule.

Each ONNX node becomes one graph node (or a few); layers with weights become qatcore layers
whose Parameters hold the file's initializers, so the result trains, and
:class:`~qatcore.quantization.QATPreparer` prepares it like any traced model:

====================  ==============================================================
ONNX                  qatcore
====================  ==============================================================
Conv (2-D)            ``nn.Conv2d`` (groups, dilation, stride; uneven pads and auto_pad
                      SAME as ``F.pad`` of zeros first)
Gemm                  ``nn.Linear`` (B a constant; alpha folded into W, beta into the bias)
MatMul                ``nn.Linear`` without bias when B is a constant matrix (an Add of a
                      constant vector right after it becomes its bias), else ``F.matmul``
Add, Sub, Mul, Div    ``F.add`` ... (a constant operand is a literal or a buffer)
Relu                  ``nn.ReLU``
Clip                  ``nn.ReLU`` (min 0), ``nn.ReLU6`` (0, 6), else ``F.clamp``
BatchNormalization    ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` with the running statistics
MaxPool, AveragePool  ``nn.MaxPool2d``, ``nn.AvgPool2d``; uneven pads, auto_pad SAME and
                      ceil_mode through ``F.pad`` (an average rescaled to its counted cells)
GlobalAveragePool     ``nn.AdaptiveAvgPool2d(1)``
Flatten               ``nn.Flatten()`` (axis 1)
Reshape               ``nn.Flatten(start_dim=k)`` for [0, .., 0, -1], ``F.reshape`` without
                      zeros or with allowzero=1, else ``onnx_reshape`` (a 0 copies the
                      input's dimension); one batch-sized entry becomes -1
Concat                ``F.cat`` (constant inputs as buffers)
LayerNormalization    ``nn.LayerNorm``
Softmax               ``F.softmax``
Gelu, Erf             ``nn.GELU`` (approximate none or tanh), ``F.erf``
Gather                an ``nn.Embedding`` for rows of a float initializer (named after it),
                      else ``F.take`` (constant indices)
Transpose             ``F.permute``
Split, Slice          ``F.slice_axis`` (one per output / per sliced axis)
Unsqueeze, Squeeze    ``F.unsqueeze``, ``F.squeeze``
Expand, Where         ``F.expand``, ``F.where`` (a constant condition)
Pow, Sqrt, ReduceMean ``F.pow`` (a constant exponent), ``F.sqrt``, ``F.mean``
Shape                 a constant (the batch-sized entries known only at run time)
Identity, Dropout     nothing (the input value, computed or constant)
Constant              a constant
====================  ==============================================================

A node whose inputs are all constants, of any operator, is computed at import
(:mod:`~qatcore.interop.onnx_constant_folding`): exporters leave masks and shape arithmetic
in the file. A layer is named after its ONNX node when the name is a dotted Python path
(``conv1``, ``layer1.conv2``, as qatcore's exporter writes them), else after its weight when
that is named ``<path>.weight`` (PyTorch's ``blocks.0.ln_1.weight``), else after the scope
in a PyTorch node name (``/features/features.0/Conv``); other names are made into
identifiers (never one that shadows a Module attribute). Nodes no output depends on are
skipped. Each graph node runs as it is made, on zeros of the declared input shapes at batch
sizes 1 and 2 (where the batch axis is symbolic): that gives the shapes Shape, SAME pads and
ceil_mode need and tells which dimensions follow the batch, and a file whose parts do not
fit together fails there, naming the node. Any other operator, or an attribute these layers
cannot express, raises :class:`~qatcore.errors.InteropError` naming the operator and the node.
"""

from __future__ import annotations

import keyword
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from qatcore.autograd import no_grad
from qatcore.errors import InteropError, QATCoreError
from qatcore.graph import Graph, GraphModule
from qatcore.graph.graph import resolve_attribute
from qatcore.graph.graph_module import Submodules
from qatcore.graph.node import Node
from qatcore.interop.onnx_constant_folding import FoldError, fold, known
from qatcore.nn.linear import Linear
from qatcore.nn.module import Module
from qatcore.quantization.qat.operators import onnx_import_handler, onnx_import_ops, onnx_import_reads_tables
from qatcore.quantization.qat.operators.shape import onnx_reshape
from qatcore.tensor import Tensor

__all__ = ["import_model", "onnx_reshape", "supported_ops", "Window"]

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")
# names a layer must not take: registering it would shadow a method or attribute ("forward", "graph")
_RESERVED = frozenset(dir(GraphModule)) | frozenset(vars(Module())) | {"graph", "class_name"}
# the element types an input may have for the probe runs (zeros of that type)
_PROBE_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
                 onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}
# the batch sizes of the two probe runs (an input's symbolic first axis)
_PROBE_BATCHES = (1, 2)


@dataclass(frozen=True)
class Window:
    """A 2-D window op's geometry with ONNX's padding rules resolved: ``begin`` / ``end`` are
    the (height, width) pads before and after the input (``auto_pad`` SAME computed from the
    input's size), ``overhang`` the rows and columns a ``ceil_mode`` window reaches past the
    end padding (never counted by an average)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    begin: tuple[int, int]
    end: tuple[int, int]
    overhang: tuple[int, int] = (0, 0)

    @property
    def symmetric(self) -> bool:
        """Whether a layer's own ``padding`` expresses the pads (equal at both ends, no overhang)."""
        return self.begin == self.end and self.overhang == (0, 0)

    def layer_arguments(self, padded: bool) -> dict:
        """stride, padding, dilation of the layer; ``padded``: its input is padded already."""
        return {"stride": self.stride, "padding": (0, 0) if padded else self.begin, "dilation": self.dilation}

    @property
    def pad(self) -> tuple[int, int, int, int]:
        """Every pad as ``F.pad`` takes them: (left, right, top, bottom), overhang included."""
        return (self.begin[1], self.end[1] + self.overhang[1], self.begin[0], self.end[0] + self.overhang[0])


class _Importer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opsets = {o.domain or "": o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
        self.opset = self.opsets.get("", 1)
        self.graph = Graph()
        self.root = Module()
        # ONNX tensor name -> a graph Node (computed at run time) or a numpy array (a constant;
        # a masked array where entries depend on the batch, onnx_constant_folding)
        self.env: dict[str, Node | np.ndarray] = {}
        self.initializers: set[str] = set()
        self.ranks: dict[str, int] = {}
        self.inferred: dict[str, tuple] = {}  # ONNX shape inference: dims, None where unknown
        self.uses: dict[str, int] = {}
        self.linear_of: dict[Node, Linear] = {}  # MatMul-made Linear layers, for a bias Add after them
        self.tables: dict[str, str] = {}  # initializer -> the Embedding holding it (transformer.import_table)
        self.constants = 0
        # the probe runs: each graph node's value on zeros at two batch sizes, computed as the
        # node is made (its shape, and which dimensions follow the batch); None when the inputs'
        # shapes are not all known past the batch axis
        self.probe_inputs: list[list[np.ndarray]] | None = None
        self.probes: dict[Node, list] = {}
        self.current: onnx.NodeProto | None = None

    # ---- names and errors ---------------------------------------------------------------------
    def fail(self, node: onnx.NodeProto, why: str) -> InteropError:
        return InteropError(f"import_onnx: operator {node.op_type!r} at node {node.name or '<unnamed>'!r}: {why}")

    def module_name(self, node: onnx.NodeProto, tensor: str | None = None) -> str:
        """The node's own name when it is a free dotted Python path, else the module path of
        ``tensor`` when it is one of the layer's initializers named ``<path>.weight`` (as
        PyTorch names them), else the scope path in the node's name, else an identifier made
        of the name."""
        name = node.name
        if _DOTTED.match(name or "") and self._free(name):
            return name
        if tensor and tensor.endswith(".weight") and _DOTTED.match(tensor) and self._free(tensor[:-7]):
            return tensor[:-7]  # "blocks.0.ln_1.weight" -> "blocks.0.ln_1"
        scoped = _scope_path(name or "")
        if scoped and self._free(scoped):  # PyTorch's "/features/features.0/Conv" -> "features.0"
            return scoped
        base = re.sub(r"\W+", "_", name or "").strip("_") or node.op_type.lower()
        if base[0].isdigit() or keyword.iskeyword(base):
            base = f"{node.op_type.lower()}_{base}"
        candidate, i = base, 1
        while not self._free(candidate):
            candidate, i = f"{base}_{i}", i + 1
        return candidate

    def _free(self, path: str) -> bool:
        """Whether a layer can be registered at dotted ``path`` (no layer at it or above it,
        and not a prefix of an existing layer path)."""
        parts = path.split(".")
        if any(keyword.iskeyword(p) or p in _RESERVED or p.startswith("_") for p in parts):
            return False
        current = self.root
        for i, part in enumerate(parts):
            child = current.get_child(part)
            if child is None:
                return current.get_state(part) is None
            if i == len(parts) - 1 or not isinstance(child, Submodules):
                return False
            current = child
        return False

    def register_layer(self, node: onnx.NodeProto, layer: Module, tensor: str | None = None) -> str:
        """Register ``layer`` under the node's module name (``module_name``); its path."""
        path = self.module_name(node, tensor)
        *parents, leaf = path.split(".")
        holder = self.root
        for part in parents:
            if holder.get_child(part) is None:
                holder.add_module(part, Submodules())
            holder = holder.get_child(part)
        holder.add_module(leaf, layer)
        return path

    def add_layer(self, node: onnx.NodeProto, layer: Module, args: tuple, tensor: str | None = None) -> Node:
        """A call of ``layer``, registered as ``register_layer`` does."""
        path = self.register_layer(node, layer, tensor)
        return self.create("call_module", path, args, name=path.replace(".", "_"))

    def call(self, node: onnx.NodeProto, fn: Callable, args: tuple, kwargs: dict | None = None,
             suffix: str = "") -> Node:
        """A call of ``fn``, named after the node (and ``suffix``, for a second call of one node)."""
        base = re.sub(r"\W+", "_", node.name or "").strip("_") or fn.__name__
        return self.create("call_function", fn, args, kwargs or {}, name=f"{base}_{suffix}" if suffix else base)

    def read(self, path: str) -> Node:
        """A ``get_attr`` of the Parameter or buffer at dotted ``path``."""
        return self.create("get_attr", path, (), {}, name=path.replace(".", "_"))

    def buffer(self, value: np.ndarray) -> Node:
        """A read of ``value`` kept as a new float32 buffer of the root (``constant``, ``constant_1``, ...)."""
        name = "constant"
        while not self._free(name):
            self.constants += 1
            name = f"constant_{self.constants}"
        self.root.register_buffer(name, np.asarray(value, np.float32))
        return self.read(name)

    def create(self, op: str, target: Any, args: tuple, kwargs: dict | None = None, name: str | None = None) -> Node:
        """Every graph node is made here, and computed at once on the probe inputs."""
        created = self.graph.create_node(op, target, args, kwargs or {}, name=name)
        self._probe(created)
        return created

    # ---- attributes -----------------------------------------------------------------------------
    def attributes(self, node: onnx.NodeProto, known_names: set[str]) -> dict[str, Any]:
        """The node's attributes by name; any attribute not in ``known_names`` is refused."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        unknown = set(attrs) - known_names
        if unknown:
            raise self.fail(node, f"attribute(s) {sorted(unknown)} are not supported")
        return attrs

    def window(self, node: onnx.NodeProto, attrs: dict, kernel: list[int], ceil_mode: bool = False) -> Window:
        """The geometry of a 2-D window op (:class:`Window`): ``pads`` or ``auto_pad`` (VALID,
        SAME_UPPER, SAME_LOWER: the pads that make the output ceil(input / stride), the odd one
        at the end or at the beginning), and the overhang of ``ceil_mode`` windows. SAME and
        ceil_mode need the input's height and width."""
        if len(kernel) != 2:
            raise self.fail(node, f"only 2-D windows are supported, got kernel_shape {kernel}")
        strides, dilations = list(attrs.get("strides", [1, 1])), list(attrs.get("dilations", [1, 1]))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(strides) != 2 or len(dilations) != 2 or min(strides + dilations) < 1 or len(pads) != 4 \
                or min(pads) < 0 or min(kernel) < 1:
            raise self.fail(node, f"strides {strides} and dilations {dilations} must be two positive values, "
                                  f"pads {pads} four non-negative ones, kernel_shape {kernel} positive")
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise self.fail(node, f"auto_pad={auto_pad!r} is not an ONNX padding mode")
        reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        begin, end, overhang = pads[:2], pads[2:], [0, 0]
        if auto_pad == "VALID":
            begin, end = [0, 0], [0, 0]
        ceil_mode = ceil_mode and auto_pad in ("NOTSET", "VALID")
        if auto_pad.startswith("SAME") or ceil_mode:
            size = self.static_shape(node.input[0])
            if size is None or len(size) != 4 or size[2] is None or size[3] is None:
                raise self.fail(node, f"{'ceil_mode=1' if ceil_mode else f'auto_pad={auto_pad}'} needs the input's "
                                      f"height and width, which the file does not fix")
            for axis, (n, s, r) in enumerate(zip(size[2:], strides, reach)):
                if auto_pad.startswith("SAME"):
                    total = max((math.ceil(n / s) - 1) * s + r - n, 0)
                    small, large = total // 2, total - total // 2
                    begin[axis], end[axis] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
                else:  # the ceil-mode output size, PyTorch's and ONNX Runtime's rule for the last window
                    span = n + begin[axis] + end[axis] - r
                    if span < 0:
                        continue  # the window does not fit: the layer says so
                    count = -(-span // s) + 1
                    if (count - 1) * s >= n + begin[axis]:
                        count -= 1  # a last window starting in the end padding is dropped
                    overhang[axis] = max((count - 1) * s + r - (n + begin[axis] + end[axis]), 0)
        return Window(tuple(kernel), tuple(strides), tuple(dilations), tuple(begin), tuple(end), tuple(overhang))

    @staticmethod
    def tensor_array(tensor: onnx.TensorProto, what: str) -> np.ndarray:
        return _array(tensor, what)

    # ---- values -------------------------------------------------------------------------------
    def runtime(self, node: onnx.NodeProto, index: int = 0) -> Node:
        name = node.input[index] if index < len(node.input) else ""
        value = self.env.get(name)
        if not isinstance(value, Node):
            what = "missing" if name == "" or name not in self.env else "a constant"
            raise self.fail(node, f"input {index} ({name!r}) is {what}; it must be a computed value")
        return value

    def constant(self, node: onnx.NodeProto, index: int, optional: bool = False,
                 partly_known: bool = False) -> np.ndarray | None:
        """Input ``index`` as a constant array; ``partly_known``: it may be a masked array
        whose masked entries depend on the batch (a Reshape target)."""
        name = node.input[index] if index < len(node.input) else ""
        if name == "":
            if optional:
                return None
            raise self.fail(node, f"input {index} is missing")
        value = self.env.get(name)
        if not isinstance(value, np.ndarray):
            raise self.fail(node, f"input {index} ({name!r}) must be a constant (an initializer)")
        if not partly_known and not known(value):
            raise self.fail(node, f"input {index} ({name!r}) depends on a dimension known only at run time "
                                  f"(the batch): {value.tolist()}; export with a fixed batch size")
        return value

    def weight(self, node: onnx.NodeProto, index: int, rank: int | None = None,
               optional: bool = False) -> np.ndarray | None:
        value = self.constant(node, index, optional)
        if value is None:
            return None
        if value.dtype.kind != "f" or not np.all(np.isfinite(value)):
            raise self.fail(node, f"input {index} must hold finite floats, got {value.dtype}")
        if rank is not None and value.ndim != rank:
            raise self.fail(node, f"input {index} must have rank {rank}, got shape {value.shape}")
        return value.astype(np.float32)  # always a copy: layers never share a file's array

    def integers(self, node: onnx.NodeProto, index: int, optional: bool = False) -> list[int] | None:
        """A constant 1-D (or scalar) integer input as a list (axes, starts, split sizes)."""
        value = self.constant(node, index, optional)
        if value is None:
            return None
        if value.dtype.kind not in "iu" or value.ndim > 1:
            raise self.fail(node, f"input {index} must be a 1-D integer constant, got {value.dtype} {value.shape}")
        return [int(v) for v in value.reshape(-1)]

    def operand(self, node: onnx.NodeProto, index: int):
        """A computed value (Node), a Python float (one-element constant), or a buffer read."""
        value = self.env.get(node.input[index]) if index < len(node.input) else None
        if isinstance(value, Node):
            return value
        if value is None:
            raise self.fail(node, f"input {index} is missing")
        if value.dtype.kind != "f" or not known(value):
            raise self.fail(node, f"constant input {index} must be float, got {value.dtype}")
        if value.ndim == 0:
            return float(value)
        return self.buffer(value)

    def static_shape(self, name: str) -> tuple | None:
        """The shape of tensor ``name`` with None for a dimension that follows the batch (or
        that nothing fixes); None when its rank is unknown. Computed values take it from the
        probe runs when there are some, otherwise from ONNX shape inference."""
        value = self.env.get(name)
        if isinstance(value, np.ndarray):
            return value.shape
        if isinstance(value, Node) and value in self.probes:
            shapes = [np.shape(v.data if hasattr(v, "data") else v) for v in self.probes[value]]
            if len({len(s) for s in shapes}) == 1:
                return tuple(d if all(s[i] == d for s in shapes) else None for i, d in enumerate(shapes[0]))
        return self.inferred.get(name)

    def fold(self, node: onnx.NodeProto) -> tuple:
        """The node's outputs computed now from its constant inputs (onnx_constant_folding)."""
        values = [self.env[name] if name else None for name in node.input]
        try:
            return tuple(fold(node, values, self.opsets))
        except FoldError as e:
            raise self.fail(node, str(e)) from e

    # ---- the walk -----------------------------------------------------------------------------
    def run(self) -> GraphModule:
        graph = self.model.graph
        for tensor in graph.initializer:
            self.env[tensor.name] = _array(tensor, "initializer")
            self.initializers.add(tensor.name)
        self._infer_shapes()
        for name in [*(i for node in graph.node for i in node.input), *(o.name for o in graph.output)]:
            self.uses[name] = self.uses.get(name, 0) + 1
        self.probe_inputs = _probe_inputs([v for v in graph.input if v.name not in self.env])
        input_names: set[str] = set()
        for value_info in graph.input:
            if value_info.name in self.env:
                continue  # an initializer listed as an input (older exporters)
            base = name = _identifier(value_info.name)
            while name in input_names:
                name = f"{base}_{len(input_names)}"
            input_names.add(name)
            self.env[value_info.name] = self.create("input", name, ())
        for node in _needed_nodes(graph):
            self.current = node
            self._import_node(node)
        results = []
        for value_info in graph.output:
            value = self.env.get(value_info.name)
            if not isinstance(value, Node):
                raise InteropError(f"import_onnx: graph output {value_info.name!r} is not computed from the inputs")
            results.append(value)
        if not results:
            raise InteropError("import_onnx: the graph has no outputs")
        self.graph.output(results[0] if len(results) == 1 else tuple(results))
        self.graph.lint()
        gm = GraphModule(self.root, self.graph, class_name=_identifier(graph.name or "OnnxModel"))
        gm.lint()
        return gm.train()

    def _import_node(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            raise InteropError(f"import_onnx: operator {node.domain}.{node.op_type} at node {node.name!r} is "
                               f"not supported (custom domain); supported: {', '.join(supported_ops())}")
        present = [name for name in node.input if name]
        for name in present:
            if name not in self.env:
                raise self.fail(node, f"input {name!r} is not defined before the node")
        handler = onnx_import_handler(node.op_type)
        if present and all(isinstance(self.env[name], np.ndarray) for name in present) \
                and not self._reads_a_table(node):
            result = self.fold(node)  # constants in, constants out: computed now, whatever the operator
        elif handler is None:
            raise InteropError(f"import_onnx: operator {node.op_type!r} at node {node.name or '<unnamed>'!r} "
                               f"is not supported; supported: {', '.join(supported_ops())}")
        else:
            try:
                result = handler(self, node)
            except InteropError:
                raise
            except QATCoreError as e:  # a layer refused the settings (ConfigError, ShapeError, ...)
                raise self.fail(node, str(e)) from e
            except Exception as e:  # values no check foresaw (a mutated file): still the node's fault
                raise self.fail(node, f"{type(e).__name__}: {e}") from e
        results = result if isinstance(result, tuple) else (result,)
        named = [(name, value) for name, value in zip(node.output, results) if name]
        unused = [name for name in node.output[len(results):] if name and self.uses.get(name)]
        if unused or not named:
            raise self.fail(node, f"{len([o for o in node.output if o])} outputs; only the first "
                                  f"{len(results)} (the value{'s' if len(results) > 1 else ''}) can be imported")
        for name, value in named:
            self.env[name] = value
            shape = self.static_shape(name) if isinstance(value, Node) else None
            if shape is not None:
                self.ranks[name] = len(shape)

    def _reads_a_table(self, node: onnx.NodeProto) -> bool:
        """A Gather or Slice (``reads_tables`` in the registry) of a float initializer: its
        handler keeps the table a trainable Parameter instead of the node being folded."""
        first = node.input[0] if node.input else ""
        return (onnx_import_reads_tables(node.op_type) and first in self.initializers
                and self.env[first].dtype.kind == "f")

    # ---- the probe runs -------------------------------------------------------------------------
    def _probe(self, created: Node) -> None:
        """Compute ``created`` on both probe inputs (see ``__init__``); a failure means the
        file's parts do not fit together, and is reported naming the ONNX node."""
        if self.probe_inputs is None:
            return
        position = sum(1 for n in self.probes if n.op == "input") if created.op == "input" else None
        values = []
        for k, inputs in enumerate(self.probe_inputs):
            def value(arg, k=k):
                if isinstance(arg, Node):
                    return self.probes[arg][k]
                if isinstance(arg, (tuple, list)):
                    return type(arg)(value(a) for a in arg)
                if isinstance(arg, dict):
                    return {key: value(a) for key, a in arg.items()}
                return arg
            try:
                with no_grad(), np.errstate(all="ignore"):
                    if created.op == "input":
                        values.append(Tensor(inputs[position]))
                    elif created.op == "get_attr":
                        values.append(resolve_attribute(self.root, created.target, created))
                    elif created.op == "call_module":
                        module = self.root.get_submodule(created.target).eval()
                        values.append(module(*value(created.args), **value(created.kwargs)))
                    else:
                        values.append(created.target(*value(created.args), **value(created.kwargs)))
            except Exception as e:  # anything at all: the file's parts do not fit together
                shapes = ", ".join(str(x.shape) for x in inputs)
                where = f" at node {self.current.name!r} ({self.current.op_type})" if self.current else ""
                raise InteropError(f"import_onnx: the imported model does not run on zeros of shape {shapes}"
                                   f"{where}: {type(e).__name__}: {e}") from e
        self.probes[created] = values

    def _infer_shapes(self) -> None:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, data_prop=True)
        except Exception:  # shape inference is a convenience here: ranks are checked where used
            return
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            tensor_type = info.type.tensor_type
            if tensor_type.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
                self.inferred[info.name] = dims
                self.ranks[info.name] = len(dims)


def _probe_inputs(inputs: list[onnx.ValueInfoProto]) -> list[list[np.ndarray]] | None:
    """Zeros of each input's declared shape and type at the two probe batch sizes (where the
    first axis is symbolic), or None when some dimension past it, a shape or a type is not known."""
    probes: list[list[np.ndarray]] = [[] for _ in _PROBE_BATCHES]
    for value_info in inputs:
        tensor_type = value_info.type.tensor_type
        dtype = _PROBE_DTYPES.get(tensor_type.elem_type)
        if dtype is None or not tensor_type.HasField("shape"):
            return None
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        if any(d is None for d in dims[1:]):
            return None
        for probe, batch in zip(probes, _PROBE_BATCHES):
            probe.append(np.zeros(([dims[0] or batch] if dims else []) + dims[1:], dtype))
    return probes


def _needed_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes some graph output depends on, in file order (valid ONNX may hold dead nodes)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]


def _array(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor).copy()
    except Exception as e:
        raise InteropError(f"import_onnx: {what} {tensor.name!r} cannot be read: {e}") from e


def _scope_path(name: str) -> str | None:
    """The module path in a scoped node name as PyTorch writes them, "/<scope>/.../<OpType>":
    a segment that extends the path so far ("layer1" then "layer1.0") replaces it, another one
    is appended ("conv1"): "/layer1/layer1.0/conv1/Conv" -> "layer1.0.conv1". None otherwise.
    """
    segments = name.split("/")
    if len(segments) < 3 or segments[0] != "":
        return None
    path = ""
    for segment in segments[1:-1]:
        path = segment if not path or segment.startswith(path + ".") else f"{path}.{segment}"
    return path if _DOTTED.match(path) else None


def _identifier(name: str) -> str:
    base = re.sub(r"\W+", "_", name).strip("_") or "input"
    return f"v_{base}" if base[0].isdigit() or keyword.iskeyword(base) else base


def supported_ops() -> tuple[str, ...]:
    """The ONNX operator types import understands (each registered by its operator family)."""
    return onnx_import_ops()


def import_model(path) -> GraphModule:
    """The float ONNX model at ``path`` as a GraphModule in training mode (module docstring)."""
    path = os.fspath(path)
    try:
        model = onnx.load(path)
    except FileNotFoundError as e:
        raise InteropError(f"import_onnx: no such file {path!r}") from e
    except Exception as e:  # protobuf DecodeError, external-data errors, ...
        raise InteropError(f"import_onnx: {path!r} is not a readable ONNX model: {type(e).__name__}: {e}") from e
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise InteropError(f"import_onnx: {path!r} is not a valid ONNX model: {e}") from e
    _check_names(model, path)
    return _Importer(model).run()


def _check_names(model: onnx.ModelProto, path: str) -> None:
    """Every name is text: protobuf hands a string field that is not valid UTF-8 (a damaged
    file the checker let through) back as bytes."""
    graph = model.graph
    names = [*(n for node in graph.node for n in (node.name, node.op_type, node.domain, *node.input, *node.output)),
             *(t.name for t in graph.initializer), *(v.name for v in (*graph.input, *graph.output))]
    damaged = [n for n in names if not isinstance(n, str)]
    if damaged:
        raise InteropError(f"import_onnx: {path!r} is not a valid ONNX model: the name {damaged[0]!r} is not "
                           f"valid UTF-8 text")
