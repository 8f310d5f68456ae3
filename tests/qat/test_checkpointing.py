"""QAT checkpoints: exact resume in a new process, crash safety, fuzzing, versions, warm starts."""

import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest

import qatcore
from qatcore.errors import CheckpointError, StateDictError
from qatcore.models import MLP, DigitsCNN
from qatcore.optim import SGD
from qatcore.quantization import QuantizationConfig
from qatcore.quantization.qat import QATPreparer, load_qat_checkpoint, save_qat_checkpoint
from qatcore.quantization.qat.checkpointing import load_int8_model, read_qat_checkpoint, save_int8_model
from qatcore.quantization.qat.training_integration import QATController

RUN = textwrap.dedent('''
    import sys
    import numpy as np
    import qatcore.nn.functional as F
    from qatcore.data import DataLoader, load_digits
    from qatcore.models import DigitsCNN
    from qatcore.optim import SGD
    from qatcore.quantization.qat import QATPreparer, save_qat_checkpoint
    from qatcore.quantization.qat import StatisticsConfig

    mode, steps, source, target = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    x, y, _, _ = load_digits()
    rng = np.random.default_rng(0)
    loader = DataLoader(x, y, 64, shuffle=True, rng=rng)
    make_optimizer = lambda params: SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    if mode == "fresh":
        preparer = QATPreparer(statistics=StatisticsConfig(every=3))
        qat = preparer.prepare_for_qat(DigitsCNN())
        optimizer = make_optimizer(qat.parameters())
    else:
        qat, info = QATPreparer.from_checkpoint(source, DigitsCNN(), make_optimizer, generators={"data": rng})
        optimizer = info.optimizer
        loader.load_state_dict(info.extra["loader"])

    def batches():
        while True:
            yield from loader

    stream = batches()
    for _ in range(steps):
        xb, yb = next(stream)
        optimizer.zero_grad()
        F.cross_entropy(qat(xb), yb).backward()
        optimizer.step()
    save_qat_checkpoint(target, qat, optimizer, extra={"loader": loader.state_dict()}, generators={"data": rng})
''')


def run(tmp_path, *args):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr


def test_resume_in_a_new_process_is_exact(tmp_path):
    straight, first, resumed = tmp_path / "straight.ckpt", tmp_path / "first.ckpt", tmp_path / "resumed.ckpt"
    run(tmp_path, "fresh", 30, "-", straight)            # N + M = 30 steps (crosses an epoch)
    run(tmp_path, "fresh", 12, "-", first)               # N = 12 ...
    run(tmp_path, "resume", 18, first, resumed)          # ... then M = 18 in a new process
    a, b = read_qat_checkpoint(straight), read_qat_checkpoint(resumed)
    assert list(a["model"]) == list(b["model"])
    for key in a["model"]:
        assert a["model"][key].dtype == b["model"][key].dtype
        np.testing.assert_array_equal(a["model"][key], b["model"][key], err_msg=key)
    for part in ("optimizer", "statistics", "generators", "extra"):
        assert qatcore.dumps(a[part]) == qatcore.dumps(b[part]), part
    assert int(a["model"]["qat_controller.step_count"]) == 30


