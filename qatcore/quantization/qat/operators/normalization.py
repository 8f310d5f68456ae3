"""Normalization: BatchNorm1d and BatchNorm2d on their own.

A BatchNorm right after a Conv2d or a Linear is folded into that layer's QAT layer
(``weighted.py``). On its own it gets a quantizer after it (after the activation that
follows it, when one does), and in eval it is a per-channel affine map,

    y = a_c * x + b_c,    a = gamma / sqrt(running_var + eps),    b = beta - running_mean * a

which a BatchNorm2d between two quantizers converts to as a depthwise 1x1 ``Int8Conv2d``:
one int8 weight per channel, w_q = 127 * sign(a_c) with the scale s_w = |a_c| / 127 (so
w_q * s_w = a_c: a single weight per channel quantizes without error), the bias
b_c on the int32 grid of s_x * s_w, the usual fixed-point requantization (and a ReLU
after it as the clamp). A BatchNorm1d converts to the same computation for inputs of
any rank, ``Int8ChannelAffine`` (channels on axis 1; the depthwise 1x1 convolution on the
input viewed as (N, C, L, 1)).

ONNX: BatchNormalization with the running statistics, both ways; an ``Int8ChannelAffine``
is Reshape to (N, C, -1, 1), the depthwise convolution's export, Reshape back.
"""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError, ShapeError
from qatcore.nn.activation import ReLU
from qatcore.nn.batchnorm import BatchNorm1d, BatchNorm2d
from qatcore.nn.container import Sequential
from qatcore.nn.conv import Conv2d
from qatcore.nn.flatten import Flatten
from qatcore.nn.linear import Linear
from qatcore.nn.pooling import MaxPool2d
from qatcore.quantization.int8_layers import int_input
from qatcore.quantization.qat.operators.quantizer import int8_record
from qatcore.quantization.qat.operators.registry import (
    OperatorRule,
    QATRole,
    RecordRule,
    register,
    register_onnx_import,
)
from qatcore.quantization.qat.operators.weighted import Int8Conv2d, export_int8_weighted
from qatcore.quantization.requantization import weighted_multipliers

__all__ = ["Int8ChannelAffine"]


def _export_batch_norm(ex, node, bn):
    return ex.batch_norm(node.target, ex.single_float_input(node), bn), None


class Int8ChannelAffine(Int8Conv2d):
    """A standalone BatchNorm1d: the depthwise 1x1 ``Int8Conv2d`` of the module docstring on
    an input of any rank >= 2 with channels on axis 1, viewed as (N, C, L, 1)."""

    def forward(self, x):
        q = int_input(self, x)
        channels = self.weight_q.data.shape[0]
        if q.ndim < 2 or q.shape[1] != channels:
            raise ShapeError(f"Int8ChannelAffine: expected an (N, {channels}, ...) input, got shape {q.shape}")
        return super().forward(q.reshape(q.shape[0], channels, -1, 1)).reshape(q.shape)


def _export_channel_affine(ex, node, module: Int8ChannelAffine):
    name, arg = node.target, node.args[0]
    shape = ex.shape(arg)
    x4 = ex.b.node("Reshape", [ex.names[arg], ex.b.constant(f"{name}.shape_4d", np.array([0, shape[1], -1, 1],
                                                                                          np.int64))],
                   f"{name}/Reshape_4d")
    y4, grid = export_int8_weighted(ex, node, module, x_name=x4)
    back = ex.b.constant(f"{name}.shape", np.array([0, *shape[1:]], np.int64))
    return ex.b.node("Reshape", [y4, back], name), grid


def _lower_batch_norm_2d(ctx, node, bn: BatchNorm2d | BatchNorm1d):
    """Between two quantizers: a depthwise 1x1 Int8Conv2d (module docstring), an
    Int8ChannelAffine for a BatchNorm1d. Otherwise float."""
    source, x_value = ctx.env[node.args[0]]
    if x_value is None or not bn.track_running_stats:
        return None
    quantizer, chain, relu = ctx.following_quantizer(node)
    if quantizer is None:
        return None
    out = ctx.value_of(quantizer, chain[-1].name)
    channels = bn.num_features
    gamma = np.ones(channels) if bn.weight is None else bn.weight.data.astype(np.float64)
    beta = np.zeros(channels) if bn.bias is None else bn.bias.data.astype(np.float64)
    a = gamma / np.sqrt(bn.running_var.data.astype(np.float64) + bn.eps)
    b = beta - bn.running_mean.data.astype(np.float64) * a
    weight_q = (127 * np.sign(a)).astype(np.int8).reshape(channels, 1, 1, 1)
    s_w = np.where(a != 0, np.abs(a) / 127, 1.0).astype(np.float32)  # float32, as every scale of the model
    bias_scale = x_value.scale * s_w.astype(np.float64)
    bias_q = np.rint(b / bias_scale)
    if np.any(np.abs(bias_q) >= 2**31):
        raise ConfigError(f"int8 conversion: BatchNorm {node.target!r} has a shift that overflows int32 at s_x * s_w")
    multiplier, shift, float_multiplier = weighted_multipliers(x_value.scale, s_w, out.scale, channels)
    clamp_min = out.zero_point if relu else out.qmin
    cls = Int8ChannelAffine if isinstance(bn, BatchNorm1d) else Int8Conv2d
    conv = cls(weight_q, bias_q.astype(np.int32), multiplier, shift, x_value.zero_point, out.scale,
               out.zero_point, clamp_min, out.qmin, out.qmax, float_multiplier, ctx.requantization, groups=channels)
    ctx.absorb(chain, node)
    return ctx.add(chain[-1].name, conv, (source,), out)


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
    # after a ReLU, not right after the Linear: it is not folded
    return Sequential(Linear(12, 6, rng=rng), ReLU(), BatchNorm1d(6), Linear(6, 4, rng=rng)), (3, 12)


register(
    OperatorRule(BatchNorm2d, qat=QATRole.NEW_GRID, quantize_after_activation=True, lower=_lower_batch_norm_2d,
                 export=_export_batch_norm, record=RecordRule(_config, lambda c: BatchNorm2d(**c)),
                 example=_example_2d),
    OperatorRule(BatchNorm1d, qat=QATRole.NEW_GRID, quantize_after_activation=True, lower=_lower_batch_norm_2d,
                 export=_export_batch_norm, record=RecordRule(_config, lambda c: BatchNorm1d(**c)),
                 example=_example_1d),
    OperatorRule(Int8ChannelAffine, export=_export_channel_affine, record=int8_record(Int8ChannelAffine)),
)
register_onnx_import("BatchNormalization", _import_batch_norm)
