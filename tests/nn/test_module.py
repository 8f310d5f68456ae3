import numpy as np
import pytest

import qatcore
from qatcore import nn
from qatcore.errors import QATCoreError, StateDictError
from qatcore.models import MLP, DigitsCNN, SmallResNet


def rng(seed=0):
    return np.random.default_rng(seed)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4, rng=rng())
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(4, 2, rng=rng(1)))
        self.register_buffer("scratch", np.zeros(2, dtype=np.float32), persistent=False)

    def forward(self, x):
        return self.head(self.bn(self.fc(x)))


def test_registration_and_names():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["fc.weight", "fc.bias", "bn.weight", "bn.bias", "head.1.weight", "head.1.bias"]
    assert [n for n, _ in net.named_buffers()] == [
        "scratch", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert list(net.state_dict()) == [
        "fc.weight", "fc.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked", "head.1.weight", "head.1.bias"]
    assert [n for n, _ in net.named_modules()] == ["", "fc", "bn", "head", "head.0", "head.1"]
    assert [type(c).__name__ for c in net.children()] == ["Linear", "BatchNorm1d", "Sequential"]
    assert net.get_submodule("head.1") is net.head[1]
    with pytest.raises(QATCoreError, match="nope"):
        net.get_submodule("head.nope")


def test_shared_parameter_listed_once():
    a = nn.Linear(2, 2, rng=rng())
    seq = nn.Sequential(a, a)
    assert len(list(seq.parameters())) == 2


def test_state_dict_is_a_copy():
    net = Net()
    sd = net.state_dict()
    sd["fc.weight"][...] = 123.0
    assert not np.any(net.fc.weight.data == 123.0)


def test_load_state_dict_in_place_keeps_identity():
    a, b = Net(), Net()
    b.fc.weight.data[...] = 7.0
    w = a.fc.weight
    array = a.fc.weight.data
    a.load_state_dict(b.state_dict())
    assert a.fc.weight is w and a.fc.weight.data is array
    np.testing.assert_array_equal(a.fc.weight.data, 7.0)


def test_load_state_dict_errors_list_every_key_and_write_nothing():
    net = Net()
    before = net.state_dict()
    sd = net.state_dict()
    del sd["fc.bias"]
    sd["extra.weight"] = np.zeros(3)
    sd["fc.weight"] = np.zeros((5, 5), dtype=np.float32)
    sd["bn.weight"] = np.full(4, 9.0, dtype=np.float32)
    with pytest.raises(StateDictError) as info:
        net.load_state_dict(sd)
    message = str(info.value)
    assert "fc.bias" in message and "extra.weight" in message and "fc.weight" in message
    assert "(5, 5)" in message
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_load_state_dict_non_strict_reports_keys():
    net = Net()
    sd = net.state_dict()
    del sd["fc.bias"]
    sd["extra"] = np.zeros(1)
    result = net.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["fc.bias"] and result.unexpected_keys == ["extra"]


def test_load_state_dict_rejects_impossible_cast():
    net = Net()
    sd = net.state_dict()
    sd["fc.weight"] = sd["fc.weight"].astype(np.complex64)
    with pytest.raises(StateDictError, match="dtype"):
        net.load_state_dict(sd)


def test_train_eval_recursive():
    net = Net()
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_requires_grad_and_zero_grad():
    net = Net()
    net.requires_grad_(False)
    assert not any(p.requires_grad for p in net.parameters())
    net.requires_grad_(True)
    out = net(np.ones((3, 3), dtype=np.float32)).sum()
    out.backward()
    assert net.fc.weight.grad is not None
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_forward_hooks_and_removal():
    net = Net()
    seen = []
    handle = net.fc.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    pre = net.fc.register_forward_pre_hook(lambda m, args: (args[0] * 0,))
    out = net.fc(np.ones((2, 3), dtype=np.float32))
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(net.fc.bias.data, (2, 4)))
    assert seen == [(2, 4)]
    handle.remove()
    pre.remove()
    net.fc(np.ones((2, 3), dtype=np.float32))
    assert seen == [(2, 4)]


def test_forward_hook_can_replace_output():
    layer = nn.Identity()
    layer.register_forward_hook(lambda m, args, out: out * 2)
    np.testing.assert_array_equal(layer(qatcore.tensor([1.0])).numpy(), [2.0])


def test_assignment_errors():
    net = Net()
    with pytest.raises(QATCoreError, match="parameter"):
        net.fc.weight = np.zeros((4, 3))
    with pytest.raises(QATCoreError, match="submodule"):
        net.fc = 3

    class Forgot(nn.Module):
        def __init__(self):
            self.x = 1

    with pytest.raises(QATCoreError, match="super"):
        Forgot()


def test_buffers_follow_assignment():
    bn = nn.BatchNorm2d(2)
    bn.running_mean = np.ones(2, dtype=np.float32)
    assert isinstance(bn.running_mean, qatcore.Tensor)
    np.testing.assert_array_equal(bn.state_dict()["running_mean"], [1.0, 1.0])


def test_batchnorm_updates_running_stats_in_training_only():
    bn = nn.BatchNorm2d(3)
    x = rng().normal(2.0, 3.0, size=(8, 3, 4, 4)).astype(np.float32)
    bn(x)
    np.testing.assert_allclose(bn.running_mean.data, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-5)
    unbiased = x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.running_var.data, 0.9 + 0.1 * unbiased, rtol=1e-5)
    assert int(bn.num_batches_tracked.data) == 1
    bn.eval()
    before = bn.running_mean.data.copy()
    y = bn(x).numpy()
    np.testing.assert_array_equal(bn.running_mean.data, before)
    expected = (x - before[None, :, None, None]) / np.sqrt(bn.running_var.data[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dropout_reproducible_and_identity_in_eval():
    x = np.ones((4, 5), dtype=np.float32)
    a = nn.Dropout(0.5, rng=rng(3))(x).numpy()
    b = nn.Dropout(0.5, rng=rng(3))(x).numpy()
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 2.0}
    d = nn.Dropout(0.5, rng=rng(3)).eval()
    np.testing.assert_array_equal(d(x).numpy(), x)


def test_linear_init_bounds_match_pytorch_rule():
    layer = nn.Linear(100, 50, rng=rng())
    assert np.abs(layer.weight.data).max() <= 1 / np.sqrt(100)
    assert np.abs(layer.bias.data).max() <= 1 / np.sqrt(100)
    assert layer.weight.data.std() > 0.5 / np.sqrt(3 * 100)


def test_repr_lists_children():
    text = repr(DigitsCNN())
    assert "(conv1): Conv2d(1, 16, kernel_size=(3, 3)" in text
    assert "(bn1): BatchNorm2d(16" in text


@pytest.mark.parametrize("model_cls", [MLP, DigitsCNN, SmallResNet])
def test_reference_models_shapes_and_determinism(model_cls):
    x = rng(5).random((3, 1, 8, 8)).astype(np.float32)
    a, b = model_cls(), model_cls()
    a.eval()
    b.eval()
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    assert a(x).shape == (3, 10)
    c = model_cls(rng=rng(1)).eval()
    assert not np.array_equal(a(x).numpy(), c(x).numpy())
