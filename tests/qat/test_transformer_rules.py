"""The transformer layers' operator rules on a token model (ids -> Embedding -> RMSNorm ->
SiLU -> LayerNorm -> GELU -> Linear, and the functional forms): the registry-wide walk,
which feeds float inputs, cannot take an Embedding, so this one does it with token indices:
prepare -> train -> convert -> exact parity -> save/load (not ONNX: ``export_onnx`` takes
float inputs only)."""

import numpy as np
import pytest

from qatcore import nn
from qatcore.nn import functional as F
from qatcore.optim import SGD
from qatcore.quantization import QATPreparer
from qatcore.quantization.qat.checkpointing import load_int8_model, save_int8_model
from qatcore.quantization.qat.operators import rule_for_function, rule_for_module
from qatcore.quantization.qat.parity import parity_report
from qatcore.quantization.qat.preparation import FakeQuantize


class TokenModel(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        rng = np.random.default_rng(0)
        self.functional = functional
        self.tokens = nn.Embedding(10, 8, padding_idx=0, rng=rng)
        self.rms, self.silu = nn.RMSNorm(8, eps=1e-6), nn.SiLU()
        self.ln, self.gelu = nn.LayerNorm(8), nn.GELU("tanh")
        self.head = nn.Linear(8, 10, rng=rng)

    def forward(self, ids):
        if self.functional:
            h = F.embedding(ids, self.tokens.weight, 0)
            h = F.gelu(F.layer_norm(F.silu(F.rms_norm(h, (8,), self.rms.weight, 1e-6)), (8,), self.ln.weight,
                                    self.ln.bias, 1e-5))
        else:
            h = self.gelu(self.ln(self.silu(self.rms(self.tokens(ids)))))
        return self.head(h)


@pytest.mark.parametrize("functional", [False, True], ids=["layers", "functions"])
def test_token_model_walks_through_qat_conversion_files_and_onnx(functional, tmp_path):
    ids = np.random.default_rng(1).integers(0, 10, (4, 5))
    preparer = QATPreparer()
    qat = preparer.prepare_for_qat(TokenModel(functional))
    quantized = [n.args[0].name for n in qat.graph.nodes
                 if n.op == "call_module" and isinstance(qat.get_submodule(n.target), FakeQuantize)]
    assert "ids" not in quantized  # indices read only by the lookup get no quantizer
    assert len(quantized) == 4     # after each norm (a new grid) and each activation; the head quantizes itself
    optimizer = SGD(qat.parameters(), lr=0.1)
    losses = []
    qat.train()
    for _ in range(5):
        loss = F.cross_entropy(F.reshape(qat(ids), (-1, 10)), ids.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert np.all(qat.state_dict()["tokens.weight"][0] == 0)  # the padding row is never trained
    qat.eval()
    int8_model = preparer.convert_to_quantized(qat)
    report = parity_report(qat, int8_model, ids)
    assert report.output.exact == 1.0, str(report)
    path = tmp_path / "model.int8"
    save_int8_model(path, int8_model)
    np.testing.assert_array_equal(load_int8_model(path)(ids).numpy(), int8_model(ids).numpy())
    # ONNX export is not part of this walk: export_onnx takes float inputs only (issue 20)


def test_rules_give_the_roles_of_the_module_docstring():
    from qatcore.quantization.qat.operators.registry import QATRole

    for target, role in ((nn.GELU(), QATRole.ACTIVATION), (nn.SiLU(), QATRole.ACTIVATION),
                         (nn.LayerNorm(4), QATRole.NEW_GRID), (nn.RMSNorm(4), QATRole.NEW_GRID),
                         (nn.Embedding(3, 2, rng=np.random.default_rng(0)), QATRole.FLOAT)):
        assert rule_for_module(target).qat is role
    for fn, role in ((F.gelu, QATRole.ACTIVATION), (F.silu, QATRole.ACTIVATION), (F.layer_norm, QATRole.NEW_GRID),
                     (F.rms_norm, QATRole.NEW_GRID), (F.embedding, QATRole.FLOAT)):
        assert rule_for_function(fn).qat is role
    assert rule_for_function(F.embedding).index_input and rule_for_function(F.embedding).example_missing
