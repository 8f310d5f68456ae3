"""DataParallel, ShardedLoader and the backward hooks, on ranks simulated by ThreadGroup:
N ranks with shares of each global batch train as one process on the whole batch, and
stay bitwise equal to each other."""

from __future__ import annotations

import numpy as np
import pytest

import qatcore
from qatcore import nn
from qatcore.autograd import queue_callback, register_grad_ready_hook
from qatcore.data import DataLoader, ShardedLoader
from qatcore.data.sharding import share_bounds
from qatcore.distributed import DataParallel, ThreadGroup
from qatcore.errors import ConfigError, GradientError
from qatcore.models import MLP
from qatcore.optim import SGD


def _data(n=24, features=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, 10, n)


def _train(model, loader, steps, lr=0.1):
    optimizer = SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    done = 0
    while done < steps:
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break


def _state(module):
    return {name: np.array(value) for name, value in module.state_dict().items()}


@pytest.mark.parametrize("world_size,batch", [(2, 8), (3, 8), (4, 12)])
def test_ranks_train_as_one_process_on_the_global_batch(world_size, batch):
    x, y = _data()
    qatcore.manual_seed(0)
    reference = MLP(in_features=64, hidden=(16,), num_classes=10, rng=np.random.default_rng(1))
    _train(reference, DataLoader(x, y, batch, shuffle=True, rng=np.random.default_rng(5)), steps=6)

    def rank_main(group):
        model = MLP(in_features=64, hidden=(16,), num_classes=10, rng=np.random.default_rng(1 + group.rank))
        wrapped = DataParallel(model, bucket_bytes=2048)  # several buckets
        loader = ShardedLoader(DataLoader(x, y, batch, shuffle=True, rng=np.random.default_rng(5)),
                               group.rank, group.world_size)
        _train(wrapped, loader, steps=6)
        return _state(model)

    states = ThreadGroup.run(world_size, rank_main)
    for name, value in _state(reference).items():
        for rank in range(world_size):
            assert np.array_equal(states[rank][name], states[0][name]), f"{name} differs on rank {rank}"
        np.testing.assert_allclose(states[0][name], value, rtol=2e-5, atol=2e-6, err_msg=name)


def test_construction_broadcasts_rank_0s_parameters_and_buffers():
    def rank_main(group):
        model = nn.Sequential(nn.Linear(3, 4, rng=np.random.default_rng(group.rank)), nn.BatchNorm1d(4))
        model.get_submodule("1").running_mean.data[...] = group.rank + 1.0
        DataParallel(model)
        return _state(model)

    states = ThreadGroup.run(3, rank_main)
    for name in states[0]:
        assert all(np.array_equal(s[name], states[0][name]) for s in states), name
    assert states[2]["1.running_mean"].tolist() == [1.0] * 4


def test_a_parameter_no_rank_used_keeps_no_gradient_and_one_some_ranks_used_is_averaged_as_zero():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 1, rng=np.random.default_rng(0))
            self.b = nn.Linear(2, 1, rng=np.random.default_rng(1))
            self.unused = nn.Linear(2, 1, rng=np.random.default_rng(2))
            self.use_b = False

        def forward(self, x):
            return self.a(x) + self.b(x) if self.use_b else self.a(x)

    x = np.ones((2, 2), np.float32)

    def rank_main(group):
        model = TwoHeads()
        model.use_b = group.rank == 0
        wrapped = DataParallel(model)
        wrapped(x).sum().backward()
        return model.a.weight.grad, model.b.weight.grad, model.unused.weight.grad

    (a0, b0, u0), (a1, b1, u1) = ThreadGroup.run(2, rank_main)
    assert u0 is None and u1 is None
    np.testing.assert_array_equal(a0, [[2.0, 2.0]])  # both ranks' gradients, weights 1/2 each
    np.testing.assert_array_equal(b0, [[1.0, 1.0]])  # rank 0's gradient, halved; rank 1 counts as zero
    assert np.array_equal(b0, b1)


