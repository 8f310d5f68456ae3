"""Tests for qatcore.optim: update rules against NumPy (and torch) oracles, param
groups, state dicts and learning-rate schedules."""

from __future__ import annotations

import copy
import doctest
import gc
import itertools
import math
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qatcore.optim
import qatcore.optim.adam
import qatcore.optim.lr_scheduler
import qatcore.optim.optimizer
import qatcore.optim.sgd
from qatcore.errors import ConfigError, DTypeError, ShapeError, StateDictError
from qatcore.nn.parameter import Parameter
from qatcore.optim import SGD, Adam, AdamW, CosineAnnealingLR, StepLR, optimizers_holding
from qatcore.tensor import Tensor

SHAPES = [(3, 4), (5,)]
STEPS = 6


# ---- helpers ------------------------------------------------------------------------------


def initial_arrays(seed: int, dtype=np.float64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]


def grad_sequence(seed: int, steps: int = STEPS, dtype=np.float64) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed + 1000)
    return [[rng.standard_normal(shape).astype(dtype) for shape in SHAPES] for _ in range(steps)]


def run_qatcore(make_optimizer, arrays, grads) -> list[Parameter]:
    params = [Parameter(a.copy()) for a in arrays]
    optimizer = make_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.copy()
        optimizer.step()
    return params


def sgd_reference(arrays, grads, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """torch's documented SGD, written out element by element in float64."""
    thetas = [a.astype(np.float64) for a in arrays]
    buffers: list = [None] * len(thetas)
    for step_grads in grads:
        for i, grad in enumerate(step_grads):
            g = grad.astype(np.float64)
            if maximize:
                g = -g
            if weight_decay != 0:
                g = g + weight_decay * thetas[i]
            if momentum != 0:
                if buffers[i] is None:
                    buffers[i] = g.copy()
                else:
                    buffers[i] = momentum * buffers[i] + (1 - dampening) * g
                g = g + momentum * buffers[i] if nesterov else buffers[i]
            thetas[i] = thetas[i] - lr * g
    return thetas


def adam_reference(arrays, grads, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled):
    """Adam / AdamW as in Kingma & Ba and Loshchilov & Hutter, in float64."""
    beta1, beta2 = betas
    thetas = [a.astype(np.float64) for a in arrays]
    m = [np.zeros_like(t) for t in thetas]
    v = [np.zeros_like(t) for t in thetas]
    v_max = [np.zeros_like(t) for t in thetas]
    for t, step_grads in enumerate(grads, start=1):
        for i, grad in enumerate(step_grads):
            g = grad.astype(np.float64)
            if maximize:
                g = -g
            if decoupled:
                thetas[i] = thetas[i] * (1 - lr * weight_decay)
            elif weight_decay != 0:
                g = g + weight_decay * thetas[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g**2
            v_max[i] = np.maximum(v_max[i], v[i])
            m_hat = m[i] / (1 - beta1**t)
            v_hat = (v_max[i] if amsgrad else v[i]) / (1 - beta2**t)
            thetas[i] = thetas[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return thetas


def is_plain(value) -> bool:
    """True when ``value`` holds only what the msgpack saver accepts."""
    if isinstance(value, dict):
        return all(isinstance(k, (int, str)) and is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(is_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str, np.ndarray))


def assert_state_dicts_equal(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_state_dicts_equal(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_dicts_equal(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


SGD_OPTIONS = [
    {"momentum": m, "dampening": d, "weight_decay": wd, "nesterov": n, "maximize": mx}
    for m, d, wd, n, mx in itertools.product(
        (0.0, 0.9), (0.0, 0.5), (0.0, 0.05), (False, True), (False, True)
    )
    if not n or (m > 0 and d == 0)
]
ADAM_OPTIONS = [
    {"cls": cls, "weight_decay": wd, "amsgrad": ams, "maximize": mx}
    for cls, wd, ams, mx in itertools.product(
        (Adam, AdamW), (0.0, 0.1), (False, True), (False, True)
    )
]


def option_id(options: dict) -> str:
    return "-".join(f"{k}={v.__name__ if isinstance(v, type) else v}" for k, v in options.items())


# ---- update rules against the NumPy oracle ------------------------------------------------


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=option_id)
def test_sgd_matches_numpy_reference(options):
    arrays, grads = initial_arrays(0), grad_sequence(0)
    params = run_qatcore(lambda ps: SGD(ps, lr=0.05, **options), arrays, grads)
    expected = sgd_reference(arrays, grads, lr=0.05, **options)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.data, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=option_id)
def test_adam_matches_numpy_reference(options):
    options = dict(options)
    cls = options.pop("cls")
    arrays, grads = initial_arrays(1), grad_sequence(1)
    params = run_qatcore(
        lambda ps: cls(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-6, **options), arrays, grads
    )
    expected = adam_reference(
        arrays, grads, lr=0.01, betas=(0.8, 0.95), eps=1e-6, decoupled=cls is AdamW, **options
    )
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.data, e, rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(0.0, 1.0),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.999),
    eps=st.floats(1e-8, 1e-2),
    weight_decay=st.floats(0.0, 0.5),
    amsgrad=st.booleans(),
    decoupled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_adam_matches_reference_for_any_hyperparameters(
    lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled, seed
):
    cls = AdamW if decoupled else Adam
    arrays, grads = initial_arrays(seed), grad_sequence(seed, steps=3)
    kwargs = {"lr": lr, "betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay}
    params = run_qatcore(lambda ps: cls(ps, amsgrad=amsgrad, **kwargs), arrays, grads)
    expected = adam_reference(
        arrays, grads, amsgrad=amsgrad, maximize=False, decoupled=decoupled, **kwargs
    )
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.data, e, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(0.0, 1.0),
    momentum=st.floats(0.0, 0.99),
    dampening=st.floats(0.0, 1.0),
    weight_decay=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_sgd_matches_reference_for_any_hyperparameters(lr, momentum, dampening, weight_decay, seed):
    kwargs = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay}
    arrays, grads = initial_arrays(seed), grad_sequence(seed, steps=3)
    params = run_qatcore(lambda ps: SGD(ps, **kwargs), arrays, grads)
    expected = sgd_reference(arrays, grads, nesterov=False, maximize=False, **kwargs)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.data, e, rtol=1e-12, atol=1e-14)


# ---- update rules against torch.optim ------------------------------------------------------


def run_torch(torch, make_optimizer, arrays, grads) -> list[np.ndarray]:
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays]
    optimizer = make_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.from_numpy(g.copy())
        optimizer.step()
    return [p.detach().numpy() for p in params]


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=option_id)
def test_sgd_matches_torch(options, dtype):
    import torch
    arrays, grads = initial_arrays(2, dtype), grad_sequence(2, dtype=dtype)
    params = run_qatcore(lambda ps: SGD(ps, lr=0.05, **options), arrays, grads)
    expected = run_torch(
        torch, lambda ps: torch.optim.SGD(ps, lr=0.05, foreach=False, **options), arrays, grads
    )
    tolerance = 1e-12 if dtype == np.float64 else 1e-6
    for p, e in zip(params, expected):
        assert p.data.dtype == e.dtype
        np.testing.assert_allclose(p.data, e, rtol=tolerance, atol=tolerance)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=option_id)
