"""Issue 19's acceptance: "TinyGPT ... checkpoints with exact resume". A QAT TinyGPT under
8da4w (and under its LSQ group-scale variant, and ternary weights with quantized embedding
and attention) trains k steps with AdamW, saves a QAT checkpoint and trains m more; the
checkpoint loaded into a freshly prepared model with a fresh optimizer then runs the same m
steps on the same batches (drawn from a generator the checkpoint restores). Parameters,
quantizer scales, every buffer, optimizer state, statistics and losses equal bit for bit."""

import numpy as np
import pytest

import qatcore
from qatcore.errors import CheckpointError
from qatcore.models import TinyGPT
from qatcore.nn import functional as F
from qatcore.optim import AdamW
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.qat import (
    QATPreparer,
    StatisticsConfig,
    learnable_quantizer_parameters,
    load_qat_checkpoint,
    read_qat_checkpoint,
    save_qat_checkpoint,
)

VOCABULARY, K, M = 11, 3, 4


def gpt() -> TinyGPT:
    return TinyGPT(vocabulary_size=VOCABULARY, block_size=16, n_layer=2, n_embd=64, n_head=4)


def eight_da_four_w() -> QuantizationConfig:
    return QuantizationConfig.int8_dynamic_activation_int4_weight()


def lsq_group_variant() -> QuantizationConfig:
    config = eight_da_four_w()
    return config.replace(weight=config.weight.replace(learnable="lsq"))


def ternary_everywhere() -> QuantizationConfig:
    config = QuantizationConfig.ternary_weight(group_size=32)
    return config.replace(embedding=config.weight, attention=config.activation)


CONFIGS = {"8da4w": eight_da_four_w, "8da4w_lsq": lsq_group_variant, "ternary_embedding_attention": ternary_everywhere}


def make_optimizer(parameters) -> AdamW:
    return AdamW(parameters, lr=3e-3, weight_decay=0.1)


def preparer() -> QATPreparer:
    return QATPreparer(statistics=StatisticsConfig(every=2))  # sample steps 0, 2, 4, 6: flip rates span the save


def train(qat, optimizer, rng: np.random.Generator, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = rng.integers(0, VOCABULARY, size=(4, 16))
        optimizer.zero_grad()
        loss = F.cross_entropy(qat(x).reshape(-1, VOCABULARY), x.reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.data))
    return losses


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def run_then_resume(config, tmp_path, optimizer_built: str, resumed_optimizer_built: str | None = None):
    """(straight run, resumed run, checkpoint path): each run (losses of the last M steps, model,
    optimizer, preparer); each optimizer built "before" preparation from the float model's
    parameters (preparation adds the learned scales) or "after" it from the QAT model's."""
    rng = np.random.default_rng(0)
    first = preparer()
    model = gpt()
    optimizer = make_optimizer(model.parameters()) if optimizer_built == "before" else None
    qat = first.prepare_for_qat(model, config)
    optimizer = optimizer or make_optimizer(qat.parameters())
    train(qat, optimizer, rng, K)
    path = tmp_path / "tiny_gpt.qatckpt"
    save_qat_checkpoint(path, qat, optimizer, preparer=first, extra={"step": K}, generators={"data": rng})
    straight = train(qat, optimizer, rng, M)

    resumed_rng = np.random.default_rng(12345)   # any state: the checkpoint restores it
    second = preparer()
    fresh_model = gpt()
    resumed_optimizer_built = resumed_optimizer_built or optimizer_built
    fresh_optimizer = make_optimizer(fresh_model.parameters()) if resumed_optimizer_built == "before" else None
    fresh = second.prepare_for_qat(fresh_model, config)
    fresh_optimizer = fresh_optimizer or make_optimizer(fresh.parameters())
    info = load_qat_checkpoint(path, fresh, fresh_optimizer, generators={"data": resumed_rng})
    assert (info.kind, info.extra, info.step) == ("qat", {"step": K}, K)
    resumed = train(fresh, fresh_optimizer, resumed_rng, M)
    return (straight, qat, optimizer, first), (resumed, fresh, fresh_optimizer, second), path


