"""Every docstring example in the package and every Python block in the README and docs/*.md runs."""

import doctest
import importlib
import os
import pkgutil
import re
from pathlib import Path

import pytest

import qatcore
import qatcore.kernels

ROOT = Path(__file__).resolve().parents[1]
# qatcore.kernels lives in kernels/ (a package-dir mapping), so walk it separately.
MODULES = sorted(
    {name for _, name, _ in pkgutil.walk_packages(qatcore.__path__, "qatcore.")}
    | {"qatcore.kernels"}
    | {name for _, name, _ in pkgutil.walk_packages(qatcore.kernels.__path__, "qatcore.kernels.")}
)
MODULES.remove("qatcore.__main__")


def test_every_module_is_listed():
    assert {"qatcore.tensor", "qatcore.nn.functional", "qatcore.kernels.im2col"} <= set(MODULES)


def _needs_onnx(name: str) -> None:
    """The ONNX modules and docs need the optional onnx extra; skip them, with the reason, without it."""
    if "interop" in name:
        pytest.importorskip("onnx", reason="the onnx extra is not installed")
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    _needs_onnx(name)
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


# docs/distributed.md's program runs on MPI ranks: tests/distributed/test_mpi_runs.py runs it under mpiexec
DOC_FILES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "distributed.md")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_markdown_python_blocks_run(path, tmp_path, monkeypatch):
    _needs_onnx(path.name)
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(path)
    for block in blocks:
        exec(compile(block, str(path), "exec"), {"__name__": "__doc_snippet__"})
    if path.name == "README.md":
        assert blocks, "the README must carry a runnable example"
        assert os.path.exists("digits_cnn.qat")
    if path.name == "numerics.md":
        assert len(blocks) >= 10, "docs/numerics.md checks its formulas with a program in each section"


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert commands[0] == "pip install -e . && qatcore run"
    assert commands[1] == 'pip install -e ".[test,onnx,distributed,plot]" && pytest'
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
