"""QAT layers: Linear and Conv2d (optionally with a folded BatchNorm and a fused
ReLU) whose weight is fake-quantized before the weight operation and whose output
is fake-quantized after it.

Each QAT layer registers the float layer's *own* Parameters under the same names
(``weight``, ``bias``), so an optimizer built before preparation keeps training
it, and the QAT model's state_dict is the float model's keys plus the
quantizers' (``<layer>.weight_fake_quant.*``, ``<layer>.output_fake_quant.*``).

In eager mode a layer also quantizes its own input (``input_fake_quant``, set by
preparation: ``<layer>.input_fake_quant.*``), because the code between two layers is
the user's float code and the int8 form of the layer needs its input on a grid; in
graph mode it is None (the graph's own quantizer before the layer defines the input).
The forward is then

    training, or gradients on:  y = fq_out([relu](op(fq_in(x), fq_w(W)) + b))   (the float simulation)
    eval without gradients:     y = interpreter(layer, x)                       (when one is installed)

where the interpreter eager preparation installs computes the layer's int8 arithmetic
(:mod:`qatcore.quantization.qat.eager_conversion`) and returns ``NotImplemented`` where
it cannot (the simulation then runs).

``QATConvBn2d`` folds a BatchNorm into the conv for fake quantization while
training (docs/numerics.md, "BatchNorm folding"), with the running-variance correction:

    sf  = gamma / sqrt(running_var + eps)        (channels with sf == 0 use 1: see below)
    y   = conv(x, fake_quant(W * sf)) / sf  (+ conv bias)
    out = batch_norm(y)     batch statistics while training; running statistics once frozen

so the weights the network trains against are exactly the folded int8 weights of
the converted model. A zero gamma would divide by zero: those channels scale by 1
instead (their BatchNorm output is beta whatever y is, so nothing changes). The
BatchNorm itself stays registered where it was in the float model (its state_dict
keys do not move); the QAT layer only refers to it.

A layer whose ``quant_enabled`` flag is off computes exactly the float layer.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qatcore.autograd.grad_mode import is_grad_enabled
from qatcore.nn import functional as F
from qatcore.nn.batchnorm import BatchNorm1d, BatchNorm2d
from qatcore.nn.conv import Conv2d
from qatcore.nn.embedding import Embedding
from qatcore.nn.linear import Linear
from qatcore.nn.module import Module
from qatcore.process_group import use_group
from qatcore.quantization.block_fake_quantize import BlockFakeQuantize
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.lowbit import TokenQuantization, lowbit_linear, lowbit_weight
from qatcore.tensor import Tensor

__all__ = ["QATLayer", "QATLinear", "QATConv2d", "FoldedBatchNorm", "QATConvBn2d", "QATLinearBn1d", "QATEmbedding",
           "QAT_LAYER_TYPES"]


class QATLayer(Module):
    """Base of the QAT layers: the quantizers, the relu flag, the enable switch, and the
    forward (module docstring); a subclass computes the float simulation in ``_simulate``."""

    _simulate: Callable  # (x, already on the input grid) -> the layer's output

    def _init_quantizers(self, weight_fake_quant: FakeQuantize | None, output_fake_quant: FakeQuantize | None,
                         relu: bool) -> None:
        self.weight_fake_quant = weight_fake_quant
        self.output_fake_quant = output_fake_quant
        if weight_fake_quant is None:
            self.register_buffer("weight_fake_quant", None)
        if output_fake_quant is None:
            self.register_buffer("output_fake_quant", None)
        self.register_buffer("input_fake_quant", None)  # eager mode sets it (set_input_fake_quant)
        self.relu = bool(relu)
        # the FakeQuantize whose output this layer reads (set by preparation; its scale s_x
        # lets the eval path quantize the bias at s_x * s_w exactly as the int8 model does)
        self.set_reference("input_quantizer", None)
        # a callable (layer, x) that may compute the forward its own way, returning NotImplemented
        # to leave it to the simulation (eager preparation installs one that runs the layer's int8
        # arithmetic in eval without gradients; graph mode evaluates the whole graph instead)
        self.interpreter = None
        self.register_buffer("quant_enabled", np.ones((), dtype=np.bool_))

    def set_input_fake_quant(self, quantizer: FakeQuantize) -> None:
        """Quantize the layer's own input with ``quantizer`` (eager mode: the value arrives from
        float code); it also becomes the ``input_quantizer`` whose scale the eval bias uses."""
        self.input_fake_quant = quantizer
        self.set_reference("input_quantizer", quantizer)

    def forward(self, x):
        if self.interpreter is not None:
            y = self.interpreter(self, x)
            if y is not NotImplemented:
                return y
        if self.enabled and isinstance(self.input_fake_quant, FakeQuantize):
            x = self.input_fake_quant(x)
        return self._simulate(x)

    def _adopt_conv(self, conv: Conv2d) -> None:
        """Take the conv's geometry and its very weight and bias Parameters (shared, not copied)."""
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(conv, name))
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)

    @property
    def enabled(self) -> bool:
        return bool(self.quant_enabled.data)

    def set_enabled(self, enabled: bool) -> None:
        self.quant_enabled.data[...] = enabled

    def quantizers(self) -> list[FakeQuantize]:
        """The layer's own quantizers: weight, output and (eager mode) input."""
        return [q for q in (self.weight_fake_quant, self.output_fake_quant, self.input_fake_quant)
                if isinstance(q, FakeQuantize)]

    def eval_bias(self, bias):
        """In eval, the bias rounded to the int32 grid of s_x * s_w (docs/numerics.md, "Bias": removes
        the simulation/int8 one-LSB differences an unquantized float bias causes)."""
        quantizer, weight_quantizer = self.input_quantizer, self.weight_fake_quant
        if (self.training or bias is None or not isinstance(quantizer, FakeQuantize)
                or not isinstance(weight_quantizer, FakeQuantize) or quantizer.dynamic or weight_quantizer.dynamic
                or not bool(quantizer.qparams_ready.data)
                or not bool(weight_quantizer.qparams_ready.data) or weight_quantizer.axis not in (None, 0)):
            return bias  # (weights per channel on another axis have no int8 model to match)
        s_x = np.float64(quantizer.calculate_qparams().scale[0])
        step = s_x * weight_quantizer.calculate_qparams().scale.astype(np.float64)
        values = bias.data if isinstance(bias, Tensor) else np.asarray(bias)
        return (np.rint(values.astype(np.float64) / step) * step).astype(np.float32)

    def _exact_eval(self) -> bool:
        """Eval with quantization on: accumulate in float64, as the int8 runtime's exact
        int32 accumulators do, so the output quantizer's rounding is the only difference
        left between this simulation and the converted model (fake-quantized operands are
        exact in float64; a float32 sum of hundreds of products is not). Not with a dynamic
        weight or input quantizer (per group, per token, ternary), which the int8 runtime does
        not hold: their eval computes what training computes, as torchao's does."""
        return (not self.training and self.enabled
                and not any(isinstance(q, FakeQuantize) and q.dynamic
                            for q in (self.weight_fake_quant, self.input_fake_quant)))

    def _weight_op(self, op, x, weight, bias, *args):
        """op(x, weight, bias, *args) in float64 on the exact eval path, else as is."""
        if self._exact_eval():
            wide = [None if t is None else F.cast(t, np.float64) for t in (x, weight, bias)]
            return F.cast(op(*wide, *args), np.float32)
        return op(x, weight, bias, *args)

    def _quantized_weight(self, weight):
        if self.enabled and isinstance(self.weight_fake_quant, FakeQuantize):
            # The weights are the same on every rank of a data-parallel run: observed as one
            # process observes them, with nothing to reduce (a histogram would count them
            # once per rank).
            with use_group(None):
                return self.weight_fake_quant(weight)
        return weight

    def _finish(self, y):
        if self.relu:
            y = F.relu(y)
        if self.enabled and isinstance(self.output_fake_quant, FakeQuantize):
            y = self.output_fake_quant(y)
        return y


