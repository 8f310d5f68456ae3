"""Saving and loading a converted int8 model through ``qatcore.save`` / ``qatcore.load``.

A converted model is a graph of int8 runtime modules (and, for layers left
float, a few float layers). It is stored as plain data, no pickle, no code:

    {"format": "qatcore.int8_model", "version": 1, "class_name": ...,
     "nodes":   [{"name", "op", "target", "args"}, ...]   (args: nested lists with
                                                          {"node": name} references)
     "modules": {target: {"type": class name, "config": {...}, "state": state_dict}},
     "sources": {int8 node: QAT node it reproduces}}

and rebuilt by :func:`int8_model_from_dict`, which accepts only the known module
types (the int8 runtime's, and float Linear/Conv2d/BatchNorm for layers left float).

>>> import numpy as np, tempfile, os, qatcore
>>> from qatcore.models import DigitsCNN
>>> from qatcore.quantization import QATPreparer
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

from typing import Any

import numpy as np

from qatcore.errors import ConfigError
from qatcore.graph import Graph, GraphModule
from qatcore.graph.node import Node, map_nodes
from qatcore.nn import functional as F
from qatcore.nn.batchnorm import BatchNorm1d, BatchNorm2d
from qatcore.nn.conv import Conv2d
from qatcore.nn.linear import Linear
from qatcore.nn.module import Module
from qatcore.quantization.int8_layers import INT8_MODULES

__all__ = ["int8_model_to_dict", "int8_model_from_dict"]

FORMAT, VERSION = "qatcore.int8_model", 1


def _float_config(module: Module) -> dict:
    if isinstance(module, Linear):
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if isinstance(module, Conv2d):
        return {"in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": list(module.padding), "dilation": list(module.dilation), "groups": module.groups,
                "bias": module.bias is not None}
    if isinstance(module, (BatchNorm1d, BatchNorm2d)):
        return {"num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
                "affine": module.affine}
    raise ConfigError(f"cannot save an int8 model holding a float {type(module).__name__}; "
                      f"supported float layers: Linear, Conv2d, BatchNorm1d, BatchNorm2d")


_FLOAT_TYPES = {"Linear": Linear, "Conv2d": Conv2d, "BatchNorm1d": BatchNorm1d, "BatchNorm2d": BatchNorm2d}


def _compact(array: np.ndarray) -> Any:
    """Small arrays (qparams, clamps) as [dtype, shape, values]: a few bytes instead of a
    binary array record, which matters for small models."""
    if array.size > 4:
        return array
    return [array.dtype.str, list(array.shape), array.ravel().tolist()]


def _expand(value: Any) -> np.ndarray:
    if isinstance(value, list):
        if len(value) != 3 or not isinstance(value[0], str):
            raise ConfigError("int8 model: a module state entry is neither an array nor [dtype, shape, values]")
        dtype, shape, values = value
        if dtype not in ("<i4", "<f4", "<f8", "<i8", "|i1", "|u1", "|b1"):
            raise ConfigError(f"int8 model: unsupported dtype {dtype!r} in a module state entry")
        return np.array(values, dtype=np.dtype(dtype)).reshape(shape)
    return np.asarray(value)


def int8_model_to_dict(model: GraphModule) -> dict:
    """The model as plain data (see the module docstring); ConfigError for what cannot be stored."""
    if not isinstance(model, GraphModule) or not isinstance(getattr(model, "int8_sources", None), dict):
        raise ConfigError("int8_model_to_dict needs a model returned by convert_to_quantized")
    nodes, modules = [], {}
    for node in model.graph.nodes:
        target = node.target
        if node.op == "call_function":
            if getattr(F, getattr(target, "__name__", ""), None) is not target:
                raise ConfigError(f"cannot save node {node.name!r}: its function is not in qatcore.nn.functional")
            target = target.__name__
        args = map_nodes(list(node.args), lambda n: {"node": n.name})
        nodes.append({"name": node.name, "op": node.op, "target": target, "args": args,
                      "kwargs": map_nodes(dict(node.kwargs), lambda n: {"node": n.name})})
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            kind = type(module).__name__
            config = module.config() if kind in INT8_MODULES else _float_config(module)
            modules[node.target] = {"type": kind, "config": config,
                                    "state": {k: _compact(v) for k, v in module.state_dict().items()}}
    return {"format": FORMAT, "version": VERSION, "class_name": model.class_name, "nodes": nodes,
            "modules": modules, "sources": dict(model.int8_sources)}


def _resolve_args(value: Any, env: dict[str, Node]) -> Any:
    if isinstance(value, dict) and set(value) == {"node"}:
        if value["node"] not in env:
            raise ConfigError(f"int8 model: a node reads {value['node']!r} before it is defined")
        return env[value["node"]]
    if isinstance(value, list):
        return tuple(_resolve_args(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _resolve_args(v, env) for k, v in value.items()}
    return value


def _build_module(target: str, record: dict) -> Module:
    kind, config, state = record.get("type"), record.get("config", {}), record.get("state", {})
    if kind in INT8_MODULES:
        module = INT8_MODULES[kind].from_config(config)
        for name, value in state.items():
            module.register_buffer(name, _expand(value))
        return module
    if kind in _FLOAT_TYPES:
        cls = _FLOAT_TYPES[kind]
        module = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()},
                     **({"rng": np.random.default_rng(0)} if cls in (Linear, Conv2d) else {}))
        module.load_state_dict({k: _expand(v) for k, v in state.items()})
        return module.eval()
    raise ConfigError(f"int8 model: module {target!r} has unknown type {kind!r}")


def int8_model_from_dict(data: dict) -> GraphModule:
    """Rebuild a model stored by :func:`int8_model_to_dict`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"not a qatcore int8 model (format {FORMAT!r} expected)")
    if data.get("version") != VERSION:
        raise ConfigError(f"int8 model format version {data.get('version')!r}; this qatcore reads {VERSION}")
    root, graph, env = Module(), Graph(), {}
    for target, record in data["modules"].items():
        root.add_module(target, _build_module(target, record))
    for record in data["nodes"]:
        op, target = record["op"], record["target"]
        if op == "call_function":
            function = getattr(F, target, None)
            if not callable(function) or target not in F.__all__:
                raise ConfigError(f"int8 model: unknown function {target!r}")
            target = function
        args = _resolve_args(record["args"], env)
        kwargs = _resolve_args(record.get("kwargs", {}), env)
        if op == "input":
            node = graph.input(target)
        elif op == "output":
            node = graph.output(args[0])
        else:
            node = graph.create_node(op, target, args, kwargs, name=record["name"])
        env[record["name"]] = node
    model = GraphModule(root, graph, class_name=data.get("class_name"))
    model.lint()
    object.__setattr__(model, "int8_sources", dict(data.get("sources", {})))
    return model.eval()
