"""Tracing: exact outputs and gradients, shared parameters, errors that say why."""

import numpy as np
import pytest

import qatcore
import qatcore.nn.functional as F
from qatcore import nn
from qatcore.errors import TraceError
from qatcore.graph import GraphModule, trace
from qatcore.models import MLP, DigitsCNN, SmallResNet
from qatcore.optim import SGD


def batch(seed=0, n=4):
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


class TwoInputs(nn.Module):
    """Two inputs, a tuple output, methods, indexing and a direct parameter."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.a = nn.Linear(64, 8, rng=rng)
        self.b = nn.Linear(5, 8, rng=rng)
        self.scale = nn.Parameter(np.full(8, 0.5, dtype=np.float32))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(8, 3, rng=rng))

    def forward(self, image, features):
        left = self.a(image.flatten(1))
        right = self.b(features) * self.scale
        mixed = F.relu(left + right)
        joined = F.cat([mixed, left], dim=1)
        return self.head(mixed), joined.mean(1, keepdim=True)[:, 0] - 1.0


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4, rng=np.random.default_rng(1))

    def forward(self, x):
        y = self.fc(x.reshape(x.shape[0], -1))
        return {"logits": y, "probs": F.softmax(y, -1)}


def run_eager_and_traced(model_factory, inputs):
    eager, traced_src = model_factory(), model_factory()
    gm = trace(traced_src)
    outs = []
    for module in (eager, gm):
        tensors = [qatcore.tensor(x) for x in inputs]
        out = module(*tensors)
        leaves = out if isinstance(out, tuple) else tuple(out.values()) if isinstance(out, dict) else (out,)
        total = None
        for i, leaf in enumerate(leaves):
            term = (leaf * float(i + 1)).sum()
            total = term if total is None else total + term
        total.backward()
        outs.append(([leaf.numpy().copy() for leaf in leaves],
                     [p.grad.copy() for p in module.parameters()]))
    return outs


@pytest.mark.parametrize("factory, inputs", [
    (MLP, [batch()]),
    (DigitsCNN, [batch()]),
    (SmallResNet, [batch()]),
    (TwoInputs, [batch(), np.random.default_rng(3).random((4, 5), dtype=np.float32)]),
    (DictOut, [batch()]),
])
def test_outputs_and_gradients_bit_identical(factory, inputs):
    (eager_out, eager_grad), (traced_out, traced_grad) = run_eager_and_traced(factory, inputs)
    assert len(eager_out) == len(traced_out) and len(eager_grad) == len(traced_grad) > 0
    for a, b in zip(eager_out + eager_grad, traced_out + traced_grad):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_graphmodule_shares_parameters_and_state_dict_keys():
    model = SmallResNet()
    gm = trace(model)
    assert list(gm.state_dict()) == list(model.state_dict())
    originals = {id(p) for p in model.parameters()}
    assert {id(p) for p in gm.parameters()} == originals
    assert gm.get_submodule("layer1.conv1") is model.layer1.conv1


def test_optimizer_on_original_parameters_trains_the_graph_module():
    model = DigitsCNN()
    optimizer = SGD(model.parameters(), lr=0.1)
    gm = trace(model)
    before = model.fc.weight.data.copy()
    loss = F.cross_entropy(gm(batch()), np.array([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert not np.array_equal(model.fc.weight.data, before)
    # and the two still compute the same thing
    model.eval()
    gm.eval()
    np.testing.assert_array_equal(model(batch(1)).numpy(), gm(batch(1)).numpy())


def test_direct_parameter_becomes_get_attr():
    gm = trace(TwoInputs())
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert [n.target for n in attrs] == ["scale"]
    gm.lint()


def test_shapes_recorded_and_state_unchanged():
    model = DigitsCNN()
    running = model.bn1.running_mean.data.copy()
    gm = trace(model, example_inputs=(batch(n=3),))
    shapes = {n.name: n.meta.get("shape") for n in gm.graph.nodes}
    assert shapes["x"] == (3, 1, 8, 8) and shapes["conv2"] == (3, 32, 4, 4) and shapes["fc"] == (3, 10)
    assert gm.graph.nodes[1].meta["dtype"] == np.float32
    np.testing.assert_array_equal(model.bn1.running_mean.data, running)
    assert model.training and gm.training


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4, rng=np.random.default_rng(0))

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # a tensor value decides the path
            y = F.relu(y)
        return y


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


def test_value_dependent_control_flow_names_module_and_line():
    with pytest.raises(TraceError) as info:
        trace(Outer())
    message = str(info.value)
    assert "Branchy 'inner'" in message
    assert "test_trace.py" in message and "if y.sum() > 0" in message
    assert "eager mode" in message


def test_unregistered_module_is_refused():
    class Sneaky(nn.Module):
        def forward(self, x):
            return nn.ReLU()(x)

    with pytest.raises(TraceError, match="not registered"):
        trace(Sneaky())


def test_leaf_modules_by_type_and_name():
    model = SmallResNet()
    from qatcore.models.resnet import BasicBlock

    by_type = trace(model, leaf_modules=[BasicBlock])
    assert [n.target for n in by_type.graph.nodes if n.op == "call_module"][3:5] == ["layer1", "layer2"]
    by_name = trace(model, leaf_modules=["layer2"])
    targets = [n.target for n in by_name.graph.nodes if n.op == "call_module"]
    assert "layer2" in targets and "layer1.conv1" in targets
    x = batch()
    model.eval()
    for gm in (by_type, by_name):
        gm.eval()
        np.testing.assert_array_equal(gm(x).numpy(), model(x).numpy())


def test_original_model_untouched_by_graph_edits():
    model = SmallResNet()
    gm = trace(model)
    gm.get_submodule("layer1").add_module("conv1", nn.Identity())
    assert isinstance(model.layer1.conv1, nn.Conv2d)
    assert isinstance(gm, GraphModule)
