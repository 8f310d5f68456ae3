"""The layers import downward only, and the package has no import cycles.

LAYERS below is the order of docs/architecture.md, lowest first. A module may
import its own layer and the layers below it, at import time and inside functions.
Three checks hold that:

- at run time: each module is imported into a clean interpreter (a child forked
  from one that has loaded numpy and nothing of qatcore), and every qatcore module
  that got loaded must be from its layer or below. The child starts from a bare
  ``qatcore`` package (its ``__init__`` not run), because ``qatcore/__init__``
  loads the core on purpose (test_import_qatcore_loads_the_core_only_and_...);
- statically: every import statement, including those inside functions, and every
  name a package re-exports lazily (``lazy_exports``) points to the same layer or
  below, with ALLOWED_UPWARD as the only, named, exception;
- the import graph of all modules (a package counts as imported with each of its
  submodules) has no cycle.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qatcore
import qatcore.kernels

# lowest first; a module belongs to the longest prefix that names it
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("qatcore.errors", "qatcore.random", "qatcore.symbolic", "qatcore.text_table",
                    "qatcore.lazy_exports", "qatcore.serialization", "qatcore.process_group",
                    "qatcore.kernels")),
    ("tensor", ("qatcore.tensor",)),
    ("autograd", ("qatcore.autograd",)),
    ("ops", ("qatcore.ops",)),
    ("functional", ("qatcore.nn.functional",)),
    ("nn", ("qatcore.nn", "qatcore.optim", "qatcore.data", "qatcore.models")),
    ("graph", ("qatcore.graph",)),
    ("quantization", ("qatcore.quantization",)),
    ("qat", ("qatcore.quantization.qat",)),
    ("interop", ("qatcore.interop",)),
    ("distributed", ("qatcore.distributed",)),
    ("pipeline", ("qatcore.training", "qatcore.pipeline", "qatcore.cli", "qatcore.__main__", "qatcore")),
)

# (importer, imported) -> why it may reach up
ALLOWED_UPWARD = {
    ("qatcore.quantization", "qatcore.quantization.qat"):
        "compatibility: the QAT names qatcore.quantization re-exported before the engine moved out, "
        "resolved lazily (PEP 562) so that importing qatcore.quantization does not load the engine",
}

PACKAGE_DIRS = {"qatcore": Path(qatcore.__file__).parent, "qatcore.kernels": Path(qatcore.kernels.__file__).parent}


def _layer(module: str) -> int:
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


# ---- at run time ----------------------------------------------------------------------
CHILD = textwrap.dedent('''
    import importlib, importlib.util, json, os, sys
    import numpy  # not qatcore: loaded once, before the children fork

    def loaded_by(target):
        spec = importlib.util.find_spec("qatcore")
        sys.modules["qatcore"] = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
        importlib.import_module(target)
        return sorted(name for name in sys.modules if name == "qatcore" or name.startswith("qatcore."))

    results = {}
    for target in json.loads(sys.argv[1]):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                report = {"loaded": loaded_by(target)}
            except BaseException as error:
                report = {"error": f"{type(error).__name__}: {error}"}
            with os.fdopen(write, "w") as out:
                out.write(json.dumps(report))
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as answer:
            results[target] = json.loads(answer.read())
        os.waitpid(pid, 0)
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def loaded_by_import():
    """module -> the qatcore modules importing it loads (or its import error), from clean interpreters."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork to give each import a clean interpreter quickly")
    targets = [name for name in MODULES if name != "qatcore.__main__"]  # __main__ runs the command line
    # one BLAS thread, so the parent has no other thread when it forks
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(targets)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"qatcore", "qatcore.__main__"}))
def test_importing_a_module_loads_nothing_from_a_higher_layer(module, loaded_by_import):
    report = loaded_by_import[module]
    if "error" in report and "No module named 'onnx'" in report["error"]:
        pytest.skip("the onnx extra is not installed")
    assert "error" not in report, report.get("error")
    exempt = _ancestors(module)  # packages Python runs before the module (the root is bare)
    higher = [name for name in report["loaded"] if name not in exempt and _layer(name) > _layer(module)]
    assert not higher, (f"importing {module} (layer {LAYERS[_layer(module)][0]}) loads "
                        + ", ".join(f"{name} ({LAYERS[_layer(name)][0]})" for name in higher))