class QATLinear(QATLayer):
    """y = [relu](x @ fq_w(W)^T + b), then fq_out(y)."""

    def __init__(self, linear: Linear, weight_fake_quant: FakeQuantize | None,
                 output_fake_quant: FakeQuantize | None, relu: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self._init_quantizers(weight_fake_quant, output_fake_quant, relu)

    def forward(self, x):
        if self.lowbit_eval():  # before the input quantizer: the arithmetic quantizes x itself
            return self._finish(Tensor._from_array(self.lowbit_forward(x), False))
        return super().forward(x)

    def _simulate(self, x):
        bias = self.eval_bias(self.bias) if self.enabled else self.bias
        return self._finish(self._weight_op(F.linear, x, self._quantized_weight(self.weight), bias))

    def lowbit_eval(self) -> bool:
        """Eval without gradients, with low-bit (per-group or ternary) weights quantized: the
        forward is the low-bit arithmetic the converted model computes
        (:mod:`qatcore.quantization.lowbit`), on the same integers, so the two agree bit for bit."""
        weight_fq = self.weight_fake_quant
        return (not self.training and self.enabled and not is_grad_enabled()
                and isinstance(weight_fq, BlockFakeQuantize) and bool(weight_fq.fake_quant_enabled.data)
                and self.output_fake_quant is None)

    def lowbit_forward(self, x) -> np.ndarray:
        """The low-bit arithmetic on ``x`` (:func:`~qatcore.quantization.lowbit.lowbit_linear`):
        the weight as its quantizer quantizes it now, the input per token when the layer
        quantizes its input (dynamic activations), else weight-only."""
        array = x.data if isinstance(x, Tensor) else np.asarray(x, np.float32)
        weight = lowbit_weight(self.weight_fake_quant, self.weight.data, self.weight_fake_quant.name)
        bias = None if self.bias is None else self.bias.data
        return lowbit_linear(array, weight, bias, TokenQuantization.of(self.input_fake_quant),
                             self.weight_fake_quant.name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}"


class QATConv2d(QATLayer):
    """y = [relu](conv2d(x, fq_w(W)) + b), then fq_out(y)."""

    def __init__(self, conv: Conv2d, weight_fake_quant: FakeQuantize | None,
                 output_fake_quant: FakeQuantize | None, relu: bool = False) -> None:
        super().__init__()
        self._adopt_conv(conv)
        self._init_quantizers(weight_fake_quant, output_fake_quant, relu)

    def _simulate(self, x):
        bias = self.eval_bias(self.bias) if self.enabled else self.bias
        y = self._weight_op(F.conv2d, x, self._quantized_weight(self.weight), bias, self.stride, self.padding,
                            self.dilation, self.groups)
        return self._finish(y)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, relu={self.relu}")


class FoldedBatchNorm(QATLayer):
    """Base of a layer with weights followed by a BatchNorm, trained with the BatchNorm
    folded into the fake-quantized weight (module docstring). A subclass says how the
    layer computes (``_compute``) and how a per-channel vector lines up with its output
    (``OUTPUT_SHAPE``)."""

    OUTPUT_SHAPE: tuple[int, ...]
    _compute: Callable  # (x, weight, bias) -> the layer's output: conv2d or linear

    def _init_folded(self, bn, bn_name: str, weight_fake_quant, output_fake_quant, relu: bool) -> None:
        # Referenced, not registered: the BatchNorm stays registered (and saved) under
        # its float name, bn_name, in the QAT model.
        self.set_reference("bn", bn)
        self.bn_name = bn_name
        self._init_quantizers(weight_fake_quant, output_fake_quant, relu)
        self.register_buffer("bn_frozen", np.zeros((), dtype=np.bool_))

    def _weight_shape(self) -> tuple[int, ...]:
        """A per-output-channel vector as it lines up with the weight: (-1, 1, ...)."""
        return (-1,) + (1,) * (self.weight.ndim - 1)

    def freeze_bn_stats(self, frozen: bool = True) -> None:
        """Use (and stop updating) the running statistics from now on."""
        self.bn_frozen.data[...] = frozen

    def _inverse_std(self) -> np.ndarray:
        bn = self.bn
        return (1 / np.sqrt(bn.running_var.data + np.float32(bn.eps))).astype(self.weight.dtype)

    def _raw_scale_factor(self) -> np.ndarray:
        """gamma * (1 / sqrt(running_var + eps)) in float32, exactly as training multiplies."""
        bn = self.bn
        gamma = bn.weight.data if bn.weight is not None else np.ones(bn.num_features, self.weight.dtype)
        return (gamma * self._inverse_std()).astype(self.weight.dtype)

    def _scale_factor(self) -> np.ndarray:
        """sf = gamma * (1 / sqrt(running_var + eps)) in float32, 1 where it is 0: the very
        values the training path multiplies the weight by, so eval and conversion fold alike."""
        sf = self._raw_scale_factor()
        return np.where(sf == 0, np.float32(1), sf).astype(self.weight.dtype)

    def _simulate(self, x):
        bn = self.bn
        if not self.enabled:
            # exactly the float layers: the layer, then batch norm
            return self._finish(bn(self._compute(x, self.weight, self.bias)))
        if not bn.training:
            return self._finish(self._folded_eval(x))
        if bn.weight is not None:
            # sf as a function of gamma, so gamma gets the gradient through the folded weight too;
            # adding 1 where it is 0 (and 0 elsewhere, exactly) gives _scale_factor's values
            sf_tensor = bn.weight * self._inverse_std()
            sf_tensor = sf_tensor + (sf_tensor.data == 0).astype(self.weight.dtype)
        else:
            sf_tensor = self._scale_factor()
        folded = self.weight * F.reshape(sf_tensor, self._weight_shape())
        y = self._compute(x, self._quantized_weight(folded), None)
        y = y / F.reshape(sf_tensor, self.OUTPUT_SHAPE)
        if self.bias is not None:
            y = y + F.reshape(self.bias, self.OUTPUT_SHAPE)
        use_batch_stats = bn.training and not bool(self.bn_frozen.data)
        if use_batch_stats and bn.track_running_stats:
            bn.num_batches_tracked.data += 1
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, use_batch_stats,
                         bn.momentum, bn.eps)
        return self._finish(y)

    def folded_parameters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(W * sf, beta + (b - mean) * sf, channels with sf == 0) with the running statistics,
        in float32, computed exactly as training folds them, so the weights the converter
        quantizes are bit for bit the ones the weight quantizer saw."""
        bn = self.bn
        sf = self._scale_factor()
        gamma = np.ones(bn.num_features, np.float64) if bn.weight is None else bn.weight.data.astype(np.float64)
        real_sf = gamma / np.sqrt(bn.running_var.data.astype(np.float64) + bn.eps)
        beta = np.zeros(bn.num_features) if bn.bias is None else bn.bias.data.astype(np.float64)
        bias = 0.0 if self.bias is None else self.bias.data.astype(np.float64)
        folded_bias = (beta + (bias - bn.running_mean.data.astype(np.float64)) * real_sf).astype(np.float32)
        folded_weight = self.weight.data * sf.reshape(self._weight_shape())
        # the channels training treats as gamma == 0: the float32 product is 0 (a subnormal gamma
        # can underflow there while its float64 quotient is not 0), so all three paths agree
        return folded_weight, folded_bias, self._raw_scale_factor() == 0

    def _folded_eval(self, x):
        """Eval with running statistics, in the folded form the int8 model computes:
        layer(x, fake_quant(W * sf)) + beta + (b - mean) * sf   (= BN(layer(x, ...)), exactly, in reals)."""
        folded_weight, folded_bias, dead = self.folded_parameters()
        quantized = self._quantized_weight(Tensor._from_array(folded_weight, False))
        if np.any(dead):
            # channels with gamma == 0 output beta: zero their folded weights, as the converter does
            quantized = quantized * F.reshape((~dead).astype(np.float32), self._weight_shape())
        return self._weight_op(self._compute, x, quantized, self.eval_bias(folded_bias))


class QATConvBn2d(FoldedBatchNorm):
    """Conv2d + BatchNorm2d (+ ReLU) trained with the BatchNorm folded into the
    fake-quantized weight (module docstring)."""

    OUTPUT_SHAPE = (1, -1, 1, 1)

    def __init__(self, conv: Conv2d, bn: BatchNorm2d, bn_name: str, weight_fake_quant: FakeQuantize | None,
                 output_fake_quant: FakeQuantize | None, relu: bool = False) -> None:
        super().__init__()
        self._adopt_conv(conv)
        self._init_folded(bn, bn_name, weight_fake_quant, output_fake_quant, relu)

    def _compute(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bn={self.bn_name!r}, relu={self.relu}")


class QATLinearBn1d(FoldedBatchNorm):
    """Linear + BatchNorm1d (+ ReLU) on (N, features) values, trained with the BatchNorm
    folded into the fake-quantized weight, as QATConvBn2d does for a conv."""

    OUTPUT_SHAPE = (1, -1)

    def __init__(self, linear: Linear, bn: BatchNorm1d, bn_name: str, weight_fake_quant: FakeQuantize | None,
                 output_fake_quant: FakeQuantize | None, relu: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self._init_folded(bn, bn_name, weight_fake_quant, output_fake_quant, relu)

    def _compute(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bn={self.bn_name!r}, "
                f"relu={self.relu}")


class QATEmbedding(QATLayer):
    """y = embedding(idx, fq_w(W)): the rows of the fake-quantized table (the config's
    ``embedding`` spec: groups along the embedding dimension). Nothing else is quantized:
    the indices are integers already and the output is the quantized rows themselves."""

    def __init__(self, embedding: Embedding, weight_fake_quant: FakeQuantize) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self._init_quantizers(weight_fake_quant, None, relu=False)

    def _simulate(self, idx):
        return F.embedding(idx, self._quantized_weight(self.weight), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


QAT_LAYER_TYPES = (QATLinear, QATConv2d, QATConvBn2d, QATLinearBn1d, QATEmbedding)
