"""``PassResult``: what every graph pass returns."""

from __future__ import annotations

from typing import NamedTuple

from qatcore.graph.graph_module import GraphModule

__all__ = ["PassResult"]


class PassResult(NamedTuple):
    """The (possibly new) GraphModule, and whether the pass changed anything."""

    graph_module: GraphModule
    changed: bool
