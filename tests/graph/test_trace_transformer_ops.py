"""The graph IR traces the transformer layers and functions: each layer one ``call_module``
node, each function one ``call_function`` node, and the traced model computes the model's
outputs and gradients exactly."""

import numpy as np

import qatcore.nn.functional as F
from qatcore import nn
from qatcore.graph import trace
from qatcore.tensor import Tensor


class TinyBlock(nn.Module):
    """Two embedding tables (a layer and a function), both norms, both GELUs, SiLU: as layers and as functions."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.tokens = nn.Embedding(11, 8, padding_idx=0, rng=rng)
        self.second_table = nn.Parameter(rng.normal(size=(11, 8)).astype(np.float32))
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8, eps=1e-6)
        self.gelu, self.gelu_tanh, self.silu = nn.GELU(), nn.GELU("tanh"), nn.SiLU()
        self.mix = nn.Linear(8, 8, rng=rng)

    def forward(self, ids):
        h = F.add(self.tokens(ids), F.embedding(ids, self.second_table, padding_idx=0))
        h = self.mix(self.gelu(self.ln(h))) + self.silu(self.rms(h)) + self.gelu_tanh(h)
        h = F.layer_norm(h, (8,), eps=1e-5) + F.rms_norm(h, 8) + F.gelu(h) + F.gelu(h, approximate="tanh")
        return F.silu(h)


def test_every_transformer_op_is_one_node_and_the_traced_model_computes_the_same():
    model = TinyBlock()
    gm = trace(model)
    modules = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert {"Embedding", "LayerNorm", "RMSNorm", "GELU", "SiLU", "Linear"} <= modules
    functions = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    for name, count in (("embedding", 1), ("layer_norm", 1), ("rms_norm", 1), ("gelu", 2), ("silu", 1)):
        assert functions.count(name) == count, (name, functions)
    gm.graph.lint()
    ids = np.random.default_rng(1).integers(0, 11, size=(3, 5))
    expected, traced = model(ids), gm(ids)
    np.testing.assert_array_equal(traced.numpy(), expected.numpy())
    for run in (model, gm):
        model.zero_grad()
        F.sum(F.mul(run(ids), Tensor(np.linspace(-1, 1, 120, dtype=np.float32).reshape(3, 5, 8)))).backward()
        if run is model:
            first = {name: p.grad.copy() for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, first[name], err_msg=name)
    assert np.all(model.tokens.weight.grad[0] == 0) and np.all(model.second_table.grad[0] == 0)  # padding rows
    assert np.any(model.second_table.grad != 0)