ROOT_CHECK = textwrap.dedent('''
    import json, sys
    import qatcore
    core = sorted(name for name in sys.modules if name.startswith("qatcore"))
    heavy_at_import = sorted(name for name in sys.modules if name.split(".")[0] in ("numba", "onnx", "onnxruntime"))
    resolved = {
        "qatcore.optim.SGD": qatcore.optim.SGD.__name__,
        "qatcore.nn.Linear": qatcore.nn.Linear.__name__,
        "qatcore.data.DataLoader": qatcore.data.DataLoader.__name__,
        "qatcore.models.DigitsCNN": qatcore.models.DigitsCNN.__name__,
        "qatcore.graph.trace": qatcore.graph.trace.__name__,
        "qatcore.quantization.QuantSpec": qatcore.quantization.QuantSpec.__name__,
        "qatcore.quantization.qat.QATPreparer": qatcore.quantization.qat.QATPreparer.__name__,
        "qatcore.interop.onnx.export_onnx": qatcore.interop.onnx.export_onnx.__name__,
        "qatcore.training.train_one_epoch": qatcore.training.train_one_epoch.__name__,
        "qatcore.kernels": qatcore.kernels.__name__,
    }
    heavy_after = sorted(name for name in sys.modules if name.split(".")[0] in ("numba", "onnx", "onnxruntime"))
    print(json.dumps({"core": core, "heavy_at_import": heavy_at_import, "resolved": resolved,
                      "heavy_after": heavy_after, "dir": dir(qatcore), "all": qatcore.__all__}))
''')


def test_import_qatcore_loads_the_core_only_and_reaches_every_subpackage():
    run = subprocess.run([sys.executable, "-c", ROOT_CHECK], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    functional = _layer("qatcore.nn.functional")
    beyond_core = [name for name in report["core"]
                   if name != "qatcore" and name != "qatcore.nn" and _layer(name) > functional]
    assert not beyond_core, f"import qatcore loads more than the core: {beyond_core}"
    assert report["heavy_at_import"] == []
    assert report["heavy_after"] == []  # reaching the subpackages imports neither numba nor onnx either
    for path, name in report["resolved"].items():  # each object's own __name__
        assert path == name or path.endswith("." + name), (path, name)
    subpackages = ["autograd", "ops", "nn", "optim", "data", "models", "graph", "quantization", "interop",
                   "training", "kernels"]
    assert set(subpackages) <= set(report["all"]) & set(report["dir"])


def test_lazy_names_of_a_package_are_the_defining_modules_objects():
    import qatcore.interop as interop
    import qatcore.nn as nn
    import qatcore.quantization as quantization
    from qatcore.nn.linear import Linear
    from qatcore.quantization import qat

    assert nn.Linear is Linear
    for name in ("QATPreparer", "save_qat_checkpoint", "convert_to_quantized", "parity_report"):
        assert getattr(quantization, name) is getattr(qat, name)
        assert name not in quantization.__all__  # the engine's names are qat's to list
    for package in (qatcore, nn, quantization, interop, qatcore.kernels):
        assert set(package.__all__) <= set(dir(package))
        with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
            package.no_such_name  # noqa: B018


# ---- statically -------------------------------------------------------------------------
def _resolve(name: str) -> str:
    """The module an import of ``name`` loads (``a.b.Name`` -> ``a.b``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
        assert name, "an import of something that is no qatcore module"
    return name


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in ``path``, function-local ones too
    (``if TYPE_CHECKING:`` blocks left out), and every source a ``lazy_exports`` call names."""
    found = []
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package_parts[:len(package_parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, node.lineno)
                      for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
            for keyword in node.keywords:
                if keyword.arg == "submodules":
                    found += [(f"{module}.{element.value}", node.lineno) for element in keyword.value.elts]
                elif keyword.arg == "names":
                    found += [(key.value, node.lineno) for key in keyword.value.keys]
    return [(_resolve(name), line) for name, line in found if name.split(".")[0] == "qatcore"]


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_import_points_to_the_same_layer_or_below():
    upward = []
    for module, imported in IMPORTS.items():
        for target, line in imported:
            if _layer(target) > _layer(module) and (module, target) not in ALLOWED_UPWARD:
                upward.append(f"{MODULES[module].name}:{line} {module} ({LAYERS[_layer(module)][0]}) imports "
                              f"{target} ({LAYERS[_layer(target)][0]})")
    assert not upward, "\n".join(upward)


def test_the_allowed_upward_imports_still_exist():
    edges = {(module, target) for module, imported in IMPORTS.items() for target, _ in imported}
    assert set(ALLOWED_UPWARD) <= edges, "an allowed exception is gone: remove it from ALLOWED_UPWARD"


def test_the_import_graph_has_no_cycle():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for module, imported in IMPORTS.items():
        for target, _ in imported:
            # importing a.b.c runs a and a.b first; a module inside a package does not import it again
            for name in {target} | _ancestors(target):
                if name != module and name in MODULES and not module.startswith(name + "."):
                    graph[module].add(name)
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    for start in graph:
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = "open"
        while stack:  # depth-first, with an explicit stack
            following = next(stack[-1], None)
            if following is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(following) == "open":
                cycle = path[path.index(following):] + [following]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            elif following not in state:
                state[following] = "open"
                path.append(following)
                stack.append(iter(sorted(graph[following])))