def test_adam_matches_torch(options, dtype):
    import torch
    options = dict(options)
    cls = options.pop("cls")
    torch_cls = torch.optim.AdamW if cls is AdamW else torch.optim.Adam
    kwargs = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, **options)
    arrays, grads = initial_arrays(3, dtype), grad_sequence(3, dtype=dtype)
    params = run_qatcore(lambda ps: cls(ps, **kwargs), arrays, grads)
    expected = run_torch(torch, lambda ps: torch_cls(ps, foreach=False, **kwargs), arrays, grads)
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    for p, e in zip(params, expected):
        assert p.data.dtype == e.dtype
        np.testing.assert_allclose(p.data, e, rtol=tolerance, atol=tolerance)


@pytest.mark.torch
def test_adamw_default_weight_decay_matches_torch():
    import torch
    arrays, grads = initial_arrays(4), grad_sequence(4)
    params = run_qatcore(lambda ps: AdamW(ps), arrays, grads)
    expected = run_torch(torch, lambda ps: torch.optim.AdamW(ps, foreach=False), arrays, grads)
    assert AdamW([Parameter(np.zeros(1))]).defaults["weight_decay"] == 1e-2
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.data, e, rtol=1e-12, atol=1e-14)


# ---- groups, skipping, zero_grad, identity, dtype ---------------------------------------


