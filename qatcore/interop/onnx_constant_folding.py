"""Constant folding at ONNX import: nodes whose inputs are all constants are computed once.

Exporters leave arithmetic on constants in the file: PyTorch's TorchScript exporter computes
a causal mask as Shape -> Slice -> Concat -> Expand -> Trilu -> Equal -> Where, a head size
as Shape -> Gather -> Div -> Cast, and with ``do_constant_folding=False`` transposes each
Linear weight with a Transpose node. None of it depends on the model's input values, so the
importer computes it here, with ONNX's own reference implementation (``onnx.reference``) of
whatever operator it is, and the graph keeps only the result.

**Partially known shapes.** ``Shape`` of a computed value is a constant except where the
dimension varies with the batch (the importer finds those by running the model at two batch
sizes). Such a shape is a ``numpy.ma.MaskedArray``: the unknown entries are masked. Folding
carries the mask through the operators that move values around (Gather, Slice, Concat,
Unsqueeze, ...) and through elementwise arithmetic (an entry computed from an unknown one is
unknown); any other operator given an unknown entry raises :class:`FoldError`. A Reshape
target with a single unknown entry becomes -1 there (``qatcore.quantization.qat.operators.shape``);
anything else that needs a value the file does not fix is refused where it is read.

>>> import numpy as np
>>> from onnx import helper
>>> node = helper.make_node("Concat", ["a", "b"], ["c"], axis=0)
>>> shape = np.ma.masked_array([0, 8], mask=[True, False])
>>> fold(node, [shape, np.array([3])], {"": 17})[0]
masked_array(data=[--, 8, 3],
             mask=[ True, False, False],
       fill_value=999999)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

__all__ = ["FoldError", "fold", "known"]

# operators that move their inputs' entries: which inputs carry data (None: all); the
# unknown entries follow the data
_MOVES = {"Identity": (0,), "Cast": (0,), "Gather": (0,), "Slice": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
          "Reshape": (0,), "Flatten": (0,), "Transpose": (0,), "Expand": (0,), "Concat": None}
# elementwise operators: an entry is unknown if any input's broadcast entry is
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Max", "Min", "Floor", "Ceil",
                          "Sqrt", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "Where"})


# operators that draw random numbers: computed once, their sample would be frozen into the model
_RANDOM = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                     "Multinomial"})


class FoldError(Exception):
    """The node cannot be computed at import (the importer names the node)."""


def known(value: np.ndarray) -> bool:
    """Whether every entry of a constant is known (not a masked, batch-dependent entry)."""
    return not (isinstance(value, np.ma.MaskedArray) and np.ma.is_masked(value))


def _evaluate(node: onnx.NodeProto, values: list, opsets: dict[str, int]) -> list[np.ndarray]:
    feeds = {name: value for name, value in zip(node.input, values) if name}
    try:
        results = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
    except Exception as e:  # the reference implementation's own complaint, whatever it is
        raise FoldError(f"computing it on its constant inputs failed: {type(e).__name__}: {e}") from e
    return [np.asarray(r) for r in results]


def fold(node: onnx.NodeProto, values: list[np.ndarray | None], opsets: dict[str, int]) -> list[np.ndarray]:
    """The node's outputs computed from its constant inputs ``values`` (None for an omitted
    optional input): numpy arrays, or masked arrays where an entry is unknown."""
    training_dropout = node.op_type == "Dropout" and len(values) > 2 and values[2] is not None and bool(
        np.asarray(values[2]).reshape(-1)[:1].any())
    if node.op_type in _RANDOM or training_dropout:
        raise FoldError("it draws random numbers; computed once at import, one sample would be frozen in")
    masks = [np.ma.getmaskarray(v) if v is not None and not known(v) else None for v in values]
    data = [None if v is None else np.ma.getdata(v) if isinstance(v, np.ma.MaskedArray) else v for v in values]
    if all(m is None for m in masks):
        return _evaluate(node, data, opsets)
    unknown_inputs = [i for i, m in enumerate(masks) if m is not None]
    if node.op_type in _MOVES:
        carriers = range(len(values)) if _MOVES[node.op_type] is None else _MOVES[node.op_type]
        if any(i not in carriers for i in unknown_inputs):
            raise FoldError(f"input {unknown_inputs[-1]} depends on a dimension known only at run time (the batch)")
        outputs = _evaluate(node, [np.where(m, 1, d) if m is not None else d for m, d in zip(masks, data)], opsets)
        flags = [(m if m is not None else np.zeros(np.shape(d), bool)).astype(np.int64) if i in carriers else d
                 for i, (m, d) in enumerate(zip(masks, data))]
        mask = _evaluate(node, flags, opsets)[0] != 0
    elif node.op_type in _ELEMENTWISE:
        outputs = _evaluate(node, [np.where(m, 1, d) if m is not None else d for m, d in zip(masks, data)], opsets)
        mask = np.zeros(outputs[0].shape, bool)
        for m in masks:
            if m is not None:
                mask = mask | m
    else:
        raise FoldError(f"input {unknown_inputs[0]} depends on a dimension known only at run time (the batch)")
    return [np.ma.masked_array(outputs[0], mask=mask) if mask.any() else outputs[0], *outputs[1:]]
