"""Passes: dead-code elimination, pattern matching, inference fusion; lint after each."""

import numpy as np
import pytest

import qatcore.nn.functional as F
from qatcore import nn
from qatcore.graph import eliminate_dead_code, find_chains, fuse_for_inference, trace
from qatcore.models import MLP, DigitsCNN, SmallResNet


def batch(seed=0, n=6):
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def trained_stats(model):
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    rng = np.random.default_rng(5)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.data[...] = rng.normal(0, 0.3, c)
            m.running_var.data[...] = rng.uniform(0.5, 2.0, c)
            m.weight.data[...] = rng.uniform(0.5, 1.5, c)
            m.bias.data[...] = rng.normal(0, 0.2, c)
    return model.eval()


class LinearBn(nn.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 16, rng=rng)
        self.bn = nn.BatchNorm1d(16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4, bias=False, rng=rng)
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn2(self.fc2(self.act(self.bn(self.fc1(self.flatten(x))))))


@pytest.mark.parametrize("factory", [DigitsCNN, SmallResNet, LinearBn, MLP])
def test_inference_fusion_keeps_eval_outputs_and_removes_batchnorm(factory):
    model = trained_stats(factory())
    x = batch()
    expected = model(x).numpy()
    gm = trace(model)
    result = fuse_for_inference(gm)
    gm.lint()
    assert result.graph_module is gm
    got = gm(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    called = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in called)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in gm.modules())
    # the traced model is unchanged and still has its BatchNorms
    np.testing.assert_array_equal(model(x).numpy(), expected)
    if factory is not MLP:
        assert any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())


def test_fusion_second_run_changes_nothing():
    gm = trace(trained_stats(DigitsCNN()))
    assert fuse_for_inference(gm).changed
    assert not fuse_for_inference(gm).changed
    gm.lint()


def test_relu_fused_into_conv():
    gm = trace(trained_stats(DigitsCNN()))
    fuse_for_inference(gm)
    assert isinstance(gm.get_submodule("conv1"), nn.ConvReLU2d)
    assert isinstance(gm.get_submodule("fc"), nn.Linear)


def test_find_chains_requires_single_users():
    model = SmallResNet()
    gm = trace(model)
    chains = find_chains(gm, [nn.Conv2d, nn.BatchNorm2d, nn.ReLU])
    assert [[n.target for n in c] for c in chains] == [
        ["conv1", "bn1", "relu"], ["layer1.conv1", "layer1.bn1", "layer1.relu1"],
        ["layer2.conv1", "layer2.bn1", "layer2.relu1"]]
    adds = find_chains(gm, [F.add, nn.ReLU])
    assert [[n.target for n in c] for c in adds] == [[F.add, "layer1.relu2"], [F.add, "layer2.relu2"]]
    # the stem relu feeds both layer1.conv1 and the residual add: no chain may start there
    relu_conv = find_chains(gm, [nn.ReLU, nn.Conv2d])
    assert [[n.target for n in c] for c in relu_conv] == [
        ["layer1.relu1", "layer1.conv2"], ["layer2.relu1", "layer2.conv2"]]


def test_dead_code_elimination():
    gm = trace(MLP())
    graph = gm.graph
    last = graph.nodes[-2]
    graph.insert_after(last, "call_function", F.exp, (last,))
    graph.insert_after(graph.nodes[-2], "call_function", F.neg, (graph.nodes[-2],))
    result = eliminate_dead_code(gm)
    assert result.changed and [n.target for n in graph.nodes][-2:] == ["layers.5", "output"]
    gm.lint()
    assert not eliminate_dead_code(gm).changed


def test_replace_chain_with_subgraph():
    model = nn.Sequential(nn.Linear(3, 3, rng=np.random.default_rng(0)), nn.ReLU())
    gm = trace(model)
    from qatcore.graph import replace_chain_with_subgraph

    (chain,) = find_chains(gm, [nn.ReLU])

    def build(add, inputs):  # relu(x) == (x + |x|) / 2, as a subgraph
        x = inputs[0]
        absolute = add("call_function", F.sqrt, (add("call_function", F.mul, (x, x)),))
        return add("call_function", F.mul, (add("call_function", F.add, (x, absolute)), 0.5))

    replace_chain_with_subgraph(gm, chain, build)
    gm.lint()
    x = np.array([[-1.0, 0.5, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(gm(x).numpy(), model(x).numpy(), rtol=1e-6)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [F.mul, F.sqrt, F.add, F.mul]