def test_param_groups_use_their_own_hyperparameters():
    arrays, grads = initial_arrays(5), grad_sequence(5)
    params = [Parameter(a.copy()) for a in arrays]
    optimizer = SGD(
        [{"params": [params[0]]}, {"params": params[1], "lr": 0.01, "momentum": 0.5}],
        lr=0.1,
        momentum=0.9,
    )
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]
    assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.5]
    assert optimizer.param_groups[1]["params"] == [params[1]]  # a bare Parameter is wrapped
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.copy()
        optimizer.step()
    common = {"dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}
    first = sgd_reference(arrays[:1], [g[:1] for g in grads], lr=0.1, momentum=0.9, **common)
    second = sgd_reference(arrays[1:], [g[1:] for g in grads], lr=0.01, momentum=0.5, **common)
    np.testing.assert_allclose(params[0].data, first[0], rtol=1e-12)
    np.testing.assert_allclose(params[1].data, second[0], rtol=1e-12)


def test_add_param_group_takes_defaults():
    a, b = Parameter(np.ones(2)), Parameter(np.ones(3))
    optimizer = Adam([a], lr=0.5, betas=[0.5, 0.6])
    optimizer.add_param_group({"params": [b], "eps": 1e-3})
    group = optimizer.param_groups[1]
    assert group["lr"] == 0.5 and group["betas"] == (0.5, 0.6) and group["eps"] == 1e-3
    assert group["params"] == [b]


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9), Adam, AdamW])
def test_parameters_without_grad_are_skipped(make):
    params = [Parameter(np.full(3, float(i))) for i in range(3)]
    before = [p.data.copy() for p in params]
    optimizer = make(params)
    for _ in range(2):
        params[1].grad = np.ones(3)
        optimizer.step()
    np.testing.assert_array_equal(params[0].data, before[0])
    np.testing.assert_array_equal(params[2].data, before[2])
    assert not np.array_equal(params[1].data, before[1])
    assert params[0] not in optimizer.state and params[2] not in optimizer.state
    assert params[1] in optimizer.state
    assert list(optimizer.state_dict()["state"]) == [1]


def test_adam_step_count_is_per_parameter():
    a, b = Parameter(np.ones(2)), Parameter(np.ones(2))
    optimizer = Adam([a, b])
    a.grad = np.ones(2)
    b.grad = np.ones(2)
    optimizer.step()
    b.grad = None
    optimizer.step()
    assert optimizer.state[a]["step"] == 2 and optimizer.state[b]["step"] == 1


def test_zero_grad():
    a, b = Parameter(np.ones(2)), Parameter(np.ones(3))
    optimizer = SGD([a, b], lr=0.1)
    a.grad = np.ones(2)
    grad_array = a.grad
    optimizer.zero_grad(set_to_none=False)
    assert a.grad is grad_array and np.array_equal(a.grad, np.zeros(2))
    assert b.grad is None
    optimizer.zero_grad()
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
        lambda ps: Adam(ps, weight_decay=0.1, amsgrad=True),
        lambda ps: AdamW(ps, amsgrad=True),
    ],
)
def test_updates_keep_parameter_and_array_identity(make):
    params = [Parameter(a) for a in initial_arrays(6)]
    identities = [(id(p), id(p.data)) for p in params]
    optimizer = make(params)
    for step_grads in grad_sequence(6, steps=3):
        for p, g in zip(params, step_grads):
            p.grad = g
        optimizer.step()
    assert [(id(p), id(p.data)) for p in params] == identities
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True, maximize=True),
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.3),
        lambda ps: Adam(ps, weight_decay=0.1, amsgrad=True, maximize=True),
        lambda ps: AdamW(ps, amsgrad=True),
    ],
)
def test_parameters_and_state_keep_their_dtype(make, dtype):
    arrays, grads = initial_arrays(7, dtype), grad_sequence(7, dtype=dtype)
    params = [Parameter(a.copy()) for a in arrays]
    optimizer = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.copy()
        optimizer.step()
    for p in params:
        assert p.data.dtype == dtype
        arrays_in_state = [v for v in optimizer.state[p].values() if isinstance(v, np.ndarray)]
        assert arrays_in_state and all(v.dtype == dtype for v in arrays_in_state)
    # Computed in the parameter's precision, yet the same update as in float64.
    wide = run_qatcore(
        make,
        [a.astype(np.float64) for a in arrays],
        [[g.astype(np.float64) for g in gs] for gs in grads],
    )
    for p, w in zip(params, wide):
        np.testing.assert_allclose(p.data, w.data, rtol=1e-4, atol=1e-5)


def test_grad_of_wrong_dtype_or_shape_is_refused():
    p = Parameter(np.ones(3, dtype=np.float32))
    optimizer = SGD([p], lr=0.1)
    p.grad = np.ones(3, dtype=np.float64)
    with pytest.raises(DTypeError, match="float32 parameter has a float64 grad"):
        optimizer.step()
    p.grad = np.ones(4, dtype=np.float32)
    with pytest.raises(ShapeError, match=r"shape \(3,\) has a grad of shape \(4,\)"):
        optimizer.step()
    np.testing.assert_array_equal(p.data, np.ones(3, dtype=np.float32))


# ---- state dicts -----------------------------------------------------------------------


