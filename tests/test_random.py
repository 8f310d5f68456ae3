"""qatcore.random: manual_seed fixes every draw nobody passed a generator for, in a
user's own model (weights, dropout masks, data order) and in a whole training run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import qatcore
from qatcore import nn
from qatcore.data import DataLoader
from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.random import DEFAULT_SEED, default_generator, spawn_generator

# A user's model and loop, with no generator passed anywhere: layers, dropout and the loader's
# shuffling all draw from qatcore's default generator. Prints a digest of the trained weights.
USER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import qatcore
    from qatcore import nn
    from qatcore.data import DataLoader, load_digits
    from qatcore.optim import SGD
    from qatcore.training import train_one_epoch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.drop = nn.Dropout(0.2)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(self.drop(nn.functional.relu(self.conv(x))).reshape(x.shape[0], -1))

    if sys.argv[1] != "none":
        qatcore.manual_seed(int(sys.argv[1]))
    x, y, _, _ = load_digits()
    model = Net()
    loader = DataLoader(x, y, 64, shuffle=True)
    optimizer = SGD(model.parameters(), lr=0.05)
    train_one_epoch(model, loader, optimizer)
    print(repr(np.concatenate([p.data.ravel() for p in model.parameters()]).astype(np.float64).sum()))
""")


def _trained_digest(seed: str) -> str:
    run = subprocess.run([sys.executable, "-c", USER_SCRIPT, seed], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_two_processes_with_manual_seed_0_train_a_user_model_to_identical_weights():
    first, second, other = _trained_digest("0"), _trained_digest("0"), _trained_digest("1")
    assert first == second
    assert other != first
    assert _trained_digest("none") == first  # the default is seed 0 (DEFAULT_SEED)


def test_manual_seed_fixes_layers_dropout_and_shuffling_in_process():
    def draw():
        qatcore.manual_seed(7)
        linear, conv, drop = nn.Linear(3, 2), nn.Conv2d(1, 2, 3), nn.Dropout(0.5)
        mask = drop(np.ones((4, 8), dtype=np.float32)).data
        order = [yb.tolist() for _, yb in DataLoader(np.zeros((10, 1)), np.arange(10), 4, shuffle=True)]
        functional = F.dropout(np.ones(6, dtype=np.float32), 0.5).data
        return linear.weight.data, conv.weight.data, mask, order, functional

    first, second = draw(), draw()
    assert first[3] == second[3]
    for index in (0, 1, 2, 4):
        assert np.array_equal(first[index], second[index])
    qatcore.manual_seed(8)
    assert not np.array_equal(nn.Linear(3, 2).weight.data, first[0])
    assert qatcore.initial_seed() == 8
    qatcore.manual_seed(DEFAULT_SEED)


def test_layers_without_rng_differ_from_each_other_and_spawned_streams_are_independent():
    qatcore.manual_seed(0)
    assert not np.array_equal(nn.Linear(3, 2).weight.data, nn.Linear(3, 2).weight.data)
    # a spawned generator does not depend on how much was drawn from the default one
    qatcore.manual_seed(0)
    child = spawn_generator().random(3)
    qatcore.manual_seed(0)
    default_generator().random(100)
    assert np.array_equal(spawn_generator().random(3), child)
    qatcore.manual_seed(DEFAULT_SEED)


def test_an_explicit_rng_still_wins_over_the_seed():
    qatcore.manual_seed(1)
    a = nn.Linear(3, 2, rng=np.random.default_rng(5)).weight.data
    qatcore.manual_seed(2)
    b = nn.Linear(3, 2, rng=np.random.default_rng(5)).weight.data
    assert np.array_equal(a, b)
    qatcore.manual_seed(DEFAULT_SEED)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3", None])
def test_manual_seed_refuses_what_is_not_a_non_negative_integer(seed):
    with pytest.raises(ConfigError, match="manual_seed: seed must be a non-negative integer"):
        qatcore.manual_seed(seed)


def test_a_bad_rng_names_the_argument():
    with pytest.raises(ConfigError, match="Linear: rng must be a numpy.random.Generator"):
        nn.Linear(3, 2, rng=np.random.RandomState(0))
    with pytest.raises(ConfigError, match="dropout: generator must be"):
        F.dropout(np.ones(3, dtype=np.float32), 0.5, generator=0)
