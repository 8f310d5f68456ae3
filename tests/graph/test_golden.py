"""Golden text snapshots of the printed graphs of the reference models.

A change in what the tracer records shows up here as a diff. When the change is
intended, regenerate the snapshots with ``python tests/graph/test_golden.py`` and
review the diff of tests/graph/golden/ in the commit.
"""

from pathlib import Path

import numpy as np
import pytest

from qatcore.graph import fuse_for_inference, trace
from qatcore.models import MLP, DigitsCNN, SmallResNet

GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLE = (np.zeros((2, 1, 8, 8), dtype=np.float32),)


def render(name: str) -> str:
    factory = {"mlp": MLP, "digits_cnn": DigitsCNN, "small_resnet": SmallResNet}[name.split("-")[0]]
    gm = trace(factory(), example_inputs=EXAMPLE)
    if name.endswith("-fused"):
        gm.eval()
        fuse_for_inference(gm)
    return gm.print_readable() + "\n"


NAMES = ["mlp", "digits_cnn", "small_resnet", "digits_cnn-fused", "small_resnet-fused"]


@pytest.mark.parametrize("name", NAMES)
def test_printed_graph_matches_snapshot(name):
    expected = (GOLDEN / f"{name}.txt").read_text()
    assert render(name) == expected


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    for name in NAMES:
        (GOLDEN / f"{name}.txt").write_text(render(name))
        print("wrote", GOLDEN / f"{name}.txt")
