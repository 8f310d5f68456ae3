"""Saving and loading a converted int8 model through ``qatcore.save`` / ``qatcore.load``.

A converted model is a graph of int8 runtime modules (and, for layers left
float, a few float layers). It is stored as compact plain data, no pickle, no code:

    {"format": "qatcore.int8_model", "version": 3, "class_name": ...,
     "nodes":   [[op, target, args, (module record)], ...]
     "sources": [[node index, QAT node, scale, zero point], ...]}

- ``args`` hold node references as the referenced node's index, nested lists for
  tuples, and ``["=", value]`` for a constant;
- an int8 module's record is ``[type, config, values]`` with the values of its
  buffers in the order its class declares (``STATE``): a number for a scalar, a
  list for an array of up to 4 elements, an array otherwise (integer arrays whose
  values fit are stored as int8 and restored to their declared dtype); a float
  layer's record is ``[type, config, state_dict]``;
- ``sources`` is the model's ``value_sources`` (what ``parity_report`` compares).

Names are not stored: an int8 model's nodes are named after their targets. The
compactness matters for small models, whose int8 file would otherwise be mostly
description rather than weights. :func:`int8_model_from_dict` accepts only the
module types that have a record in the operator registry (the int8 runtime's, and the
float layers an int8 model may keep: Linear, Conv2d, BatchNorm). Files of version 1
(which named the runtime modules ``QuantizedLinear``, ``QuantizedConv2d``,
``QuantizedAdd``) and version 2 still load: version 3 added each requantizing module's
``requantization`` to its config (absent: fixed point) and trailing buffers
(``STATE_SINCE_3``, derived from the others on loading an older file); version 4 stores a
node's keyword arguments as a fifth entry of its record (a mapping, packed as ``args``), which
the low-bit models' float attention calls need.

>>> import numpy as np, tempfile, os, qatcore
>>> from qatcore.models import DigitsCNN
>>> from qatcore.quantization.qat import QATPreparer
>>> preparer = QATPreparer()
>>> qat = preparer.prepare_for_qat(DigitsCNN())
>>> _ = qat(np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32))
>>> int8_model = preparer.convert_to_quantized(qat)
>>> path = os.path.join(tempfile.mkdtemp(), "digits.int8")
>>> qatcore.save(int8_model_to_dict(int8_model), path)
>>> again = int8_model_from_dict(qatcore.load(path))
>>> x = np.ones((2, 1, 8, 8), np.float32)
>>> bool(np.array_equal(again(x).numpy(), int8_model(x).numpy()))
True
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from qatcore.errors import ConfigError
from qatcore.graph import Graph
from qatcore.graph.graph import resolve_attribute
from qatcore.graph.node import Node
from qatcore.nn import functional as F
from qatcore.nn.module import Module
from qatcore.quantization.int8_layers import Int8Module
from qatcore.quantization.qat.eager_conversion import EAGER_INT8_NOT_SAVABLE, holds_islands
from qatcore.quantization.qat.int8_model import Int8Model, ValueSource
from qatcore.quantization.qat.operators import rule_for_module, rule_for_record, rule_for_target

__all__ = ["int8_model_to_dict", "int8_model_from_dict"]

FORMAT, VERSION = "qatcore.int8_model", 4
READABLE_VERSIONS = (1, 2, 3, 4)
OPS = ("input", "call_module", "call_function", "output", "get_attr")
# the one function outside qatcore.nn.functional a graph may call: an element of a layer's
# tuple output (MultiheadAttention's (output, weights))
_GETITEM = "operator.getitem"
# version 1 named three runtime modules differently
_VERSION_1_NAMES = {"QuantizedLinear": "Int8Linear", "QuantizedConv2d": "Int8Conv2d", "QuantizedAdd": "Int8Add"}


# ---- values ------------------------------------------------------------------------------------
def _pack_value(array: np.ndarray) -> Any:
    if array.ndim == 0:
        return array.item()
    if array.size <= 4 and array.ndim == 1:
        return array.tolist()
    if array.dtype.kind in "iu" and array.dtype.itemsize > 1 and array.size and \
            -128 <= int(array.min()) and int(array.max()) <= 127:
        return array.astype(np.int8)
    return array


def _unpack_value(value: Any, dtype: str, where: str) -> np.ndarray:
    if isinstance(value, (bool, int, float)):
        return np.array(value, dtype=np.dtype(dtype))
    if isinstance(value, list):
        if not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"int8 model: {where} holds a list that is not numbers")
        return np.array(value, dtype=np.dtype(dtype))
    if isinstance(value, np.ndarray):
        return value.astype(np.dtype(dtype))
    raise ConfigError(f"int8 model: {where} has a value of type {type(value).__name__}")


def _module_record(module: Module) -> list:
    kind = type(module).__name__
    rule = rule_for_target(type(module))
    if rule is None or rule.record is None:
        raise ConfigError(f"cannot save an int8 model holding a {kind} (node type with no int8 file record); "
                          f"see docs/architecture.md, 'Adding an operator'")
    config = rule.record.config(module)
    if isinstance(module, Int8Module):
        state = module.state_dict()
        names = [name for name, _ in type(module).STATE]
        if list(state) != names:
            raise ConfigError(f"int8 model: {kind} holds buffers {list(state)}, its class declares {names}")
        return [kind, config, [_pack_value(state[name]) for name in names]]
    return [kind, config, module.state_dict()]


def _build_module(record: Any, where: str, version: int) -> Module:
    if not (isinstance(record, list) and len(record) == 3 and isinstance(record[0], str)):
        raise ConfigError(f"int8 model: {where} has a malformed module record")
    kind, config, values = record
    if version == 1:
        kind = _VERSION_1_NAMES.get(kind, kind)
    if not isinstance(config, dict):
        raise ConfigError(f"int8 model: {where}: the module config must be a mapping")
    try:
        rule = rule_for_record(kind)
    except ConfigError as e:
        raise ConfigError(f"int8 model: {where}: {e}") from None
    cls = rule.target
    if issubclass(cls, Int8Module):
        expected = len(cls.STATE) - (len(cls.STATE_SINCE_3) if version < 3 else 0)
        if not isinstance(values, list) or len(values) != expected:
            raise ConfigError(f"int8 model: {where}: {kind} needs {expected} state values")
        try:
            module = rule.record.build(config)
        except ConfigError as e:
            raise ConfigError(f"int8 model: {where}: {e}") from None
        for (name, dtype), value in zip(cls.STATE, values):
            module.register_buffer(name, _unpack_value(value, dtype, f"{where}.{name}"))
        if expected < len(cls.STATE):
            module.derive_state()
        return module
    if not isinstance(values, dict):
        raise ConfigError(f"int8 model: {where}: a float layer's state must be a mapping")
    try:
        module = rule.record.build(config)
    except TypeError as e:
        raise ConfigError(f"int8 model: {where}: {kind} config {config!r} does not fit: {e}") from None
    module.load_state_dict(values)
    return module.eval()


# ---- arguments ----------------------------------------------------------------------------------
def _pack_args(value: Any, index: dict[Node, int]) -> Any:
    if isinstance(value, Node):
        return index[value]
    if isinstance(value, (tuple, list)):
        return [_pack_args(v, index) for v in value]
    return ["=", value]


def _unpack_args(value: Any, nodes: list[Node], where: str) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(nodes):
            raise ConfigError(f"int8 model: {where} reads node {value}, which is not defined before it")
        return nodes[value]
    if isinstance(value, list):
        if len(value) == 2 and value[0] == "=":
            return value[1]
        return tuple(_unpack_args(v, nodes, where) for v in value)
    raise ConfigError(f"int8 model: {where} has a malformed argument {value!r}")


# ---- the model ------------------------------------------------------------------------------------
def int8_model_to_dict(model: Int8Model) -> dict:
    """The model as plain data (see the module docstring); ConfigError for what cannot be stored."""
    if not isinstance(model, Int8Model):
        if isinstance(model, Module) and holds_islands(model):
            raise ConfigError(f"int8_model_to_dict: {EAGER_INT8_NOT_SAVABLE}")
        raise ConfigError("int8_model_to_dict needs a model returned by convert_to_quantized")
    index: dict[Node, int] = {}
    records = []
    for position, node in enumerate(model.graph.nodes):
        index[node] = position
        target = node.target
        if node.op == "call_function":
            if target is operator.getitem:
                target = _GETITEM
            elif getattr(F, getattr(target, "__name__", ""), None) is not target:
                raise ConfigError(f"cannot save node {node.name!r}: its function is not in qatcore.nn.functional")
            else:
                target = target.__name__
        elif node.op not in ("input", "call_module", "output", "get_attr"):
            raise ConfigError(f"cannot save node {node.name!r} of kind {node.op}")
        record = [OPS.index(node.op), target, _pack_args(list(node.args), index)]
        if node.op == "call_module":
            if node.name != node.target:
                raise ConfigError(f"cannot save node {node.name!r}: an int8 node is named after its target")
            rule_for_module(model.get_submodule(node.target))  # an unregistered type: the registry's error
            record.append(_module_record(model.get_submodule(node.target)))
        elif node.op == "call_function":
            record.append(node.name)
        elif node.op == "get_attr":
            if node.name != node.target or "." in node.target:
                raise ConfigError(f"cannot save node {node.name!r}: a constant is named after its buffer")
            record.append(np.array(resolve_attribute(model, node.target, node).data))
        if node.kwargs:  # version 4: keyword arguments, packed as the positional ones
            if len(record) == 3:
                record.append(None)
            record.append({key: _pack_args(value, index) for key, value in node.kwargs.items()})
        records.append(record)
    by_name = {n.name: i for n, i in index.items()}
    sources = [[by_name[name], s.source, float(s.scale), int(s.zero_point)]
               for name, s in model.value_sources.items()]
    return {"format": FORMAT, "version": VERSION, "class_name": model.class_name, "nodes": records,
            "sources": sources}


def int8_model_from_dict(data: dict) -> Int8Model:
    """Rebuild a model stored by :func:`int8_model_to_dict`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"not a qatcore int8 model (format {FORMAT!r} expected)")
    version = data.get("version")
    if version not in READABLE_VERSIONS:
        raise ConfigError(f"int8 model format version {version!r}; this qatcore reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    records = data.get("nodes")
    if not isinstance(records, list):
        raise ConfigError("int8 model: 'nodes' must be a list")
    root, graph, nodes, targets = Module(), Graph(), [], set()
    for position, record in enumerate(records):
        where = f"node {position}"
        if not (isinstance(record, list) and len(record) >= 3 and isinstance(record[0], int)
                and 0 <= record[0] < len(OPS) and isinstance(record[1], str)):
            raise ConfigError(f"int8 model: {where} is malformed")
        op, target = OPS[record[0]], record[1]
        args = _unpack_args(record[2], nodes, where)
        kwargs = {}
        if len(record) == 5:  # keyword arguments (version 4)
            if not (isinstance(record[4], dict) and all(isinstance(k, str) for k in record[4])):
                raise ConfigError(f"int8 model: {where} has malformed keyword arguments")
            kwargs = {key: _unpack_args(value, nodes, where) for key, value in record[4].items()}
            record = record[:4]
        if op == "input":
            node = graph.input(target)
        elif op == "output":
            node = graph.output(args[0])
        elif op == "get_attr":
            if len(record) != 4 or not isinstance(record[3], np.ndarray) or target in targets:
                raise ConfigError(f"int8 model: {where} needs one array and a unique name")
            targets.add(target)
            root.register_buffer(target, record[3])
            node = graph.create_node("get_attr", target, name=target)
        elif op == "call_module":
            if len(record) != 4 or target in targets:
                raise ConfigError(f"int8 model: {where} needs one module record and a unique target")
            targets.add(target)
            root.add_module(target, _build_module(record[3], f"{where} ({target})", version))
            node = graph.create_node("call_module", target, args, kwargs, name=target)
        else:
            function = operator.getitem if target == _GETITEM else getattr(F, target, None)
            if (target != _GETITEM and target not in F.__all__) or not callable(function) or len(record) != 4:
                raise ConfigError(f"int8 model: {where} calls unknown function {target!r}")
            node = graph.create_node("call_function", function, args, kwargs, name=record[3])
        nodes.append(node)
    sources = {}
    for entry in data.get("sources", []):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], int)
                and 0 <= entry[0] < len(nodes)):
            raise ConfigError("int8 model: malformed 'sources' entry")
        sources[nodes[entry[0]].name] = ValueSource(entry[1], float(entry[2]), int(entry[3]))
    model = Int8Model(root, graph, data.get("class_name"), sources)
    model.lint()
    return model.eval()