STATEFUL = {
    "sgd-nesterov": lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
    "sgd-dampening": lambda ps: SGD(ps, lr=0.05, momentum=0.8, dampening=0.2, maximize=True),
    "adam-amsgrad": lambda ps: Adam(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
    "adamw": lambda ps: AdamW(ps, lr=0.01, betas=(0.85, 0.99)),
}


def grouped(make):
    """``make`` over two param groups, the second with its own lr."""
    return lambda ps: make([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.003}])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_state_dict_round_trip_is_bit_identical(name, dtype):
    make = grouped(STATEFUL[name])
    grads = grad_sequence(8, steps=7, dtype=dtype)
    params = [Parameter(a) for a in initial_arrays(8, dtype)]
    optimizer = make(params)
    for step_grads in grads[:3]:
        for p, g in zip(params, step_grads):
            p.grad = g.copy()
        optimizer.step()
    saved = optimizer.state_dict()
    assert is_plain(saved)

    fresh = [Parameter(p.data.copy()) for p in params]
    # Built with other hyper-parameters: loading must restore them too.
    restored = STATEFUL[name]([{"params": fresh[:1], "lr": 9.0}, {"params": fresh[1:]}])
    restored.load_state_dict(saved)
    assert_state_dicts_equal(restored.state_dict(), saved)

    for step_grads in grads[3:]:
        for p, q, g in zip(params, fresh, step_grads):
            p.grad, q.grad = g.copy(), g.copy()
        optimizer.step()
        restored.step()
    for p, q in zip(params, fresh):
        assert q.data.dtype == dtype
        np.testing.assert_array_equal(p.data, q.data)
    assert_state_dicts_equal(restored.state_dict(), optimizer.state_dict())