def test_per_channel_state_loads_into_a_freshly_prepared_model(tmp_path):
    trained = QATPreparer().prepare_for_qat(DigitsCNN())
    trained(np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    path = tmp_path / "state.qat"
    qatcore.save(trained.state_dict(), path)          # the plain save/load infrastructure
    fresh = QATPreparer().prepare_for_qat(DigitsCNN())
    fresh.load_state_dict(qatcore.load(path))
    x = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(fresh.eval()(x).numpy(), trained.eval()(x).numpy())


def test_optimizer_state_is_matched_to_parameters_by_name_whatever_their_order(tmp_path):
    def step(qat, optimizer, seed):
        optimizer.zero_grad()
        qat(np.random.default_rng(seed).random((4, 1, 8, 8), dtype=np.float32)).sum().backward()
        optimizer.step()

    qat = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
    optimizer = SGD(qat.parameters(), lr=0.1, momentum=0.9)
    step(qat, optimizer, 0)
    path = tmp_path / "run.ckpt"
    save_qat_checkpoint(path, qat, optimizer)
    assert read_qat_checkpoint(path)["optimizer_parameters"] == [[name for name, _ in qat.named_parameters()]]
    step(qat, optimizer, 1)

    resumed = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
    reversed_optimizer = SGD(list(resumed.parameters())[::-1], lr=0.1, momentum=0.9)  # another order
    load_qat_checkpoint(path, resumed, reversed_optimizer)
    step(resumed, reversed_optimizer, 1)
    _assert_same(resumed.state_dict(), qat.state_dict())


def test_sigkill_while_writing_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "run.ckpt"
    ready = tmp_path / "ready"
    writer = textwrap.dedent(f'''
        import numpy as np
        from qatcore.models import MLP
        from qatcore.quantization.qat import QATPreparer, save_qat_checkpoint
        qat = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
        qat(np.zeros((2, 1, 8, 8), np.float32))
        save_qat_checkpoint({str(path)!r}, qat, extra={{"round": 0}})
        open({str(ready)!r}, "w").close()
        big = np.random.default_rng(0).random(25_000_000)   # 200 MB: each save takes a while
        for round in range(1, 1000):
            save_qat_checkpoint({str(path)!r}, qat, extra={{"round": round, "blob": big}})
    ''')
    process = subprocess.Popen([sys.executable, "-c", writer])
    try:
        deadline = time.time() + 120
        while not ready.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert ready.exists()
        time.sleep(0.6)  # well inside the first 200 MB write
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    payload = read_qat_checkpoint(path)  # the last complete checkpoint, not a torn one
    assert payload["extra"]["round"] >= 0
    qat = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
    assert load_qat_checkpoint(path, qat).kind == "qat"


def _container(payload: bytes) -> bytes:
    return b"QATCSAVE" + struct.pack("<HHQI", 1, 0, len(payload), zlib.crc32(payload)) + payload


def test_fuzz_mutated_and_truncated_checkpoints(tmp_path):
    model = MLP(hidden=(8,))
    qat = QATPreparer().prepare_for_qat(model)
    optimizer = SGD(qat.parameters(), lr=0.1, momentum=0.9)
    qat(np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)).sum().backward()
    optimizer.step()
    original_path = tmp_path / "good.ckpt"
    save_qat_checkpoint(original_path, qat, optimizer, extra={"epoch": 1})
    good = original_path.read_bytes()
    reference = qat.state_dict()
    target = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
    target_optimizer = SGD(target.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(123)
    path = tmp_path / "mutated.ckpt"
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(2500):
        data = bytearray(good)
        recompute = case % 2 == 1
        body = data[24:] if recompute else data
        kind = case % 5
        if kind == 0:
            del body[rng.integers(0, len(body)):]
        elif kind == 1:
            for _ in range(rng.integers(1, 4)):
                body[rng.integers(0, len(body))] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2:
            position = rng.integers(0, len(body))
            body[position:position] = bytes(rng.integers(0, 256, rng.integers(1, 8), dtype=np.uint8))
        elif kind == 3:
            position = rng.integers(0, len(body))
            del body[position:position + int(rng.integers(1, 8))]
        else:
            body[rng.integers(0, len(body))] = int(rng.integers(0, 256))
        blob = _container(bytes(body)) if recompute else bytes(body)
        path.write_bytes(blob)
        try:
            load_qat_checkpoint(path, target, target_optimizer)
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        if not recompute:  # the checksum held, so the data must be the original's
            for key, value in target.state_dict().items():
                np.testing.assert_array_equal(value, reference[key])
    assert outcomes["refused"] > 1000


def test_unknown_version_and_other_formats(tmp_path):
    qat = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
    qat(np.zeros((2, 1, 8, 8), np.float32))
    path = tmp_path / "c.ckpt"
    save_qat_checkpoint(path, qat)
    payload = qatcore.load(path)
    payload["version"] = 7
    qatcore.save(payload, path)
    with pytest.raises(CheckpointError, match="version 7; this qatcore reads version 1"):
        load_qat_checkpoint(path, qat)
    qatcore.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a QAT checkpoint"):
        load_qat_checkpoint(path, qat)
    path.write_bytes(b"not a qatcore file at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_qat_checkpoint(path, qat)


def test_float_checkpoint_warm_starts_and_mismatch_lists_keys(tmp_path):
    float_model = DigitsCNN()
    float_model.fc.weight.data[...] = 0.25
    path = tmp_path / "float.qat"
    qatcore.save(float_model.state_dict(), path)
    qat = QATPreparer().prepare_for_qat(DigitsCNN())
    info = load_qat_checkpoint(path, qat)
    assert info.kind == "float"
    np.testing.assert_array_equal(qat.get_submodule("fc").weight.data, 0.25)
    assert not qat.get_submodule("fc").weight_fake_quant.observer.has_observed  # quantization starts fresh
    qatcore.save(MLP().state_dict(), path)
    with pytest.raises(CheckpointError, match="layers.1.weight"):
        load_qat_checkpoint(path, qat)
    qatcore.save({"fc.bias": float_model.fc.bias.data}, path)  # one of 14 float keys
    with pytest.raises(CheckpointError, match=r"lacks 13 of the model's float weights.*'bn1.bias'"):
        load_qat_checkpoint(path, qat)


def test_other_models_checkpoint_is_refused_with_keys(tmp_path):
    qat = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
    qat(np.zeros((2, 1, 8, 8), np.float32))
    path = tmp_path / "mlp.ckpt"
    save_qat_checkpoint(path, qat)
    other = QATPreparer().prepare_for_qat(DigitsCNN())
    with pytest.raises(CheckpointError, match="missing keys: .*conv1.weight"):
        load_qat_checkpoint(path, other)


def test_checkpoint_from_other_settings_is_refused_and_changes_nothing(tmp_path):
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    four_bit = QATPreparer().prepare_for_qat(DigitsCNN(), QuantizationConfig.lsq_4bit_weights())
    with qatcore.no_grad():  # a pass that sets the scales up, with no optimizer: not a training step
        four_bit(x)
    path = tmp_path / "four_bit.ckpt"
    save_qat_checkpoint(path, four_bit)
    eight_bit = QATPreparer().prepare_for_qat(DigitsCNN())
    eight_bit(x)
    before = eight_bit.state_dict()
    with pytest.raises(CheckpointError, match=r"other settings \(layerwise_config\).*from_checkpoint"):
        load_qat_checkpoint(path, eight_bit)
    for key, value in eight_bit.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    restored, _ = QATPreparer.from_checkpoint(path, DigitsCNN())
    np.testing.assert_array_equal(restored.eval()(x).numpy(), four_bit.eval()(x).numpy())


def test_generator_of_another_kind_is_refused_before_anything_changes(tmp_path):
    qat = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
    qat(np.zeros((2, 1, 8, 8), np.float32))
    path = tmp_path / "mlp.ckpt"
    save_qat_checkpoint(path, qat, generators={"data": np.random.default_rng(0)})
    other = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
    before = other.state_dict()
    with pytest.raises(CheckpointError, match="generator 'data' was saved from a 'PCG64' bit generator.*MT19937"):
        load_qat_checkpoint(path, other, generators={"data": np.random.Generator(np.random.MT19937(0))})
    for key, value in other.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def _trained_mlp(seed):
    """A QAT MLP after one SGD step on random data (so model and optimizer have state)."""
    qat = QATPreparer().prepare_for_qat(MLP(hidden=(8,)))
    optimizer = SGD(qat.parameters(), lr=0.1, momentum=0.9)
    qat(np.random.default_rng(seed).random((4, 1, 8, 8), dtype=np.float32)).sum().backward()
    optimizer.step()
    return qat, optimizer


def _assert_same(actual, expected, where="state"):
    """Nested dicts/lists of arrays and numbers are equal (arrays compared exactly)."""
    assert type(actual) is type(expected), where
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    else:
        assert actual == expected, where


class _Everything:
    """What load_qat_checkpoint may change, captured to compare after a failed load."""

    def __init__(self, qat, optimizer, rng):
        self.model, self.optimizer = qat.state_dict(), optimizer.state_dict()
        self.rng_state = rng.bit_generator.state
        self.statistics = QATPreparer.controller(qat).statistics

    def assert_unchanged(self, qat, optimizer, rng):
        _assert_same(qat.state_dict(), self.model, "model")
        _assert_same(optimizer.state_dict(), self.optimizer, "optimizer")
        assert rng.bit_generator.state == self.rng_state
        assert QATPreparer.controller(qat).statistics is self.statistics


def _saved_checkpoint(tmp_path):
    qat, optimizer = _trained_mlp(seed=0)
    path = tmp_path / "run.ckpt"
    save_qat_checkpoint(path, qat, optimizer, generators={"data": np.random.default_rng(7)})
    return path


@pytest.mark.parametrize("error", [TypeError("a list, not a dict"), ValueError("bad lr"), KeyError("momentum"),
                                   StateDictError("refused"), RuntimeError("disk on fire")],
                         ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("changes_first", [False, True], ids=["fails-at-once", "fails-after-changing"])
def test_a_failing_optimizer_load_changes_nothing(tmp_path, monkeypatch, error, changes_first):
    path = _saved_checkpoint(tmp_path)
    qat, optimizer = _trained_mlp(seed=1)
    rng = np.random.default_rng(3)
    before = _Everything(qat, optimizer, rng)
    real_load, calls = optimizer.load_state_dict, []

    def failing_load(state):
        calls.append(state)
        if len(calls) == 1:  # the checkpoint's state; the second call is the rollback
            if changes_first:
                real_load(state)
            raise error
        real_load(state)

    monkeypatch.setattr(optimizer, "load_state_dict", failing_load)
    message = rf"loading the optimizer state failed \(nothing was changed\): {type(error).__name__}"
    with pytest.raises(CheckpointError, match=message):
        load_qat_checkpoint(path, qat, optimizer, generators={"data": rng})
    before.assert_unchanged(qat, optimizer, rng)


def test_an_optimizer_that_refuses_its_own_state_is_reported_and_the_rest_put_back(tmp_path, monkeypatch):
    path = _saved_checkpoint(tmp_path)
    qat, optimizer = _trained_mlp(seed=1)
    before = qat.state_dict()

    def broken_load(state):
        raise TypeError("always")

    monkeypatch.setattr(optimizer, "load_state_dict", broken_load)
    with pytest.raises(CheckpointError, match="could not put back the optimizer"):
        load_qat_checkpoint(path, qat, optimizer, generators={"data": np.random.default_rng(3)})
    _assert_same(qat.state_dict(), before, "model")


def test_a_failing_schedule_puts_model_optimizer_generators_and_statistics_back(tmp_path, monkeypatch):
    path = _saved_checkpoint(tmp_path)
    qat, optimizer = _trained_mlp(seed=1)
    rng = np.random.default_rng(3)
    before = _Everything(qat, optimizer, rng)

    def failing_schedule(controller):
        raise ValueError("schedule exploded")

    monkeypatch.setattr(QATController, "apply_schedule", failing_schedule)
    with pytest.raises(CheckpointError, match=r"applying the QAT schedule failed \(nothing was changed\).*exploded"):
        load_qat_checkpoint(path, qat, optimizer, generators={"data": rng})
    monkeypatch.undo()
    before.assert_unchanged(qat, optimizer, rng)
    load_qat_checkpoint(path, qat, optimizer, generators={"data": rng})  # the same call works once it can
    assert rng.bit_generator.state == np.random.default_rng(7).bit_generator.state


def test_a_damaged_generator_state_puts_the_loaded_model_and_optimizer_back(tmp_path):
    path = _saved_checkpoint(tmp_path)
    payload = qatcore.load(path)
    payload["generators"]["data"]["state"] = "not a state"  # right kind, unusable state
    qatcore.save(payload, path)
    qat, optimizer = _trained_mlp(seed=1)
    rng = np.random.default_rng(3)
    before = _Everything(qat, optimizer, rng)
    with pytest.raises(CheckpointError, match=r"setting the generator states failed \(nothing was changed\)"):
        load_qat_checkpoint(path, qat, optimizer, generators={"data": rng})
    before.assert_unchanged(qat, optimizer, rng)


def test_a_model_that_was_not_prepared_is_a_checkpoint_error(tmp_path):
    path = _saved_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="finding the model's QATController failed.*not prepared"):
        load_qat_checkpoint(path, MLP(hidden=(8,)))


def test_int8_model_deployment_save_load(tmp_path):
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(DigitsCNN())
    qat(np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    int8_model = preparer.convert_to_quantized(qat)
    path = tmp_path / "model.int8"
    save_int8_model(path, int8_model)
    loaded = load_int8_model(path)
    x = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), int8_model(x).numpy())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_int8_model(path)
