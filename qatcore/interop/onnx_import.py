"""Import of a float ONNX model as a trainable qatcore GraphModule.

Each ONNX node becomes one graph node; layers with weights become qatcore layers
whose Parameters hold the file's initializers, so the result trains, and
:class:`~qatcore.quantization.QATPreparer` prepares it like any traced model:

====================  ==============================================================
ONNX                  qatcore
====================  ==============================================================
Conv (2-D)            ``nn.Conv2d`` (symmetric pads; groups, dilation, stride)
Gemm                  ``nn.Linear`` (B a constant; alpha folded into W, beta into the bias)
MatMul                ``nn.Linear`` without bias when B is a constant matrix (an Add of a
                      constant vector right after it becomes its bias), else ``F.matmul``
Add, Sub, Mul, Div    ``F.add`` ... (a constant operand is a literal or a buffer)
Relu                  ``nn.ReLU``
Clip                  ``nn.ReLU`` (min 0), ``nn.ReLU6`` (0, 6), else ``F.clamp``
BatchNormalization    ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` with the running statistics
MaxPool, AveragePool  ``nn.MaxPool2d``, ``nn.AvgPool2d`` (symmetric pads, no ceil_mode)
GlobalAveragePool     ``nn.AdaptiveAvgPool2d(1)``
Flatten               ``nn.Flatten()`` (axis 1)
Reshape               ``nn.Flatten(start_dim=k)`` for [0, .., 0, -1], ``F.reshape`` without
                      zeros, else ``onnx_reshape`` (a 0 copies the input's dimension)
Concat                ``F.cat``
Identity, Dropout     nothing (the input value, computed or constant)
Constant              a constant
====================  ==============================================================

A layer is named after its ONNX node when the name is a dotted Python path
(``conv1``, ``layer1.conv2``, as qatcore's exporter writes them), so a model
exported by qatcore comes back with its own state_dict keys; other names are made
into identifiers (never one that shadows a Module attribute). Nodes no output
depends on are skipped; the finished model runs once on zeros of the declared
input shapes, so parts that do not fit together fail here. Any other operator, or
an attribute these layers cannot express, raises
:class:`~qatcore.errors.InteropError` naming the operator and the node.
"""

from __future__ import annotations

import keyword
import os
import re
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from qatcore.autograd import no_grad
from qatcore.errors import InteropError, QATCoreError
from qatcore.graph import Graph, GraphModule
from qatcore.graph.graph_module import Submodules
from qatcore.graph.node import Node
from qatcore.nn.linear import Linear
from qatcore.nn.module import Module
from qatcore.quantization.qat.operators import onnx_import_handler, onnx_import_ops
from qatcore.quantization.qat.operators.shape import onnx_reshape

__all__ = ["import_model", "onnx_reshape", "supported_ops"]

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")
# names a layer must not take: registering it would shadow a method or attribute ("forward", "graph")
_RESERVED = frozenset(dir(GraphModule)) | frozenset(vars(Module())) | {"graph", "class_name"}