def test_state_dict_format():
    a, b = Parameter(np.ones(2)), Parameter(np.ones((2, 2)))
    optimizer = Adam([{"params": [a]}, {"params": [b], "amsgrad": True}], lr=0.1)
    a.grad = np.ones(2)
    optimizer.step()
    saved = optimizer.state_dict()
    assert list(saved) == ["state", "param_groups"]
    assert list(saved["state"]) == [0]
    assert saved["state"][0]["step"] == 1 and isinstance(saved["state"][0]["step"], int)
    assert sorted(saved["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    assert saved["param_groups"][0]["params"] == [0]
    assert saved["param_groups"][1]["params"] == [1]
    assert saved["param_groups"][0]["betas"] == [0.9, 0.999]  # a list, not a tuple
    assert saved["param_groups"][1]["amsgrad"] is True
    assert is_plain(saved)


def test_state_dict_is_a_deep_copy():
    p = Parameter(np.ones(3))
    optimizer = Adam([p], lr=0.1)
    p.grad = np.ones(3)
    optimizer.step()
    before = copy.deepcopy(optimizer.state_dict())
    saved = optimizer.state_dict()
    saved["state"][0]["exp_avg"][...] = 99.0
    saved["state"][0]["step"] = 50
    saved["param_groups"][0]["lr"] = 5.0
    saved["param_groups"][0]["betas"][0] = 0.1
    saved["param_groups"][0]["params"].append(3)
    assert_state_dicts_equal(optimizer.state_dict(), before)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_load_state_dict_copies_its_input():
    p = Parameter(np.ones(3))
    optimizer = SGD([p], lr=0.1, momentum=0.9)
    p.grad = np.ones(3)
    optimizer.step()
    saved = optimizer.state_dict()
    other = SGD([Parameter(np.ones(3))], lr=0.1, momentum=0.9)
    other.load_state_dict(saved)
    saved["state"][0]["momentum_buffer"][...] = 42.0
    saved["param_groups"][0]["lr"] = 7.0
    assert other.param_groups[0]["lr"] == 0.1
    np.testing.assert_array_equal(other.state_dict()["state"][0]["momentum_buffer"], np.ones(3))


def corrupt(path, value):
    """A mutation that sets ``sd[path...] = value`` (or deletes it for ``DELETE``)."""

    def mutate(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return sd

    return mutate


DELETE = object()

BAD_STATE_DICTS = {
    "not-a-dict": (lambda sd: [sd], "expected a dict with keys"),
    "missing-state": (corrupt(["state"], DELETE), "expected a dict with keys"),
    "extra-top-key": (corrupt(["extra"], 1), "expected a dict with keys"),
    "group-count": (
        lambda sd: {**sd, "param_groups": sd["param_groups"] * 2},
        "has 2 param groups, the optimizer has 1",
    ),
    "param-count": (
        corrupt(["param_groups", 0, "params"], [0]),
        r"param_groups\[0\] has 1 parameters in the state dict, 2 in the optimizer",
    ),
    "duplicate-index": (corrupt(["param_groups", 0, "params"], [0, 0]), "appears twice"),
    "missing-hyperparameter": (
        corrupt(["param_groups", 0, "eps"], DELETE),
        r"param_groups\[0\]: missing hyper-parameter\(s\) \['eps'\]",
    ),
    "unknown-hyperparameter": (corrupt(["param_groups", 0, "nesterov"], True), "unknown"),
    "bad-hyperparameter": (
        corrupt(["param_groups", 0, "lr"], -1.0),
        r"param_groups\[0\]: lr = -1.0 is outside",
    ),
    "bad-betas": (corrupt(["param_groups", 0, "betas"], [0.9]), "betas must be a pair"),
    "index-out-of-range": (
        corrupt(["state", 7], {"step": 1}),
        "parameter index 7, which no param group lists",
    ),
    "shape": (
        corrupt(["state", 1, "exp_avg"], np.zeros(4)),
        r"state\[1\]\['exp_avg'\] has shape \(4,\), the parameter has shape \(2, 2\)",
    ),
    "unknown-state-key": (corrupt(["state", 0, "momentum"], np.zeros(3)), r"unknown key\(s\)"),
    "missing-state-key": (
        corrupt(["state", 0, "exp_avg_sq"], DELETE),
        r"state\[0\]: unknown key\(s\) \[\], missing \['exp_avg_sq'\]",
    ),
    "missing-amsgrad-state": (
        corrupt(["param_groups", 0, "amsgrad"], True),
        r"missing \['max_exp_avg_sq'\]",
    ),
    "int-array": (
        corrupt(["state", 0, "exp_avg"], np.zeros(3, dtype=np.int64)),
        "must be a float numpy array, got ndarray of dtype int64",
    ),
    "list-not-array": (corrupt(["state", 0, "exp_avg"], [0.0] * 3), "must be a float numpy"),
    "float-step": (corrupt(["state", 0, "step"], 1.5), r"\['step'\] must be an int"),
    "negative-step": (corrupt(["state", 0, "step"], -1), r"\['step'\] must be >= 0"),
}


@pytest.mark.parametrize("name", list(BAD_STATE_DICTS))
def test_bad_state_dicts_are_refused_without_changes(name):
    mutate, message = BAD_STATE_DICTS[name]
    a, b = Parameter(np.ones(3)), Parameter(np.ones((2, 2)))
    optimizer = Adam([a, b], lr=0.1)
    a.grad, b.grad = np.ones(3), np.ones((2, 2))
    optimizer.step()
    before = optimizer.state_dict()
    with pytest.raises(StateDictError, match=message):
        optimizer.load_state_dict(mutate(optimizer.state_dict()))
    assert_state_dicts_equal(optimizer.state_dict(), before)


def test_state_dict_of_another_optimizer_is_refused():
    p = Parameter(np.ones(3))
    sgd = SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises(StateDictError, match="was it saved by a different optimizer"):
        Adam([p]).load_state_dict(sgd.state_dict())


# ---- parameters added after construction ----------------------------------------------


def test_optimizers_holding_knows_live_optimizers_only_and_keeps_none_alive():
    w = Parameter(np.ones(3))
    first, second = SGD([w], lr=0.1), Adam([w])
    other = SGD([Parameter(np.ones(1))], lr=0.1)
    assert optimizers_holding(w) == [first, second]  # oldest first
    assert optimizers_holding(Parameter(np.ones(3))) == [] and other.holds(w) is False
    gone = weakref.ref(second)
    del second
    gc.collect()
    assert gone() is None  # the registry holds optimizers weakly
    assert optimizers_holding(w) == [first]


@pytest.mark.parametrize("name", list(STATEFUL))
def test_added_parameters_join_the_anchor_group_with_empty_state(name):
    weight, bias = (Parameter(a) for a in initial_arrays(3))
    optimizer = grouped(STATEFUL[name])([weight, bias])
    for p, g in zip((weight, bias), grad_sequence(3, steps=1)[0]):
        p.grad = g
    optimizer.step()
    scale = Parameter(np.full(5, 0.5))
    assert optimizer.add_to_group_of(bias, [scale]) == [scale]
    assert [len(group["params"]) for group in optimizer.param_groups] == [1, 2]
    assert scale not in optimizer.state

    # it is updated exactly as a parameter of that group built in from the start would be
    reference_scale = Parameter(np.full(5, 0.5))
    reference = STATEFUL[name]([{"params": [reference_scale], "lr": 0.003}])
    for step in range(3):
        grad = np.random.default_rng(step).standard_normal(5)
        scale.grad, reference_scale.grad = grad.copy(), grad.copy()
        weight.grad = bias.grad = None
        optimizer.step()
        reference.step()
    np.testing.assert_array_equal(scale.data, reference_scale.data)


def test_a_parameter_added_twice_is_held_and_stepped_once():
    weight, scale = Parameter(np.zeros(2)), Parameter(np.ones(1))
    optimizer = SGD([weight], lr=0.5)
    assert optimizer.add_to_group_of(weight, [scale, scale]) == [scale]
    assert optimizer.add_to_group_of(weight, [scale]) == []
    assert optimizer.add_to_group_of(scale, [weight]) == []  # held already, in any group
    assert len(optimizer.param_groups[0]["params"]) == 2
    scale.grad = np.ones(1)
    optimizer.step()
    np.testing.assert_array_equal(scale.data, [0.5])  # one step of lr * grad, not two
    with pytest.raises(ConfigError, match="appears more than once"):
        optimizer.add_param_group({"params": [scale]})


def test_add_to_group_of_refuses_what_add_param_group_refuses():
    weight = Parameter(np.zeros(2))
    optimizer = SGD([weight], lr=0.5)
    with pytest.raises(ConfigError, match="no param group holds the anchor"):
        optimizer.add_to_group_of(Parameter(np.zeros(2)), [Parameter(np.zeros(1))])
    with pytest.raises(ConfigError, match="is a ndarray"):
        optimizer.add_to_group_of(weight, [np.zeros(1)])
    assert optimizer.param_groups[0]["params"] == [weight]


@pytest.mark.parametrize("name", list(STATEFUL))
def test_state_dict_round_trip_with_added_parameters(name):
    def build(arrays):
        params = [Parameter(a.copy()) for a in arrays]
        optimizer = grouped(STATEFUL[name])(params[:2])
        optimizer.add_to_group_of(params[0], [params[2]])
        return params, optimizer

    arrays = initial_arrays(4) + [np.full(3, 0.25)]
    grads = [step + [np.random.default_rng(i).standard_normal(3)] for i, step in enumerate(grad_sequence(4, 6))]
    params, optimizer = build(arrays)
    for step_grads in grads[:3]:
        for p, g in zip(params, step_grads):
            p.grad = g.copy()
        optimizer.step()
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["params"] == [0, 1] and saved["param_groups"][1]["params"] == [2]
    fresh, restored = build([p.data for p in params])
    restored.load_state_dict(saved)
    assert_state_dicts_equal(restored.state_dict(), saved)
    for step_grads in grads[3:]:
        for p, q, g in zip(params, fresh, step_grads):
            p.grad, q.grad = g.copy(), g.copy()
        optimizer.step()
        restored.step()
    for p, q in zip(params, fresh):
        np.testing.assert_array_equal(p.data, q.data)


# ---- construction and hyper-parameter validation ---------------------------------------


def test_invalid_parameter_lists():
    p, q = Parameter(np.ones(2)), Parameter(np.ones(2))
    with pytest.raises(ConfigError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(ConfigError, match="empty parameter list"):
        SGD(iter([]), lr=0.1)
    with pytest.raises(ConfigError, match="wrap it in a list"):
        SGD(p, lr=0.1)
    with pytest.raises(ConfigError, match=r"params\[1\] appears more than once"):
        SGD([p, p], lr=0.1)
    with pytest.raises(ConfigError, match=r"param group 1: params\[0\] appears more than once"):
        SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ConfigError, match=r"params\[1\] is a ndarray"):
        SGD([p, np.ones(2)], lr=0.1)
    with pytest.raises(ConfigError, match=r"params\[2\] has requires_grad=False and is not a Parameter"):
        SGD([p, q, Tensor(np.ones(2))], lr=0.1)
    with pytest.raises(ConfigError, match=r"params\[0\] is not a leaf"):
        SGD([p * 2.0], lr=0.1)
    with pytest.raises(ConfigError, match="mixes Parameters and param-group dicts"):
        SGD([p, {"params": [q]}], lr=0.1)
    with pytest.raises(ConfigError, match="'params' is empty"):
        SGD([{"params": []}], lr=0.1)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        SGD([{"params": [p], "learning_rate": 0.1}], lr=0.1)
    with pytest.raises(ConfigError, match="param group 1: momentum = -1"):
        SGD([{"params": [p]}, {"params": [q], "momentum": -1}], lr=0.1)
    # A plain Tensor that requires grad is accepted, like in torch.
    assert SGD([Tensor(np.ones(2), requires_grad=True)], lr=0.1).param_groups[0]["lr"] == 0.1


INVALID_HYPERPARAMETERS = [
    (SGD, {"lr": -0.1}, r"SGD: lr = -0.1 is outside the accepted range \[0.0, inf\]"),
    (SGD, {"lr": math.nan}, "SGD: lr = nan is outside"),
    (SGD, {"lr": "0.1"}, "SGD: lr must be a real number, got '0.1'"),
    (SGD, {"lr": 0.1, "momentum": -0.5}, "SGD: momentum = -0.5 is outside"),
    (SGD, {"lr": 0.1, "dampening": 1.5}, r"SGD: dampening = 1.5 .* \[0.0, 1.0\]"),
    (SGD, {"lr": 0.1, "weight_decay": -1e-4}, "SGD: weight_decay = -0.0001 is outside"),
    (SGD, {"lr": 0.1, "nesterov": True}, "nesterov=True needs momentum > 0"),
    (SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "dampening == 0"),
    (SGD, {"lr": 0.1, "nesterov": "yes"}, "SGD: nesterov must be True or False"),
    (SGD, {"lr": 0.1, "maximize": 1}, "SGD: maximize must be True or False"),
]
for _cls in (Adam, AdamW):
    _n = _cls.__name__
    INVALID_HYPERPARAMETERS += [
        (_cls, {"lr": -1.0}, rf"{_n}: lr = -1.0 is outside the accepted range \[0.0, inf\]"),
        (_cls, {"betas": (1.0, 0.999)}, rf"{_n}: betas\[0\] = 1.0 .* \[0.0, 1.0\)"),
        (_cls, {"betas": (0.9, -0.1)}, rf"{_n}: betas\[1\] = -0.1 is outside"),
        (_cls, {"betas": (0.9,)}, rf"{_n}: betas must be a pair"),
        (_cls, {"eps": -1e-8}, rf"{_n}: eps = -1e-08 is outside"),
        (_cls, {"weight_decay": -0.01}, rf"{_n}: weight_decay = -0.01 is outside"),
        (_cls, {"amsgrad": None}, rf"{_n}: amsgrad must be True or False"),
        (_cls, {"maximize": "no"}, rf"{_n}: maximize must be True or False"),
    ]


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    INVALID_HYPERPARAMETERS,
    ids=[
        f"{c.__name__}-{next(iter(k))}-{i}" for i, (c, k, _) in enumerate(INVALID_HYPERPARAMETERS)
    ],
)
def test_invalid_hyperparameters(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls([Parameter(np.ones(2))], **kwargs)


def test_optimizer_base_is_abstract():
    with pytest.raises(TypeError):
        qatcore.optim.Optimizer([Parameter(np.ones(2))], {"lr": 0.1})


# ---- learning-rate schedulers ---------------------------------------------------------


def two_group_sgd(lrs=(0.1, 0.02)) -> SGD:
    return SGD([{"params": [Parameter(np.ones(2))], "lr": lr} for lr in lrs], lr=1.0, momentum=0.9)


def collect_lrs(optimizer, scheduler, epochs):
    history = []
    for _ in range(epochs):
        history.append([g["lr"] for g in optimizer.param_groups])
        assert scheduler.get_last_lr() == history[-1]
        optimizer.step()
        scheduler.step()
    return history


def test_step_lr_follows_closed_form():
    optimizer = two_group_sgd()
    scheduler = StepLR(optimizer, step_size=3, gamma=0.5)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.02]
    assert scheduler.last_epoch == 0
    history = collect_lrs(optimizer, scheduler, 13)
    for epoch, lrs in enumerate(history):
        assert lrs == pytest.approx([b * 0.5 ** (epoch // 3) for b in (0.1, 0.02)], rel=1e-15)
    assert scheduler.last_epoch == 13
    scheduler.get_last_lr().append(1.0)  # a copy
    assert len(scheduler.get_last_lr()) == 2


def test_cosine_annealing_follows_closed_form():
    optimizer = two_group_sgd()
    scheduler = CosineAnnealingLR(optimizer, T_max=5, eta_min=0.001)
    history = collect_lrs(optimizer, scheduler, 13)
    for epoch, lrs in enumerate(history):
        expected = [
            0.001 + (b - 0.001) * (1 + math.cos(math.pi * epoch / 5)) / 2 for b in (0.1, 0.02)
        ]
        assert lrs == pytest.approx(expected, rel=1e-15)
    assert history[5] == pytest.approx([0.001, 0.001], rel=1e-15)
    assert history[10] == pytest.approx([0.1, 0.02], rel=1e-15)  # the cosine continues


@pytest.mark.torch
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda o: StepLR(o, 4, gamma=0.3), lambda t, o: t.optim.lr_scheduler.StepLR(o, 4, 0.3)),
        (
            lambda o: CosineAnnealingLR(o, 7, eta_min=0.002),
            lambda t, o: t.optim.lr_scheduler.CosineAnnealingLR(o, 7, eta_min=0.002),
        ),
    ],
)
def test_schedulers_match_torch(ours, theirs):
    import torch
    optimizer = two_group_sgd()
    scheduler = ours(optimizer)
    torch_optimizer = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr} for lr in (0.1, 0.02)], lr=1.0
    )
    torch_scheduler = theirs(torch, torch_optimizer)
    for _ in range(20):
        assert scheduler.get_last_lr() == pytest.approx(
            torch_scheduler.get_last_lr(), rel=1e-9, abs=1e-14
        )
        torch_optimizer.step()
        torch_scheduler.step()
        scheduler.step()


