"""Every registered operator, walked end to end from its rule's example: prepare -> train a
step -> convert -> int8 parity with the QAT model -> save/load the int8 model -> ONNX export ->
ONNX Runtime. A new operator is tested here by registering it with an example."""

import numpy as np
import pytest

from qatcore import nn
from qatcore.errors import ConfigError
from qatcore.graph import trace
from qatcore.nn import functional as F
from qatcore.optim import SGD
from qatcore.quantization import QATPreparer
from qatcore.quantization.int8_layers import Int8Module
from qatcore.quantization.qat.checkpointing import load_int8_model, save_int8_model
from qatcore.quantization.qat.operators import (
    UnregisteredOperatorError,
    registered_rules,
    rule_for_function,
    rule_for_module,
)
from qatcore.quantization.qat.parity import parity_report
from qatcore.tensor import Tensor

EXAMPLES = {rule.name: rule for rule in registered_rules() if rule.example is not None}


def _user_facing(rule) -> bool:
    """A layer of qatcore.nn or a function of qatcore.nn.functional: what users write."""
    target = rule.target
    if isinstance(target, type):
        return target.__module__.startswith("qatcore.nn.")
    return True


def test_every_user_facing_operator_has_an_example():
    missing = [rule.name for rule in registered_rules()
               if _user_facing(rule) and rule.example is None and not rule.example_missing]
    assert missing == []
    both = [rule.name for rule in registered_rules() if rule.example is not None and rule.example_missing]
    assert both == []


def _uses(model, target) -> bool:
    gm = trace(model)
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is target:
            return True
        if node.op == "call_function" and node.target is target:
            return True
    return False


def _train_steps(qat, x, steps: int = 3) -> None:
    optimizer = SGD(qat.parameters(), lr=0.01)
    rng = np.random.default_rng(1)
    qat.train()
    for _ in range(steps):
        batch = (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        out = qat(Tensor(batch))
        loss = F.mean(F.mul(out, out))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.eval()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_operator_walks_through_qat_conversion_files_and_onnx(name, tmp_path):
    rule = EXAMPLES[name]
    model, shape = rule.example()
    assert _uses(model, rule.target), f"the example of {name} does not use it"
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(model)
    _train_steps(qat, x)
    int8_model = preparer.convert_to_quantized(qat)
    report = parity_report(qat, int8_model, x)
    assert report.output.exact == 1.0, str(report)
    assert all(layer.exact == 1.0 for layer in report.layers), str(report)
    # the int8 model saves and loads, computing the same
    path = tmp_path / "model.int8"
    save_int8_model(path, int8_model)
    again = load_int8_model(path)
    np.testing.assert_array_equal(again(x).numpy(), int8_model(x).numpy())
    # and leaves as an ONNX file that ONNX Runtime runs with the same outputs
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from qatcore.interop.onnx import export_onnx

    onnx_path = tmp_path / "model.onnx"
    export_onnx(int8_model, onnx_path, x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: x})[0]
    ours = int8_model(x).numpy()
    step = float(int8_model.value_sources[_last_integer_node(int8_model)].scale)
    assert theirs.shape == ours.shape
    steps = np.abs(theirs.astype(np.float64) - ours) / step
    if _integer_only(int8_model):
        np.testing.assert_array_equal(theirs, ours)
    else:  # a float island: ONNX Runtime's float kernels may round a near-tie the other way
        assert float(steps.max()) <= 1.0 + 1e-4, f"{name}: {float(steps.max())} output steps apart"


def _integer_only(int8_model) -> bool:
    """Every operation between Quantize and Dequantize is an int8 runtime module."""
    return all(n.op in ("input", "output") or (n.op == "call_module" and isinstance(
        int8_model.get_submodule(n.target), Int8Module)) for n in int8_model.graph.nodes)


def _last_integer_node(int8_model) -> str:
    return [n.name for n in int8_model.graph.nodes if n.name in int8_model.value_sources][-1]


def test_unregistered_operator_is_refused_with_the_registered_list():
    class Odd(nn.Module):
        def forward(self, x):
            return F.var(x, 1)

    with pytest.raises(UnregisteredOperatorError, match="function var is not a registered operator; registered: "
                                                        "AdaptiveAvgPool2d"):
        QATPreparer().prepare_for_qat(Odd())
    with pytest.raises(ConfigError, match="module type CrossEntropyLoss"):
        rule_for_module(nn.CrossEntropyLoss())
    with pytest.raises(UnregisteredOperatorError):
        rule_for_function(F.nll_loss)
