"""Shared by the ONNX tests. They need the optional extra (pip install -e ".[test,onnx]", as
the README's test command and .ci/run do); each module skips itself, with the reason, without it."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def run_onnxruntime():
    """``run_onnxruntime(path, *inputs, disabled_optimizers=None) -> first output`` with ONNX
    Runtime on the CPU (all graph optimizations on, but for the named ones)."""

    import onnxruntime as ort

    def run(path, *inputs, disabled_optimizers=None):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=disabled_optimizers)
        feeds = {i.name: np.asarray(x, dtype=np.float32) for i, x in zip(session.get_inputs(), inputs)}
        return session.run(None, feeds)[0]

    return run


def agreement(reference: np.ndarray, other: np.ndarray, step: float) -> tuple[float, float, float]:
    """(fraction of elements exactly equal, largest difference in output steps, top-1 agreement)."""
    steps = np.abs(reference.astype(np.float64) - other.astype(np.float64)) / step
    return (float(np.mean(reference == other)), float(steps.max()),
            float(np.mean(reference.argmax(axis=1) == other.argmax(axis=1))))


@pytest.fixture(scope="session")
def agree():
    return agreement
