"""Normalization: BatchNorm1d and BatchNorm2d on their own.

A BatchNorm right after a Conv2d is folded into the conv's QAT layer (``weighted.py``);
on its own it stays a float layer: no quantizer after it, and in the int8 model a float
island between Dequantize and Quantize (saved with its running statistics).

ONNX: BatchNormalization with the running statistics, both ways.
"""

from __future__ import annotations

import numpy as np

from qatcore.nn.batchnorm import BatchNorm1d, BatchNorm2d
from qatcore.nn.container import Sequential
from qatcore.nn.conv import Conv2d
from qatcore.nn.flatten import Flatten
from qatcore.nn.linear import Linear
from qatcore.nn.pooling import MaxPool2d
from qatcore.quantization.qat.operators.registry import OperatorRule, RecordRule, register, register_onnx_import

__all__: list[str] = []


def _export_batch_norm(ex, node, bn):
    return ex.batch_norm(node.target, ex.single_float_input(node), bn), None


def _config(bn) -> dict:
    return {"num_features": bn.num_features, "eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine}


def _import_batch_norm(imp, node):
    attrs = imp.attributes(node, {"epsilon", "momentum", "training_mode", "spatial"})
    if int(attrs.get("training_mode", 0)) or len([o for o in node.output if o]) != 1:
        raise imp.fail(node, "training_mode BatchNormalization is not supported (export the model in eval mode)")
    gamma, beta, mean, var = (imp.weight(node, i, rank=1) for i in range(1, 5))
    channels = gamma.shape[0]
    if not all(v.shape == (channels,) for v in (beta, mean, var)):
        raise imp.fail(node, "scale, B, mean and var must have one value per channel")
    rank = imp.ranks.get(node.input[0], 4)
    if rank not in (2, 3, 4):
        raise imp.fail(node, f"a rank-{rank} input is not supported ((N, C), (N, C, L) or (N, C, H, W))")
    cls = BatchNorm2d if rank == 4 else BatchNorm1d
    bn = cls(channels, eps=float(attrs.get("epsilon", 1e-5)), momentum=1.0 - float(attrs.get("momentum", 0.9)))
    bn.weight.data, bn.bias.data = gamma.copy(), beta.copy()
    bn.running_mean.data[...] = mean
    bn.running_var.data[...] = var
    return imp.add_layer(node, bn, (imp.runtime(node, 0),))


def _example_2d():
    rng = np.random.default_rng(0)
    # a BatchNorm after a pooling layer, not a conv: it is not folded
    return Sequential(Conv2d(2, 3, 3, padding=1, rng=rng), MaxPool2d(2), BatchNorm2d(3), Flatten(),
                      Linear(12, 4, rng=rng)), (2, 2, 4, 4)


def _example_1d():
    rng = np.random.default_rng(0)
    return Sequential(Linear(12, 6, rng=rng), BatchNorm1d(6), Linear(6, 4, rng=rng)), (3, 12)


register(
    OperatorRule(BatchNorm2d, export=_export_batch_norm, record=RecordRule(_config, lambda c: BatchNorm2d(**c)),
                 example=_example_2d),
    OperatorRule(BatchNorm1d, export=_export_batch_norm, record=RecordRule(_config, lambda c: BatchNorm1d(**c)),
                 example=_example_1d),
)
register_onnx_import("BatchNormalization", _import_batch_norm)
