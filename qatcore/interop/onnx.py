"""ONNX interoperability: ``export_onnx`` and ``import_onnx``.

A model trained anywhere comes in through ONNX, is fine-tuned with QAT here, and
leaves as an int8 ONNX model that ONNX Runtime runs with the same results:

    float ONNX --import_onnx--> GraphModule --QATPreparer--> QAT model --convert--> int8 model
    int8 model --export_onnx(format="qdq" | "qoperator")--> int8 ONNX (ONNX Runtime, TensorRT, ...)
    QAT model  --export_onnx--> float ONNX with QDQ pairs (for other toolchains' int8 engines)
    float model --export_onnx--> float ONNX

Needs the optional extra ``pip install "qatcore[onnx]"`` (onnx, onnxruntime);
``import qatcore`` never imports onnx. See docs/interop.md for the operator tables
and the measured agreement with ONNX Runtime.

>>> import os, tempfile
>>> import numpy as np
>>> from qatcore.models import MLP
>>> from qatcore.interop.onnx import export_onnx, import_onnx
>>> model = MLP(hidden=(16,)).eval()
>>> x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = os.path.join(tmp, "mlp.onnx")
...     _ = export_onnx(model, path, x)
...     imported = import_onnx(path)
>>> bool(np.array_equal(imported(x).data, model(x).data))
True
"""

from __future__ import annotations

import os

import numpy as np

from qatcore.errors import ConfigError, InteropError, TraceError
from qatcore.graph import GraphModule, propagate_shapes, trace
from qatcore.nn.module import Module
from qatcore.quantization.block_fake_quantize import refuse_dynamic_quantizers
from qatcore.serialization import write_atomically
from qatcore.tensor import Tensor

__all__ = ["export_onnx", "import_onnx", "FORMATS"]

FORMATS = ("qdq", "qoperator")


def _require_onnx():
    try:
        import onnx
    except ImportError as e:
        raise InteropError('ONNX support needs the optional extra: pip install "qatcore[onnx]" '
                           '(onnx and onnxruntime)') from e
    return onnx


def _example_inputs(example_input) -> tuple[np.ndarray, ...]:
    """float32 arrays, and int64 arrays for integer examples (token indices; which inputs may
    take them is checked against the graph by ``_check_index_inputs``)."""
    items = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    inputs = []
    for i, item in enumerate(items):
        array = item.data if isinstance(item, Tensor) else np.asarray(item)
        if array.dtype.kind not in "fiu" or array.ndim == 0:
            raise InteropError(f"export_onnx: example input {i} must be a float array with a batch axis, "
                               f"got dtype {array.dtype} and shape {array.shape}")
        inputs.append(array.astype(np.float32 if array.dtype.kind == "f" else np.int64, copy=False))
    return tuple(inputs)


def _check_index_inputs(gm: GraphModule, input_nodes, inputs, reads_indices_only) -> None:
    """An integer example is allowed only for an input that embedding lookups alone read
    (written to the file as int64 token indices); every other input is float."""
    for i, (node, array) in enumerate(zip(input_nodes, inputs)):
        if array.dtype.kind != "f" and not reads_indices_only(gm, node):
            raise InteropError(f"export_onnx: example input {i} must be a float array with a batch axis, got "
                               f"dtype {array.dtype}; integer examples are token indices, for an input that only "
                               f"embedding lookups read ({node.target!r} is read by other operations)")