@pytest.mark.parametrize(
    "make",
    [lambda o: StepLR(o, step_size=2, gamma=0.7), lambda o: CosineAnnealingLR(o, 6, 0.01)],
)
def test_scheduler_state_dict_round_trip(make):
    optimizer = two_group_sgd()
    scheduler = make(optimizer)
    collect_lrs(optimizer, scheduler, 4)
    saved = scheduler.state_dict()
    assert is_plain(saved) and saved["last_epoch"] == 4

    # The resume order torch documents: build both, then load both.
    other_optimizer = two_group_sgd(lrs=(5.0, 6.0))
    other = make(other_optimizer)
    other_optimizer.load_state_dict(optimizer.state_dict())
    other.load_state_dict(saved)
    saved["base_lrs"][0] = 123.0  # loading copied it
    assert other.state_dict() == scheduler.state_dict()
    assert collect_lrs(other_optimizer, other, 9) == collect_lrs(optimizer, scheduler, 9)
    assert other.last_epoch == scheduler.last_epoch == 13


def test_scheduler_state_dict_restores_hyperparameters():
    scheduler = StepLR(two_group_sgd(), step_size=2)
    scheduler.load_state_dict({**scheduler.state_dict(), "step_size": 5, "gamma": 0.5})
    assert (scheduler.step_size, scheduler.gamma) == (5, 0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda sd: {k: v for k, v in sd.items() if k != "gamma"}, "expected keys"),
        (lambda sd: {**sd, "T_max": 3}, "expected keys"),
        (lambda sd: {**sd, "base_lrs": [0.1]}, "base_lrs must be a list of 2"),
        (lambda sd: {**sd, "last_lr": [0.1, -0.2]}, r"last_lr\[1\] = -0.2 is outside"),
        (lambda sd: {**sd, "last_epoch": -3}, "last_epoch must be an int >= 0"),
        (lambda sd: {**sd, "step_size": 0}, "step_size must be an int >= 1"),
        (lambda sd: {**sd, "step_size": 3, "gamma": 0.0}, r"gamma = 0.0 .* \(0.0, inf\]"),
    ],
)
def test_bad_scheduler_state_dicts_are_refused_without_changes(change, message):
    scheduler = StepLR(two_group_sgd(), step_size=2, gamma=0.5)
    scheduler.step()
    before = scheduler.state_dict()
    with pytest.raises(StateDictError, match=message):
        scheduler.load_state_dict(change(scheduler.state_dict()))
    assert scheduler.state_dict() == before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda o: StepLR(o, step_size=0), "StepLR: step_size must be an int >= 1, got 0"),
        (lambda o: StepLR(o, step_size=2.5), "StepLR: step_size must be an int >= 1, got 2.5"),
        (lambda o: StepLR(o, 2, gamma=0.0), r"StepLR: gamma = 0.0 is outside .* \(0.0, inf\]"),
        (lambda o: StepLR(o, 2, gamma=-0.5), "StepLR: gamma = -0.5 is outside"),
        (lambda o: CosineAnnealingLR(o, T_max=0), "T_max must be an int >= 1, got 0"),
        (lambda o: CosineAnnealingLR(o, 3, eta_min=-1e-3), "eta_min = -0.001 is outside"),
        (lambda o: StepLR(o, 2, last_epoch=-2), "last_epoch must be an int >= -1"),
        (lambda o: StepLR(o, 2, last_epoch=3), "needs 'initial_lr' in param group 0"),
        (lambda o: StepLR(object(), 2), "optimizer must be a qatcore Optimizer"),
    ],
)
def test_invalid_scheduler_hyperparameters(make, message):
    with pytest.raises(ConfigError, match=message):
        make(two_group_sgd())


