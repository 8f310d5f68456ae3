"""Learned quantization parameters (LSQ scales, LSQ+ zero points) and the optimizers that train
them: an optimizer built before preparation trains them with the loop unchanged, one built after
holds each once, state dicts and checkpoints resume exactly, and a Parameter no optimizer holds is
refused at the first training step."""

import numpy as np
import pytest

import qatcore
from qatcore.data import load_digits
from qatcore.errors import CheckpointError, ConfigError
from qatcore.models import DigitsCNN
from qatcore.optim import SGD, Adam, AdamW, CosineAnnealingLR
from qatcore.pipeline import RunSettings, train_float
from qatcore.quantization import QuantizationConfig, QuantSpec
from qatcore.quantization.qat import (
    QATPreparer,
    learnable_quantizer_parameters,
    load_qat_checkpoint,
    save_qat_checkpoint,
)
from qatcore.quantization.qat.quantizer_parameters import add_to_optimizers
from qatcore.quantization.qat.training_integration import controller_of
from qatcore.training import evaluate_accuracy, train_one_epoch

LSQ = QuantizationConfig.lsq_4bit_weights()  # learned weight scales, fixed activation ranges
LSQ_PLUS = QuantizationConfig(  # and learned activation scales and zero points (4-bit: some values clip,
    weight=LSQ.weight,           # which is where a zero point gets its gradient)
    activation=QuantSpec(bits=4, signed=False, scheme="per_tensor_affine", learnable="lsq+"))
OPTIMIZERS = {
    "sgd": lambda params: SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4),
    "adam": lambda params: Adam(params, lr=1e-3),
    "adamw": lambda params: AdamW(params, lr=1e-3),
}


def batches(count, seed=0):
    x, y, _, _ = load_digits()
    order = np.random.default_rng(seed).permutation(len(x))[:64 * count]
    return [(x[order[i:i + 64]], y[order[i:i + 64]]) for i in range(0, len(order), 64)]


def learned(qat):
    return dict(learnable_quantizer_parameters(qat))


