"""The ``torch`` marker (tests/conftest.py): every test that imports PyTorch carries it;
without PyTorch those tests skip, saying why; with ``--require-torch`` (CI's second run,
``.ci/run``) a marked test that does not run fails, and so does a module skipped while
collecting. The behaviour is checked in subprocesses where ``import torch`` fails."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFTEST = ROOT / "tests" / "conftest.py"


def _imports_torch(node: ast.AST) -> bool:
    for inner in ast.walk(node):
        if isinstance(inner, ast.Import) and any(a.name.split(".")[0] == "torch" for a in inner.names):
            return True
        if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] == "torch":
            return True
    return False


def test_a_test_is_marked_torch_exactly_when_it_imports_torch():
    wrong, marked = [], 0
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        if any(_imports_torch(n) for n in module_level):
            wrong.append(f"{path.name}: imports torch at module level (import it inside the marked test)")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                is_marked = any(ast.unparse(d) == "pytest.mark.torch" for d in node.decorator_list)
                marked += is_marked
                if is_marked != _imports_torch(node):
                    wrong.append(f"{path.name}::{node.name}: marked {is_marked}, imports torch {not is_marked}")
    assert not wrong, wrong
    assert marked >= 9


MARKED = '''
import pytest

@pytest.mark.torch
def test_imports_torch():
    import torch  # noqa: F401

@pytest.mark.torch
def test_skips_for_another_reason():
    pytest.skip("the exporter needs a package that is missing")

def test_plain():
    pass
'''

SKIPPED_MODULE = '''
import pytest

pytest.importorskip("no_such_package_for_qatcore_tests")

@pytest.mark.torch
def test_hidden():
    pass
'''


def _pytest_without_torch(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest with tests/conftest.py as a plugin, in a process where ``import torch`` fails."""
    options = ["-q", "-rs", "-p", "no:cacheprovider", "-o", "markers=torch",
               "-W", "ignore::pytest.PytestAssertRewriteWarning", *args]
    code = (
        "import importlib.util, sys\n"
        "sys.modules['torch'] = None\n"
        f"spec = importlib.util.spec_from_file_location('qatcore_tests_conftest', {str(CONFTEST)!r})\n"
        "plugin = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(plugin)\n"
        "import pytest\n"
        f"sys.exit(pytest.main({options!r}, plugins=[plugin]))\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)


def test_without_torch_marked_tests_skip_saying_why(tmp_path):
    (tmp_path / "test_marked.py").write_text(MARKED)
    run = _pytest_without_torch(tmp_path, "test_marked.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 2 skipped" in run.stdout
    assert "PyTorch is not installed" in run.stdout and "pip install torch==2.13.0" in run.stdout


def test_require_torch_fails_every_marked_test_that_does_not_run(tmp_path):
    (tmp_path / "test_marked.py").write_text(MARKED)
    run = _pytest_without_torch(tmp_path, "-m", "torch", "--require-torch", "test_marked.py")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 failed, 1 deselected" in run.stdout
    assert "this PyTorch reference test was skipped: Skipped: the exporter needs" in run.stdout


def test_require_torch_fails_a_module_skipped_while_collecting(tmp_path):
    (tmp_path / "test_skipped_module.py").write_text(SKIPPED_MODULE)
    assert _pytest_without_torch(tmp_path, "-m", "torch").returncode == 5  # skipped: nothing selected
    run = _pytest_without_torch(tmp_path, "-m", "torch", "--require-torch")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "was skipped while collecting" in run.stdout
