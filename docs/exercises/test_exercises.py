"""Checks your exercises: ``pytest docs/exercises`` runs them all, ``pytest docs/exercises -k ex03``
one of them (see docs/exercises/README.md).

Each test loads your ``docs/exercises/exNN_*.py`` by its file path and calls ``check_exNN`` from
``checks.py`` on it. An exercise you have not done yet fails with the NotImplementedError of its
first unwritten function; a wrong answer fails with an AssertionError that says what differs
from qatcore.
"""

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXERCISES = sorted(HERE.glob("ex[0-9][0-9]_*.py"))


def load_module(path: Path, prefix: str):
    """Import the file at ``path`` as a fresh module (not through sys.path or a package)."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", EXERCISES, ids=[path.stem for path in EXERCISES])
def test_exercise(path: Path) -> None:
    checks = load_module(HERE / "checks.py", "exercise_checks")
    check = getattr(checks, f"check_{path.stem[:4]}")
    check(load_module(path, "exercise"))
