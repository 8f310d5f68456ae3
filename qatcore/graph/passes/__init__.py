"""Graph passes: plain functions ``GraphModule -> PassResult(graph_module, changed)``."""

from qatcore.graph.passes.dead_code import eliminate_dead_code
from qatcore.graph.passes.inference_fusion import fuse_for_inference
from qatcore.graph.passes.pass_result import PassResult
from qatcore.graph.passes.shape_propagation import propagate_shapes

__all__ = ["PassResult", "propagate_shapes", "eliminate_dead_code", "fuse_for_inference"]
