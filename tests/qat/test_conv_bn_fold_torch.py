"""QATConvBn2d is PyTorch's one-convolution fold (``torch.ao.nn.intrinsic.qat.ConvBn2d``,
its default ``_forward_approximate`` path), as docs/concepts.md section 6 says: the same
outputs, gradients and running statistics over several training steps, then the same eval
output once BatchNorm is frozen. Krishnamoorthi's two-convolution fold (PyTorch's
``_forward_slow``) differs from it once the weights are quantized, which the last test shows."""

import warnings

import numpy as np
import pytest

from qatcore import tensor
from qatcore.nn import BatchNorm2d, Conv2d
from qatcore.quantization import FakeQuantize, QuantizationConfig
from qatcore.quantization.qat import QATConvBn2d

IN, OUT, BATCH, SIZE = 3, 4, 6, 7


def _pair(seed):
    """A qatcore QATConvBn2d and a torch ConvBn2d with the same weights, BatchNorm state and
    weight quantizer (int8 narrow, per-channel symmetric, min/max: qatcore's default)."""
    import torch
    from torch.ao.nn.intrinsic.qat import ConvBn2d
    from torch.ao.quantization import FakeQuantize as TorchFakeQuantize
    from torch.ao.quantization import PerChannelMinMaxObserver, QConfig

    rng = np.random.default_rng(seed)
    conv = Conv2d(IN, OUT, 3, padding=1, bias=False, rng=rng)
    bn = BatchNorm2d(OUT)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, OUT)
    bn.bias.data[...] = rng.normal(size=OUT)
    bn.running_mean.data[...] = rng.normal(size=OUT) * 0.1
    bn.running_var.data[...] = rng.uniform(0.5, 2.0, OUT)
    ours = QATConvBn2d(conv, bn, "bn", FakeQuantize(QuantizationConfig().weight, "w"), None)
    ours.train()
    bn.train()

    weight_fake_quant = TorchFakeQuantize.with_args(
        observer=PerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's own deprecation notices
        theirs = ConvBn2d(IN, OUT, 3, padding=1, bias=False, eps=bn.eps, momentum=bn.momentum,
                          qconfig=QConfig(activation=torch.nn.Identity, weight=weight_fake_quant))
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(conv.weight.data))
        theirs.bn.weight.copy_(torch.from_numpy(bn.weight.data))
        theirs.bn.bias.copy_(torch.from_numpy(bn.bias.data))
        theirs.bn.running_mean.copy_(torch.from_numpy(bn.running_mean.data))
        theirs.bn.running_var.copy_(torch.from_numpy(bn.running_var.data))
    theirs.train()
    return ours, bn, theirs


@pytest.mark.torch
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_steps_match_pytorch_conv_bn(seed):
    import torch

    ours, bn, theirs = _pair(seed)
    rng = np.random.default_rng(100 + seed)
    for _ in range(3):
        x = rng.normal(size=(BATCH, IN, SIZE, SIZE)).astype(np.float32)
        upstream = rng.normal(size=(BATCH, OUT, SIZE, SIZE)).astype(np.float32)
        for p in (ours.weight, bn.weight, bn.bias):
            p.grad = None
        y = ours(tensor(x))
        (y * tensor(upstream)).sum().backward()

        theirs.zero_grad()
        y_torch = theirs(torch.from_numpy(x))
        (y_torch * torch.from_numpy(upstream)).sum().backward()

        assert np.allclose(y.numpy(), y_torch.detach().numpy(), rtol=1e-4, atol=1e-4)
        assert np.allclose(ours.weight.grad, theirs.weight.grad.numpy(), rtol=1e-3, atol=1e-3)
        assert np.allclose(bn.weight.grad, theirs.bn.weight.grad.numpy(), rtol=1e-3, atol=1e-3)
        assert np.allclose(bn.bias.grad, theirs.bn.bias.grad.numpy(), rtol=1e-4, atol=1e-4)
        assert np.allclose(bn.running_mean.data, theirs.bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        assert np.allclose(bn.running_var.data, theirs.bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
        # the same integers: the weight quantizers chose the same per-channel scales
        assert np.allclose(ours.weight_fake_quant.calculate_qparams().scale,
                           theirs.weight_fake_quant.scale.numpy(), rtol=1e-6)


@pytest.mark.torch
def test_frozen_eval_matches_pytorch_conv_bn():
    import torch

    ours, bn, theirs = _pair(3)
    x = np.random.default_rng(7).normal(size=(BATCH, IN, SIZE, SIZE)).astype(np.float32)
    ours(tensor(x))
    theirs(torch.from_numpy(x))  # one training step each: observe the folded weight
    ours.eval()
    bn.eval()
    theirs.eval()
    # PyTorch's FakeQuantize observes in eval too, while its observer is enabled; ours never
    # does (docs/concepts.md section 3). Compare the folds with the same, trained, scales.
    theirs.apply(torch.ao.quantization.disable_observer)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    assert np.allclose(ours(tensor(x)).numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_krishnamoorthi_two_convolution_fold_differs_once_weights_are_quantized():
    """PyTorch's slow path is Krishnamoorthi's fold (batch statistics from a float
    convolution); ours takes them from the quantized one. Equal without quantization,
    different with it: the two methods of the concepts page are not the same computation."""
    import torch

    ours, bn, theirs = _pair(4)
    theirs._enable_slow_path_for_better_numerical_stability = True
    x = np.random.default_rng(8).normal(size=(BATCH, IN, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        slow = theirs(torch.from_numpy(x)).numpy()
    approximate = ours(tensor(x)).numpy()
    assert not np.allclose(approximate, slow, rtol=1e-5, atol=1e-5)
    assert np.allclose(approximate, slow, atol=0.1)  # but only by the quantization noise