class _Importer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = Graph()
        self.root = Module()
        # ONNX tensor name -> a graph Node (computed at run time) or a numpy array (a constant)
        self.env: dict[str, Node | np.ndarray] = {}
        self.ranks: dict[str, int] = {}
        self.uses: dict[str, int] = {}
        self.linear_of: dict[Node, Linear] = {}  # MatMul-made Linear layers, for a bias Add after them
        self.constants = 0

    # ---- names and errors ---------------------------------------------------------------------
    def fail(self, node: onnx.NodeProto, why: str) -> InteropError:
        return InteropError(f"import_onnx: operator {node.op_type!r} at node {node.name or '<unnamed>'!r}: {why}")

    def module_name(self, node: onnx.NodeProto) -> str:
        """The node's own name when it is a free dotted Python path, else an identifier made of it."""
        name = node.name
        if _DOTTED.match(name or "") and self._free(name):
            return name
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

    def add_layer(self, node: onnx.NodeProto, layer: Module, args: tuple) -> Node:
        path = self.module_name(node)
        *parents, leaf = path.split(".")
        holder = self.root
        for part in parents:
            if holder.get_child(part) is None:
                holder.add_module(part, Submodules())
            holder = holder.get_child(part)
        holder.add_module(leaf, layer)
        return self.graph.create_node("call_module", path, args, name=path.replace(".", "_"))

    def call(self, node: onnx.NodeProto, fn: Callable, args: tuple, kwargs: dict | None = None) -> Node:
        base = re.sub(r"\W+", "_", node.name or "").strip("_") or fn.__name__
        return self.graph.create_node("call_function", fn, args, kwargs or {}, name=base)

    # ---- attributes -----------------------------------------------------------------------------
    def attributes(self, node: onnx.NodeProto, known: set[str]) -> dict[str, Any]:
        """The node's attributes by name; any attribute not in ``known`` is refused."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        unknown = set(attrs) - known
        if unknown:
            raise self.fail(node, f"attribute(s) {sorted(unknown)} are not supported")
        return attrs

    def window(self, node: onnx.NodeProto, attrs: dict, kernel: list[int]) -> dict:
        """stride, padding, dilation of a 2-D window op; symmetric pads only, no auto_pad/ceil_mode."""
        if len(kernel) != 2:
            raise self.fail(node, f"only 2-D windows are supported, got kernel_shape {kernel}")
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        elif auto_pad != "NOTSET":
            raise self.fail(node, f"auto_pad={auto_pad!r} is not supported (export with explicit pads)")
        if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
            raise self.fail(node, f"pads {pads} are not symmetric (begin == end per axis)")
        if int(attrs.get("ceil_mode", 0)):
            raise self.fail(node, "ceil_mode=1 is not supported")
        strides, dilations = list(attrs.get("strides", [1, 1])), list(attrs.get("dilations", [1, 1]))
        if len(strides) != 2 or len(dilations) != 2 or min(strides + dilations) < 1 or min(pads) < 0:
            raise self.fail(node, f"strides {strides} and dilations {dilations} must be two positive values, "
                                  f"pads {pads} non-negative")
        return {"stride": tuple(strides), "padding": (pads[0], pads[1]), "dilation": tuple(dilations)}

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

    def constant(self, node: onnx.NodeProto, index: int, optional: bool = False) -> np.ndarray | None:
        name = node.input[index] if index < len(node.input) else ""
        if name == "":
            if optional:
                return None
            raise self.fail(node, f"input {index} is missing")
        value = self.env.get(name)
        if not isinstance(value, np.ndarray):
            raise self.fail(node, f"input {index} ({name!r}) must be a constant (an initializer)")
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
        return value.astype(np.float32)

    def operand(self, node: onnx.NodeProto, index: int):
        """A computed value (Node), a Python float (one-element constant), or a buffer read."""
        value = self.env.get(node.input[index]) if index < len(node.input) else None
        if isinstance(value, Node):
            return value
        if value is None:
            raise self.fail(node, f"input {index} is missing")
        if value.dtype.kind != "f":
            raise self.fail(node, f"constant input {index} must be float, got {value.dtype}")
        if value.ndim == 0:
            return float(value)
        name = "constant"
        while not self._free(name):
            self.constants += 1
            name = f"constant_{self.constants}"
        self.root.register_buffer(name, value.astype(np.float32))
        return self.graph.create_node("get_attr", name, (), {}, name=name)

    # ---- the walk -----------------------------------------------------------------------------
    def run(self) -> GraphModule:
        graph = self.model.graph
        for tensor in graph.initializer:
            self.env[tensor.name] = _array(tensor, "initializer")
        self._infer_shapes()
        for name in [*(i for node in graph.node for i in node.input), *(o.name for o in graph.output)]:
            self.uses[name] = self.uses.get(name, 0) + 1
        input_names: set[str] = set()
        for value_info in graph.input:
            if value_info.name in self.env:
                continue  # an initializer listed as an input (older exporters)
            base = name = _identifier(value_info.name)
            while name in input_names:
                name = f"{base}_{len(input_names)}"
            input_names.add(name)
            self.env[value_info.name] = self.graph.input(name)
        for node in _needed_nodes(graph):
            if node.domain not in ("", "ai.onnx"):
                raise InteropError(f"import_onnx: operator {node.domain}.{node.op_type} at node {node.name!r} is "
                                   f"not supported (custom domain); supported: {', '.join(supported_ops())}")
            handler = onnx_import_handler(node.op_type)
            if handler is None:
                raise InteropError(f"import_onnx: operator {node.op_type!r} at node {node.name or '<unnamed>'!r} "
                                   f"is not supported; supported: {', '.join(supported_ops())}")
            try:
                result = handler(self, node)
            except InteropError:
                raise
            except QATCoreError as e:  # a layer refused the settings (ConfigError, ShapeError, ...)
                raise self.fail(node, str(e)) from e
            outputs = [o for o in node.output if o]
            if len(outputs) != 1:
                raise self.fail(node, f"{len(outputs)} outputs; only the first (the value) is supported")
            self.env[outputs[0]] = result
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
        self._smoke_run(gm)
        return gm.train()

    def _smoke_run(self, gm: GraphModule) -> None:
        """Run the imported model once, in eval mode, on zeros of the declared input shapes
        (batch 1 where the batch axis is symbolic), so that a file whose parts do not fit
        together fails here, naming the problem, rather than at the first real call. Skipped
        when an input has an unknown dimension past the batch axis."""
        inputs = []
        for value_info in self.model.graph.input:
            if value_info.name not in self.env or not isinstance(self.env[value_info.name], Node):
                continue
            tensor_type = value_info.type.tensor_type
            if tensor_type.elem_type != onnx.TensorProto.FLOAT or not tensor_type.HasField("shape"):
                return
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
            if any(d is None or d <= 0 for d in dims[1:]):
                return
            shape = ([dims[0] if dims[0] else 1] if dims else []) + dims[1:]
            inputs.append(np.zeros(shape, np.float32))
        gm.eval()
        try:
            with no_grad(), np.errstate(all="ignore"):
                gm(*inputs)
        except Exception as e:  # anything at all: the file's parts do not fit together
            shapes = ", ".join(str(x.shape) for x in inputs)
            raise InteropError(f"import_onnx: the imported model does not run on zeros of shape {shapes}: "
                               f"{type(e).__name__}: {e}") from e

    def _infer_shapes(self) -> None:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # shape inference is a convenience here: ranks are checked where used
            return
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            tensor_type = info.type.tensor_type
            if tensor_type.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
                self.ranks[info.name] = len(dims)


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
    return _Importer(model).run()
