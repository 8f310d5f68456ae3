"""Every docstring example in the package and every Python block in the README and docs/*.md runs
(a file's blocks in order, in one namespace); a Python block followed by a text block prints that text."""

import contextlib
import doctest
import importlib
import io
import os
import pkgutil
import re
from pathlib import Path
from typing import NamedTuple

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


class PythonBlock(NamedTuple):
    """A ```python block and, if a ```text block follows it with nothing but blank lines
    between, that block's content: the output the code must print."""

    code: str
    expected_output: str | None


def _python_blocks(path: Path) -> list[PythonBlock]:
    text = path.read_text()
    blocks = []
    for block in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        output = re.match(r"[ \t]*\n(?:[ \t]*\n)*```text\n(.*?)```", text[block.end():], flags=re.S)
        blocks.append(PythonBlock(block.group(1), output.group(1) if output else None))
    return blocks


def _without_trailing_whitespace(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _run_python_blocks(path: Path) -> list[PythonBlock]:
    """Run the file's ```python blocks in order, in one namespace; a block followed by a
    ```text block must print exactly that text (trailing whitespace aside)."""
    blocks = _python_blocks(path)
    namespace = {"__name__": "__doc_snippet__"}
    for number, block in enumerate(blocks, start=1):
        code = compile(block.code, str(path), "exec")
        if block.expected_output is None:
            exec(code, namespace)
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
        assert _without_trailing_whitespace(printed.getvalue()) == _without_trailing_whitespace(
            block.expected_output), f"{path.name}: python block {number} does not print the text block after it"
    return blocks


# docs/distributed.md's program runs on MPI ranks: tests/distributed/test_mpi_runs.py runs it under mpiexec
DOC_FILES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "distributed.md")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_markdown_python_blocks_run(path, tmp_path, monkeypatch):
    _needs_onnx(path.name)
    monkeypatch.chdir(tmp_path)
    blocks = _run_python_blocks(path)
    if path.name == "README.md":
        assert blocks, "the README must carry a runnable example"
        assert os.path.exists("digits_cnn.qat")
    if path.name == "numerics.md":
        assert len(blocks) >= 10, "docs/numerics.md checks its formulas with a program in each section"


def test_a_text_block_after_a_python_block_is_its_printed_output(tmp_path):
    doc = tmp_path / "example.md"
    doc.write_text("```python\nx = 6 * 7\nprint(x, '  ')\n```\n\n```text\n42\n```\n\n"
                   "Prose.\n\n```python\nassert x == 42\n```\n\nProse.\n\n```text\nnot an output\n```\n")
    blocks = _run_python_blocks(doc)                       # one namespace: the second block sees x
    assert [block.expected_output for block in blocks] == ["42\n", None]

    doc.write_text("```python\nprint(41)\n```\n```text\n42\n```\n")
    with pytest.raises(AssertionError, match="python block 1 does not print the text block after it"):
        _run_python_blocks(doc)


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert commands[0] == "pip install -e . && qatcore run"
    assert commands[1] == 'pip install -e ".[test,onnx,distributed,plot]" && pytest'
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
