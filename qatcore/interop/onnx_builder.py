"""``OnnxBuilder``: collects the nodes and initializers of one ONNX graph.

The exporter (:mod:`qatcore.interop.onnx_export`) describes a model in terms of
tensors named by strings; this class keeps those names unique, turns numpy arrays
into initializers, and assembles the ``ModelProto`` at the end. It knows nothing
about qatcore models.

>>> import numpy as np
>>> from qatcore.interop.onnx_builder import OnnxBuilder
>>> b = OnnxBuilder()
>>> y = b.node("Relu", ["x"], name="relu")
>>> model = b.model([("x", np.float32, ("batch", 4))], [(y, np.float32, ("batch", 4))], "tiny")
>>> [n.op_type for n in model.graph.node]
['Relu']
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["OnnxBuilder", "OPSET", "onnx_dtype"]

OPSET = 21  # QuantizeLinear-21 (int16, per-axis), Clip-13 and MaxPool-12 on integers

_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
           np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
           np.dtype(np.int16): TensorProto.INT16, np.dtype(np.uint16): TensorProto.UINT16,
           np.dtype(np.int32): TensorProto.INT32, np.dtype(np.int64): TensorProto.INT64,
           np.dtype(np.bool_): TensorProto.BOOL}


def onnx_dtype(dtype) -> int:
    """The TensorProto element type of a numpy dtype."""
    return _DTYPES[np.dtype(dtype)]


class OnnxBuilder:
    """Nodes and initializers of one graph, with unique tensor and node names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._node_names: set[str] = set()

    def fresh(self, base: str) -> str:
        """A tensor name not used yet, ``base`` itself when free."""
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claim ``name`` exactly (graph inputs)."""
        self._names.add(name)
        return name

    def constant(self, base: str, value, dtype=None) -> str:
        """An initializer holding ``value`` (a numpy array or scalar), its tensor name."""
        array = np.asarray(value, dtype=dtype)
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], name: str, outputs: int | Sequence[str] = 1,
             **attributes) -> str | list[str]:
        """Append one node; returns its output name (or names, when ``outputs`` is a list)."""
        node_name, i = name, 1
        while node_name in self._node_names:
            node_name, i = f"{name}_{i}", i + 1
        self._node_names.add(node_name)
        names = [self.fresh(o) for o in outputs] if not isinstance(outputs, int) else \
            [self.fresh(node_name if outputs == 1 else f"{node_name}:{k}") for k in range(outputs)]
        attributes = {k: v for k, v in attributes.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, **attributes))
        return names if not isinstance(outputs, int) or outputs != 1 else names[0]

    def model(self, inputs: Sequence[tuple[str, object, tuple]], outputs: Sequence[tuple[str, object, tuple]],
              graph_name: str, doc: str = "") -> onnx.ModelProto:
        """The ModelProto; ``inputs``/``outputs`` are (name, numpy dtype, shape) with str dims symbolic."""
        def info(name, dtype, shape):
            return helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape))

        graph = helper.make_graph(self.nodes, graph_name, [info(*i) for i in inputs], [info(*o) for o in outputs],
                                  initializer=self.initializers, doc_string=doc)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="qatcore")
        model.ir_version = 10  # ONNX 1.16+; what onnxruntime 1.18+ reads
        return model