def test_scheduler_resumes_from_last_epoch():
    optimizer = two_group_sgd()
    StepLR(optimizer, step_size=2, gamma=0.5)
    for group in optimizer.param_groups:
        group["lr"] = 99.0  # the closed form does not depend on the current lr
    resumed = StepLR(optimizer, step_size=2, gamma=0.5, last_epoch=4)
    assert resumed.last_epoch == 5
    assert resumed.get_last_lr() == pytest.approx([0.1 * 0.25, 0.02 * 0.25], rel=1e-15)


def test_scheduled_lr_drives_the_update():
    p = Parameter(np.zeros(1))
    optimizer = SGD([p], lr=1.0)
    scheduler = StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        p.grad = np.ones(1)
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(p.data, [-(1.0 + 0.5 + 0.25)], rtol=1e-15)
    assert optimizer.state_dict()["param_groups"][0]["initial_lr"] == 1.0


# ---- docstring examples ---------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        qatcore.optim,
        qatcore.optim.optimizer,
        qatcore.optim.sgd,
        qatcore.optim.adam,
        qatcore.optim.lr_scheduler,
    ],
    ids=lambda m: m.__name__,
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0 or module is qatcore.optim


def test_frozen_parameters_are_accepted_and_skipped():
    from qatcore.nn import Parameter

    trained = Parameter(np.ones(2, dtype=np.float32))
    frozen = Parameter(np.ones(2, dtype=np.float32), requires_grad=False)
    optimizer = SGD([trained, frozen], lr=0.5)
    trained.grad = np.ones(2, dtype=np.float32)
    optimizer.step()
    np.testing.assert_array_equal(trained.data, [0.5, 0.5])
    np.testing.assert_array_equal(frozen.data, [1.0, 1.0])