@pytest.mark.parametrize("optimizer_built, resumed_optimizer_built", [("after", "after"), ("before", "before"),
                                                                     ("before", "after")])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_gpt_resumes_exactly(name, optimizer_built, resumed_optimizer_built, tmp_path):
    # ("before", "after"): the two optimizers list the parameters in other orders (the learned scales
    # last, or beside their layers); the checkpoint matches their state by name
    (losses, qat, optimizer, first), (resumed_losses, fresh, fresh_optimizer, second), _ = run_then_resume(
        CONFIGS[name](), tmp_path, optimizer_built, resumed_optimizer_built)
    assert resumed_losses == losses                                  # bit for bit: Python floats of float32
    assert_same_state(fresh.state_dict(), qat.state_dict())          # weights, scales, switches, step count
    assert int(fresh.state_dict()["qat_controller.step_count"]) == K + M
    for (name_a, a), (name_b, b) in zip(qat.named_parameters(), fresh.named_parameters()):
        assert name_a == name_b
        np.testing.assert_array_equal(a.data, b.data, err_msg=name_a)
    names = {id(p): n for n, p in qat.named_parameters()}
    fresh_names = {id(p): n for n, p in fresh.named_parameters()}
    if optimizer_built == resumed_optimizer_built:
        assert qatcore.dumps(fresh_optimizer.state_dict()) == qatcore.dumps(optimizer.state_dict())
    # per parameter, by name, whatever the order
    state = {names[id(p)]: optimizer.state[p] for group in optimizer.param_groups for p in group["params"]}
    fresh_state = {fresh_names[id(p)]: fresh_optimizer.state[p] for group in fresh_optimizer.param_groups
                   for p in group["params"]}
    assert sorted(state) == sorted(fresh_state) == sorted(names.values())
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    fresh_order = [fresh_names[id(p)] for group in fresh_optimizer.param_groups for p in group["params"]]
    assert (order == fresh_order) == (optimizer_built == resumed_optimizer_built or name != "8da4w_lsq")
    for key, value in state.items():
        assert qatcore.dumps(fresh_state[key]) == qatcore.dumps(value), key
    assert qatcore.dumps(second.get_qat_statistics(fresh).to_dict()) == qatcore.dumps(
        first.get_qat_statistics(qat).to_dict())


def test_lsq_group_scales_are_restored_into_the_placeholder_parameters(tmp_path):
    (_, qat, optimizer, _), (_, fresh, fresh_optimizer, _), path = run_then_resume(
        lsq_group_variant(), tmp_path, "after")
    saved = read_qat_checkpoint(path)["model"]
    scales = learnable_quantizer_parameters(fresh)
    assert len(scales) == 9
    for name, scale in scales:
        # saved after K steps with one scale per group of 32 weights
        layer = fresh.get_submodule(name.rsplit(".", 2)[0])
        assert saved[name].shape == (layer.weight.data.size // 32,) and saved[name].dtype == np.float32
        assert bool(saved[name.replace(".scale", ".qparams_ready")])
        # the resumed run trained the very Parameters its optimizer holds (loading kept their identity)
        assert fresh_optimizer.holds(scale) and scale.grad is not None
        np.testing.assert_array_equal(scale.data, qat.get_submodule(name.rsplit(".", 1)[0]).scale.data)
        assert not np.array_equal(scale.data, saved[name])       # and they moved after the load
    assert any(len(state) for state in fresh_optimizer.state_dict()["state"].values())


def test_from_checkpoint_rebuilds_the_model_and_resumes_exactly(tmp_path):
    (losses, qat, optimizer, _), _, path = run_then_resume(lsq_group_variant(), tmp_path, "after")
    rng = np.random.default_rng(7)   # any state: the checkpoint restores it
    rebuilt, info = QATPreparer.from_checkpoint(path, gpt(), make_optimizer, generators={"data": rng})
    assert rebuilt.qat_controller.layerwise_config.global_config == lsq_group_variant()
    assert train(rebuilt, info.optimizer, rng, M) == losses
    assert_same_state(rebuilt.state_dict(), qat.state_dict())
    assert qatcore.dumps(info.optimizer.state_dict()) == qatcore.dumps(optimizer.state_dict())


@pytest.mark.parametrize("other", [
    lambda: QuantizationConfig.int8_dynamic_activation_int4_weight(group_size=64),
    lambda: QuantizationConfig.int4_weight_only(32),
    lsq_group_variant,
], ids=["group_size_64", "weight_only", "lsq"])
def test_a_checkpoint_does_not_load_into_a_model_prepared_otherwise(other, tmp_path):
    qat = preparer().prepare_for_qat(gpt(), eight_da_four_w())
    optimizer = make_optimizer(qat.parameters())
    train(qat, optimizer, np.random.default_rng(0), 1)
    path = tmp_path / "run.qatckpt"
    save_qat_checkpoint(path, qat, optimizer)
    wrong = preparer().prepare_for_qat(gpt(), other())
    before = {key: value.copy() for key, value in wrong.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"saved from a model prepared with other settings \(layerwise_config\)"
                                              r".* \(nothing was changed\)"):
        load_qat_checkpoint(path, wrong, make_optimizer(wrong.parameters()))
    assert_same_state(wrong.state_dict(), before)