def assert_same_parameters(model, other):
    mine, theirs = dict(model.named_parameters()), dict(other.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, param in mine.items():
        np.testing.assert_array_equal(param.data, theirs[name].data, err_msg=name)


# ---- an optimizer built before preparation -------------------------------------------------


@pytest.mark.parametrize("config, kinds", [(LSQ, {"scale"}), (LSQ_PLUS, {"scale", "zero_point"})],
                         ids=["lsq", "lsq+"])
@pytest.mark.parametrize("make_optimizer", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_an_optimizer_built_before_preparation_trains_the_learned_parameters(make_optimizer, config, kinds):
    model = DigitsCNN(rng=np.random.default_rng(0))
    optimizer = make_optimizer(model.parameters())
    qat = QATPreparer().prepare_for_qat(model, config)
    parameters = learned(qat)
    assert {name.rsplit(".", 1)[1] for name in parameters} == kinds
    assert all(optimizer.holds(param) for param in parameters.values())
    data = batches(20)
    train_one_epoch(qat, data[:1], optimizer)  # the first batch also sets the scales up
    start = {name: param.data.copy() for name, param in parameters.items()}
    with_gradient = set()

    def note_gradients(step, loss):
        with_gradient.update(name for name, param in parameters.items() if np.any(param.grad != 0))

    train_one_epoch(qat, data[1:], optimizer, on_step=note_gradients)  # the loop, unchanged
    changed = {name for name, param in parameters.items() if not np.array_equal(param.data, start[name])}
    assert changed == with_gradient
    assert {name for name in parameters if name.endswith("scale")} <= changed
    if "zero_point" in kinds:  # (an input never clipped gives its zero point no gradient)
        assert {"conv1.output_fake_quant.zero_point", "conv2.output_fake_quant.zero_point"} <= changed


def test_learned_parameters_join_the_group_of_their_layer_weight():
    model = DigitsCNN(rng=np.random.default_rng(0))
    named = dict(model.named_parameters())
    decayed = [named[name] for name in ("conv1.weight", "conv2.weight", "fc.weight")]
    optimizer = SGD([{"params": decayed, "weight_decay": 1e-4},
                     {"params": [p for p in named.values() if all(p is not d for d in decayed)]}], lr=0.01)
    qat = QATPreparer().prepare_for_qat(model, LSQ_PLUS)
    parameters = learned(qat)
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    # a layer's quantizers join its weight's group; the input quantizer, which belongs to no layer,
    # joins the group of the model's first parameter (conv1.weight)
    assert {name: group_of[id(param)] for name, param in parameters.items()} == dict.fromkeys(parameters, 0)
    assert len(optimizer.param_groups[0]["params"]) == 3 + len(parameters)
    assert all(param not in optimizer.state for param in parameters.values())


def test_with_several_optimizers_each_trains_the_quantizers_of_its_own_layers():
    model = DigitsCNN(rng=np.random.default_rng(0))
    backbone = SGD([p for name, p in model.named_parameters() if not name.startswith("fc.")], lr=0.01)
    head = Adam(model.fc.parameters())
    qat = QATPreparer().prepare_for_qat(model, LSQ_PLUS)
    holders = {name: [o for o in (backbone, head) if o.holds(param)] for name, param in learned(qat).items()}
    assert holders == {name: [head] if name.startswith("fc.") else [backbone] for name in holders}
    assert "activation_fake_quant.x.scale" in holders  # with the optimizer of the model's first parameter


def test_eager_mode_in_place_adds_them_too():
    model = DigitsCNN(rng=np.random.default_rng(0))
    optimizer = SGD(model.parameters(), lr=0.01)
    qat = QATPreparer(mode="eager", inplace=True).prepare_for_qat(model, LSQ)
    assert qat is model and len(learned(qat)) == 3
    assert all(optimizer.holds(param) for param in learned(qat).values())


# ---- an optimizer built after preparation --------------------------------------------------


def test_an_optimizer_built_after_preparation_holds_and_steps_each_once():
    qat = QATPreparer().prepare_for_qat(DigitsCNN(rng=np.random.default_rng(0)), LSQ_PLUS)
    optimizer = SGD(qat.parameters(), lr=0.5)
    held = [list(group["params"]) for group in optimizer.param_groups]
    add_to_optimizers(qat)  # preparation's rule once more: every parameter is held already
    assert [list(group["params"]) for group in optimizer.param_groups] == held
    train_one_epoch(qat, batches(1), optimizer)  # sets the quantizers up
    optimizer.zero_grad()
    start = {name: param.data.copy() for name, param in learned(qat).items()}
    for param in learned(qat).values():
        param.grad = np.ones_like(param.data)
    optimizer.step()
    for name, param in learned(qat).items():
        np.testing.assert_allclose(param.data, start[name] - 0.5, rtol=1e-6, err_msg=name)  # one step, not two


# ---- state dicts and checkpoints -----------------------------------------------------------


def start_run(make_optimizer=OPTIMIZERS["sgd"]):
    """A DigitsCNN prepared with LSQ+ after its optimizer was built."""
    model = DigitsCNN(rng=np.random.default_rng(0))
    optimizer = make_optimizer(model.parameters())
    preparer = QATPreparer()
    return preparer, preparer.prepare_for_qat(model, LSQ_PLUS), optimizer


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_dict_round_trip_with_learned_parameters(name):
    data = batches(6)
    _, qat, optimizer = start_run(OPTIMIZERS[name])
    train_one_epoch(qat, data[:3], optimizer)
    saved_model, saved_optimizer = qatcore.loads(qatcore.dumps((qat.state_dict(), optimizer.state_dict())))
    assert len(saved_optimizer["state"]) == sum(len(group["params"]) for group in optimizer.param_groups)

    _, resumed, resumed_optimizer = start_run(OPTIMIZERS[name])
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    train_one_epoch(qat, data[3:], optimizer)
    train_one_epoch(resumed, data[3:], resumed_optimizer)
    assert_same_parameters(resumed, qat)


def test_checkpoint_with_such_an_optimizer_resumes_exactly(tmp_path):
    data = batches(8)
    preparer, qat, optimizer = start_run()
    schedule = CosineAnnealingLR(optimizer, T_max=2)  # built before preparation too: it schedules the scales
    train_one_epoch(qat, data[:4], optimizer)
    schedule.step()
    path = tmp_path / "lsq.qatckpt"
    save_qat_checkpoint(path, qat, optimizer, preparer)
    train_one_epoch(qat, data[4:], optimizer)

    # resumed the way it was built: the optimizer before preparation
    _, again, again_optimizer = start_run()
    load_qat_checkpoint(path, again, again_optimizer)
    train_one_epoch(again, data[4:], again_optimizer)
    assert_same_parameters(again, qat)

    # resumed by from_checkpoint: the optimizer is built after preparation and lists the same
    # parameters in another order; the checkpoint matches them by name
    restored, info = QATPreparer.from_checkpoint(path, DigitsCNN(), make_optimizer=OPTIMIZERS["sgd"])
    order = [id(p) for group in info.optimizer.param_groups for p in group["params"]]
    assert order != [id(p) for group in again_optimizer.param_groups for p in group["params"]]
    train_one_epoch(restored, data[4:], info.optimizer)
    assert_same_parameters(restored, qat)
    assert info.optimizer.state_dict()["param_groups"][0]["lr"] == optimizer.param_groups[0]["lr"]


def test_checkpoint_refuses_an_optimizer_holding_other_parameters_and_changes_nothing(tmp_path):
    preparer, qat, optimizer = start_run()
    train_one_epoch(qat, batches(2), optimizer)
    path = tmp_path / "lsq.qatckpt"
    save_qat_checkpoint(path, qat, optimizer, preparer)
    fresh = QATPreparer().prepare_for_qat(DigitsCNN(), LSQ_PLUS)
    zero_points = {id(p) for name, p in learned(fresh).items() if name.endswith("zero_point")}
    partial = SGD([p for p in fresh.parameters() if id(p) not in zero_points], lr=0.01, momentum=0.9)
    split = SGD([{"params": list(learned(fresh).values())},
                 {"params": [p for p in fresh.parameters() if all(p is not q for q in learned(fresh).values())]}],
                lr=0.01)
    for other, message in ((partial, r"holds other parameters .*only saved: \['activation_fake_quant\.x\.zero_point"),
                           (split, "had 1 param groups, this one has 2")):
        before = other.state_dict()
        with pytest.raises(CheckpointError, match=message):
            load_qat_checkpoint(path, fresh, other)
        assert other.state_dict() == before


# ---- nobody holds them: refused at the first training step ---------------------------------


def test_a_learned_parameter_no_optimizer_holds_is_refused_at_the_first_training_step():
    qat = QATPreparer().prepare_for_qat(DigitsCNN(rng=np.random.default_rng(0)), LSQ)
    (x, y), = batches(1)
    with qatcore.no_grad():
        qat(x)  # a calibration pass is no training step
    qat.eval()(x)
    qat.train()
    with pytest.raises(ConfigError, match=r"conv1\.weight_fake_quant\.scale, conv2\.weight_fake_quant\.scale, "
                                          r"fc\.weight_fake_quant\.scale: .*qat_model\.parameters\(\).*"
                                          r"check_optimizers=False"):
        qat(x)
    assert controller_of(qat).current_step == 1  # the refused step was not counted
    optimizer = SGD(qat.parameters(), lr=0.01)  # the fix the message names
    train_one_epoch(qat, [(x, y)], optimizer)
    assert controller_of(qat).current_step == 2


def test_an_optimizer_that_left_them_out_is_refused():
    model = DigitsCNN(rng=np.random.default_rng(0))
    qat = QATPreparer().prepare_for_qat(model, LSQ)
    optimizer = SGD(model.parameters(), lr=0.01)  # after preparation, but the float model's parameters
    with pytest.raises(ConfigError, match="no optimizer holds the learned quantization parameter"):
        train_one_epoch(qat, batches(1), optimizer)


def test_check_optimizers_false_lets_a_loop_update_them_itself(tmp_path):
    preparer = QATPreparer(check_optimizers=False)
    qat = preparer.prepare_for_qat(DigitsCNN(rng=np.random.default_rng(0)), LSQ)
    (x, y), = batches(1)
    for _ in range(2):
        loss = qatcore.nn.functional.cross_entropy(qat(x), y)
        loss.backward()
        for param in qat.parameters():  # a plain update rule, no qatcore optimizer
            param.data -= 0.01 * param.grad
            param.grad = None
    path = tmp_path / "own_rule.qatckpt"
    save_qat_checkpoint(path, qat, preparer=preparer)
    restored, _ = QATPreparer.from_checkpoint(path, DigitsCNN())
    assert controller_of(restored).check_optimizers is False
    with pytest.raises(ConfigError, match="check_optimizers must be True or False"):
        QATPreparer(check_optimizers="no")


# ---- DigitsCNN: before and after give the same model ---------------------------------------


def test_digits_cnn_lsq_4bit_with_the_optimizer_built_before_matches_after(fine_tune):
    float_result = train_float(RunSettings(model="cnn", epochs=12, lr=0.05, batch_size=64, seed=0))
    state = float_result.model.state_dict()
    trained = {}
    for built in ("before", "after"):
        model = DigitsCNN()
        model.load_state_dict(state)
        trained[built] = fine_tune(model, LSQ, optimizer_built=built)[1]
    _, _, x_test, y_test = load_digits()
    before, after = (evaluate_accuracy(trained[built], x_test, y_test) for built in ("before", "after"))
    assert before == after >= float_result.accuracy - 0.02  # 0.978 each (0.961 before, untrained scales)
    assert_same_parameters(trained["before"], trained["after"])  # SGD updates each parameter on its own
