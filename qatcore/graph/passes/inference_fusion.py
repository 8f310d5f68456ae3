"""Inference fusion: fold each BatchNorm into the Conv2d or Linear before it, and
fuse a following ReLU into the same layer.

Patterns (first match wins for a node; every intermediate value must have one user):

    Conv2d -> BatchNorm2d -> ReLU   =>  ConvReLU2d(folded conv)
    Conv2d -> BatchNorm2d           =>  folded Conv2d
    Linear -> BatchNorm1d -> ReLU   =>  LinearReLU(folded linear)
    Linear -> BatchNorm1d           =>  folded Linear
    Conv2d -> ReLU                  =>  ConvReLU2d(conv)
    Linear -> ReLU                  =>  LinearReLU(linear)

The folded layer (see :mod:`qatcore.nn.fused`) replaces the first layer under its
name; the result equals the eval-mode model. New Parameters are created for
folded layers, so the traced model itself is never changed.
"""

from __future__ import annotations

from qatcore.graph.graph_module import GraphModule
from qatcore.graph.passes.dead_code import eliminate_dead_code
from qatcore.graph.passes.pass_result import PassResult
from qatcore.graph.pattern import find_chains, replace_chain_with_module
from qatcore.nn import BatchNorm1d, BatchNorm2d, Conv2d, Linear, ReLU
from qatcore.nn.fused import ConvReLU2d, LinearReLU, fold_conv_batch_norm, fold_linear_batch_norm

__all__ = ["fuse_for_inference"]

_PATTERNS = (
    ((Conv2d, BatchNorm2d, ReLU), fold_conv_batch_norm, ConvReLU2d),
    ((Conv2d, BatchNorm2d), fold_conv_batch_norm, None),
    ((Linear, BatchNorm1d, ReLU), fold_linear_batch_norm, LinearReLU),
    ((Linear, BatchNorm1d), fold_linear_batch_norm, None),
    ((Conv2d, ReLU), None, ConvReLU2d),
    ((Linear, ReLU), None, LinearReLU),
)


def fuse_for_inference(gm: GraphModule) -> PassResult:
    """Fold BatchNorms and fuse ReLUs (see the module docstring) in ``gm``."""
    changed = False
    for pattern, fold, fuse in _PATTERNS:
        for chain in find_chains(gm, pattern):
            layer = gm.get_submodule(chain[0].target)
            if fold is not None:
                layer = fold(layer, gm.get_submodule(chain[1].target))
            if fuse is not None:
                layer = fuse(layer, gm.get_submodule(chain[-1].target))
            replace_chain_with_module(gm, chain, chain[0].target, layer)
            changed = True
    if changed:
        eliminate_dead_code(gm)
        _drop_unused_modules(gm)
    return PassResult(gm, changed)


def _drop_unused_modules(gm: GraphModule) -> None:
    """Unregister BatchNorms and ReLUs the graph no longer calls (never looking inside
    a module the graph does call: a fused layer keeps its own ReLU)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}

    def inside_called(name: str) -> bool:
        return any(name.startswith(c + ".") for c in called)

    for name, module in list(gm.named_modules()):
        if not name or name in called or inside_called(name):
            continue
        if isinstance(module, (BatchNorm1d, BatchNorm2d, ReLU)):
            parent, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(parent), leaf)