def export_onnx(model: Module, path, example_input, format: str = "qdq"):  # noqa: A002 - the issue's name
    """Write ``model`` to ``path`` as ONNX (opset 21) and return the ``onnx.ModelProto``.

    What is written depends on the model (``qatcore.interop.onnx_export``):

    - a converted int8 model: integer tensors between QuantizeLinear and DequantizeLinear;
      ``format="qdq"`` (DequantizeLinear -> Conv / Gemm -> QuantizeLinear, int8 weights with
      per-channel scales on axis 0, int32 bias) or ``format="qoperator"`` (QLinearConv /
      QLinearMatMul);
    - a converted low-bit model (``LowBitLinear`` / ``LowBitEmbedding`` layers between float
      ones): INT4 weight initializers behind a blocked DequantizeLinear, then MatMul or Gather,
      per-token activation quantization composed from standard ops (either ``format``: low-bit
      layers have no QLinear operator);
    - a QAT model: its eval-mode computation in float, a QuantizeLinear -> DequantizeLinear
      pair at every enabled fake-quant node (``format`` must be "qdq"; a model with dynamic
      quantizers, per group or per token, is refused: convert it first);
    - a float model: the float graph (``format`` must be "qdq", the default).

    The axis 0 of every input is the batch axis (symbolic in the file); ``example_input``
    (an array, a Tensor, or a tuple of them for several inputs) fixes the other axes; an input
    is float32, or int64 when its example holds integers and only embedding lookups read it
    (token indices, as TinyGPT takes). The
    model runs once on it in eval mode (training flags are restored afterwards). The file
    passes ``onnx.checker`` (full check) before it is written, atomically.

    Raises:
        InteropError: the onnx extra is missing, an unknown format, an eager-mode QAT model,
            a model that cannot be traced, or an operation with no ONNX counterpart (naming
            the node).
        SerializationError: the file cannot be written (nothing is left behind).
    """
    onnx = _require_onnx()
    from qatcore.interop.onnx_export import build_onnx_model, model_kind, reads_indices_only  # imports onnx

    if format not in FORMATS:
        raise InteropError(f"export_onnx: format must be one of {FORMATS}, got {format!r}")
    if not isinstance(model, Module):
        raise InteropError(f"export_onnx: expected a qatcore Module, got {type(model).__name__}")
    kind = model_kind(model)
    if kind == "qat":
        try:
            refuse_dynamic_quantizers(model.named_modules(), "export_onnx")
        except ConfigError as e:
            raise InteropError(str(e)) from None
    if format == "qoperator" and kind != "int8":
        raise InteropError(f"export_onnx: format='qoperator' writes int8 models (convert_to_quantized first); "
                           f"this is a {kind} model: use format='qdq'")
    inputs = _example_inputs(example_input)
    if isinstance(model, GraphModule):
        gm = model
    elif kind != "float":
        what = "QAT model was prepared" if kind == "qat" else "int8 model was converted from a QAT model prepared"
        raise InteropError(f"export_onnx: this {what} in eager mode (its forward branches on tensor values), so it "
                           f"has no graph to export")
    else:
        try:
            gm = trace(model)
        except TraceError as e:
            raise InteropError(f"export_onnx: the model cannot be traced, so it has no graph to export: {e}") from e
    input_nodes = [n for n in gm.graph.nodes if n.op == "input"]
    if len(input_nodes) != len(inputs):
        raise InteropError(f"export_onnx: the model takes {len(input_nodes)} inputs "
                           f"({', '.join(n.target for n in input_nodes)}), got {len(inputs)} example inputs")
    _check_index_inputs(gm, input_nodes, inputs, reads_indices_only)
    modes = {module: module.training for module in gm.modules()}
    gm.eval()  # the file is the eval-mode computation (running BatchNorm statistics, the QAT eval bias)
    try:
        propagate_shapes(gm, *inputs)
        proto = build_onnx_model(gm, kind, format)
    finally:
        for module, mode in modes.items():
            module.training = mode
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx raises several checker and shape-inference types
        raise InteropError(f"export_onnx: the exported graph fails onnx.checker ({e}); nothing was written") from e
    write_atomically(proto.SerializeToString(), os.fspath(path))
    return proto


def import_onnx(path):
    """Read a float ONNX model into a trainable GraphModule (``qatcore.interop.onnx_import``).

    Raises:
        InteropError: the onnx extra is missing, the file is unreadable or malformed, or an
            operator (named, with its node) is not supported.
    """
    _require_onnx()
    from qatcore.interop.onnx_import import import_model  # imports onnx, so only now

    return import_model(path)
