"""The Graph editing API and one test per invariant that lint claims to check."""

import numpy as np
import pytest

import qatcore.nn.functional as F
from qatcore import nn
from qatcore.errors import GraphError
from qatcore.graph import Graph, trace


def small_graph():
    g = Graph()
    x = g.input("x")
    a = g.call_function(F.relu, (x,))
    b = g.call_function(F.neg, (a,))
    out = g.output(b)
    return g, x, a, b, out


def test_names_are_unique_and_readable():
    g = Graph()
    x = g.input("x")
    first = g.call_function(F.relu, (x,))
    second = g.call_function(F.relu, (first,))
    g.output(second)
    assert [n.name for n in g.nodes] == ["x", "relu", "relu_1", "output"]


def test_users_follow_edits():
    g, x, a, b, out = small_graph()
    assert list(x.users) == [a] and list(a.users) == [b]
    c = g.insert_after(a, "call_function", F.exp, (a,))
    b.replace_input_with(a, c)
    assert list(a.users) == [c] and list(c.users) == [b]
    g.lint()


def test_insert_before_and_replace_all_uses():
    g, x, a, b, out = small_graph()
    new = g.insert_before(b, "call_function", F.sigmoid, (x,))
    changed = g.replace_all_uses_with(a, new)
    assert changed == [b] and b.args == (new,)
    with pytest.raises(GraphError, match="not reachable"):
        g.lint()  # relu is now dead
    g.erase(a)
    g.lint()
    assert [n.name for n in g.nodes] == ["x", "sigmoid", "neg", "output"]


def test_erase_refused_while_used():
    g, x, a, b, out = small_graph()
    with pytest.raises(GraphError, match="still read by neg"):
        g.erase(a)


def test_to_dot_lists_nodes_and_edges():
    g, *_ = small_graph()
    dot = g.to_dot()
    assert dot.startswith('digraph "graph" {') and '"x" -> "relu";' in dot and '"neg" -> "output";' in dot


# ---- lint: one test per invariant ---------------------------------------------------------
def test_lint_topological_order():
    g, x, a, b, out = small_graph()
    g.move_before(b, a)
    with pytest.raises(GraphError, match="comes after it"):
        g.lint()


def test_lint_unique_names():
    g, x, a, b, out = small_graph()
    b.name = "relu"
    with pytest.raises(GraphError, match="two nodes are named 'relu'"):
        g.lint()


def test_lint_ownership():
    g, x, a, b, out = small_graph()
    other, *_ = small_graph()
    foreign = other.nodes[1]
    with pytest.raises(GraphError, match="another graph"):
        g.call_function(F.exp, (foreign,))
    b.args = (foreign,)  # Node.args does not know the graph; a buggy pass could do this
    with pytest.raises(GraphError, match="neg reads relu, which is not in this graph"):
        g.lint()


def test_lint_users_consistency():
    g, x, a, b, out = small_graph()
    a.users.clear()
    with pytest.raises(GraphError, match="not among its users"):
        g.lint()


def test_lint_single_output_last():
    g, x, a, b, out = small_graph()
    g.move_before(out, b)
    with pytest.raises(GraphError, match="output"):
        g.lint()
    g2, *_ = small_graph()
    g2.output(g2.nodes[1])
    with pytest.raises(GraphError, match="found 2"):
        g2.lint()


def test_lint_inputs_first():
    g, x, a, b, out = small_graph()
    late = g.insert_before(b, "input", "late")  # topologically fine, but after relu
    b.args = (a, late)
    with pytest.raises(GraphError, match="input late comes after"):
        g.lint()


def test_lint_call_module_target_exists():
    model = nn.Sequential(nn.ReLU())
    gm = trace(model)
    gm.graph.nodes[1].target = "missing"
    with pytest.raises(GraphError, match="'missing'.*does not exist"):
        gm.lint()


def test_lint_get_attr_target_exists():
    class WithParam(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(np.ones(2, dtype=np.float32))

        def forward(self, x):
            return x * self.w

    gm = trace(WithParam())
    gm.lint()
    next(n for n in gm.graph.nodes if n.op == "get_attr").target = "nope"
    with pytest.raises(GraphError, match="'nope'"):
        gm.lint()


def test_lint_reachability():
    g, x, a, b, out = small_graph()
    g.insert_after(b, "call_function", F.exp, (b,))
    with pytest.raises(GraphError, match="not reachable from the output: exp"):
        g.lint()


def test_graph_module_requires_inputs():
    gm = trace(nn.Sequential(nn.ReLU()))
    with pytest.raises(GraphError, match="missing input"):
        gm()