def test_no_sync_leaves_local_gradients():
    x = np.ones((2, 2), np.float32)

    def rank_main(group):
        model = nn.Linear(2, 1, rng=np.random.default_rng(0))
        wrapped = DataParallel(model)
        with wrapped.no_sync():
            (wrapped(x) * (group.rank + 1.0)).sum().backward()
        return model.weight.grad.copy()

    g0, g1 = ThreadGroup.run(2, rank_main)
    np.testing.assert_array_equal(g0, [[2.0, 2.0]])
    np.testing.assert_array_equal(g1, [[4.0, 4.0]])


def test_data_parallel_without_a_group_only_forwards():
    model = nn.Linear(2, 1, rng=np.random.default_rng(0))
    wrapped = DataParallel(model)
    assert wrapped.world_size == 1 and list(wrapped.state_dict()) == ["module.weight", "module.bias"]
    wrapped(np.ones((3, 2), np.float32)).sum().backward()
    np.testing.assert_array_equal(model.weight.grad, [[3.0, 3.0]])
    with pytest.raises(ConfigError, match="bucket_bytes"):
        DataParallel(model, bucket_bytes=0)
    with pytest.raises(ConfigError, match="Module"):
        DataParallel(object())


@pytest.mark.parametrize("batch,world_size", [(8, 2), (10, 3), (7, 4), (5, 5)])
def test_shares_are_disjoint_contiguous_and_cover_the_batch(batch, world_size):
    bounds = [share_bounds(batch, rank, world_size) for rank in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == batch
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world_size - 1))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_sharded_loader_resumes_at_another_world_size():
    x, y = np.arange(40.0)[:, None], np.arange(40)

    def loader():
        return DataLoader(x, y, 8, shuffle=True, rng=np.random.default_rng(3))

    two = [ShardedLoader(loader(), rank, 2) for rank in range(2)]
    iterators = [iter(s) for s in two]
    for _ in range(2):  # two global batches at 2 ranks
        for it in iterators:
            next(it)
    state = two[0].state_dict()
    assert qatcore.dumps(state) == qatcore.dumps(two[1].state_dict())  # the ranks' states are one state
    whole = loader()
    expected = [yb.tolist() for _, yb in whole][2:]
    for world_size in (1, 4):
        shards = [ShardedLoader(loader(), rank, world_size) for rank in range(world_size)]
        for s in shards:
            s.load_state_dict(state)
        rest = [[yb.tolist() for _, yb in s] for s in shards]
        got = [sum((rest[r][b] for r in range(world_size)), []) for b in range(len(rest[0]))]
        assert got == expected


def test_sharded_loader_refuses_a_batch_a_rank_would_not_get_a_sample_of():
    x, y = np.zeros((9, 1)), np.arange(9)
    with pytest.raises(ConfigError, match="global batch of 1 samples cannot be shared by 2 ranks"):
        ShardedLoader(DataLoader(x, y, 4), 0, 2)
    assert len(ShardedLoader(DataLoader(x, y, 4, drop_last=True), 1, 2)) == 2
    with pytest.raises(ConfigError, match="rank 2 of 2"):
        ShardedLoader(DataLoader(x, y, 4), 2, 2)
    with pytest.raises(ConfigError, match="DataLoader"):
        ShardedLoader([1, 2], 0, 1)


def test_grad_ready_hooks_run_after_accumulation_and_callbacks_after_the_pass():
    x = qatcore.tensor([1.0, 2.0], requires_grad=True)
    w = qatcore.tensor([3.0, 4.0], requires_grad=True)
    events = []
    handles = [register_grad_ready_hook(t, lambda t, n=n: events.append((n, t.grad.tolist()))) for n, t in
               (("x", x), ("w", w))]
    handles.append(register_grad_ready_hook(x, lambda t: queue_callback(lambda: events.append("end"))))
    (x * w).sum().backward()
    assert sorted(events[:2]) == [("w", [1.0, 2.0]), ("x", [3.0, 4.0])] and events[2:] == ["end"]
    for handle in handles:
        handle.remove()
    events.clear()
    (x * w).sum().backward()
    assert events == []
    with pytest.raises(GradientError, match="only a backward pass"):
        queue_callback(lambda: None)
    with pytest.raises(GradientError, match="leaf Tensor"):
        register_grad_ready_hook(x * 2, lambda t: None)
