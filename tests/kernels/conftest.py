"""The harness every kernel test file uses to show its kernels run as plain Python.

``run_without_jit(test_file, body)`` starts a fresh interpreter with
``NUMBA_DISABLE_JIT=1`` and warnings as errors, loads ``test_file`` as the module
``tests`` (so ``body`` calls the same checks and oracles the jitted tests call),
runs ``body`` and asserts it ran through to the end. ``body`` can call
``assert_plain_python(*functions)`` to check that the jitted functions it names
are plain Python functions there.
"""

import os
import subprocess
import sys
import textwrap

import pytest

_PREAMBLE = """\
import importlib.util
import types

import numpy as np
from numba.core import config

assert config.DISABLE_JIT
spec = importlib.util.spec_from_file_location("kernel_tests", {path!r})
tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests)


def assert_plain_python(*functions):
    # Under NUMBA_DISABLE_JIT, njit hands back each function unchanged.
    for function in functions:
        assert isinstance(function, types.FunctionType), (function, type(function))

"""


def _run_without_jit(test_file: str, body: str) -> None:
    script = _PREAMBLE.format(path=test_file) + textwrap.dedent(body) + '\nprint("plain python ok")\n'
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True,
                            env=dict(os.environ, NUMBA_DISABLE_JIT="1"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "plain python ok"


@pytest.fixture
def run_without_jit():
    return _run_without_jit
