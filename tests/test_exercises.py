"""The exercises in docs/exercises are complete and their checks have teeth.

For every ``docs/exercises/exNN_*.py``: its solution passes ``check_exNN``, the unsolved file
fails it, the unsolved file is its solution with only the bodies of ``EXERCISE_FUNCTIONS``
replaced by ``raise NotImplementedError("exercise NN: ...")``, the README lists it, and typical
mistakes fail the check. The exercises are loaded by file path (pytest runs with
``--import-mode=importlib``; docs/exercises is not a package).
"""

import ast
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

EXERCISE_DIR = Path(__file__).resolve().parents[1] / "docs" / "exercises"
EXERCISES = sorted(EXERCISE_DIR.glob("ex[0-9][0-9]_*.py"))
IDS = [path.stem for path in EXERCISES]


def load(path: Path, prefix: str):
    spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_of(path: Path):
    return getattr(load(EXERCISE_DIR / "checks.py", "checks"), f"check_{path.stem[:4]}")


def test_at_least_eight_exercises_numbered_in_order():
    assert len(EXERCISES) >= 8
    assert [path.name[2:4] for path in EXERCISES] == [f"{n:02d}" for n in range(1, len(EXERCISES) + 1)]


def test_every_exercise_has_a_solution_a_check_and_a_readme_entry():
    checks = load(EXERCISE_DIR / "checks.py", "checks")
    readme = (EXERCISE_DIR / "README.md").read_text()
    solutions = sorted(path.name for path in (EXERCISE_DIR / "solutions").glob("ex*.py"))
    assert solutions == [path.name for path in EXERCISES], "one solution per exercise, same file name"
    check_names = sorted(name for name in vars(checks) if re.fullmatch(r"check_ex\d\d", name))
    assert check_names == [f"check_{path.stem[:4]}" for path in EXERCISES], "one check per exercise"
    assert sorted(checks.__all__) == check_names
    for path in EXERCISES:
        assert f"`{path.name}`" in readme, f"README.md does not list {path.name}"


@pytest.mark.parametrize("path", EXERCISES, ids=IDS)
def test_solution_passes_its_check(path, capsys):
    solution = load(EXERCISE_DIR / "solutions" / path.name, "solution")
    check_of(path)(solution)
    solution.main()  # the given code runs end to end and prints what the docstring asks to observe
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("path", EXERCISES, ids=IDS)
def test_unsolved_exercise_fails_its_check(path):
    with pytest.raises((AssertionError, NotImplementedError)):
        check_of(path)(load(path, "exercise"))


def _top_level(path: Path) -> tuple[ast.Module, tuple[str, ...]]:
    tree = ast.parse(path.read_text())
    names = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             and [getattr(t, "id", None) for t in node.targets] == ["EXERCISE_FUNCTIONS"]]
    assert len(names) == 1, f"{path.name}: one EXERCISE_FUNCTIONS tuple"
    return tree, names[0]


@pytest.mark.parametrize("path", EXERCISES, ids=IDS)
def test_exercise_is_its_solution_without_the_bodies(path):
    exercise, names = _top_level(path)
    solution, solution_names = _top_level(EXERCISE_DIR / "solutions" / path.name)
    assert names == solution_names and names
    assert ast.get_docstring(exercise) == ast.get_docstring(solution)
    assert len(exercise.body) == len(solution.body)
    number = path.name[2:4]
    for mine, solved in zip(exercise.body, solution.body):
        if isinstance(solved, ast.FunctionDef) and solved.name in names:
            assert isinstance(mine, ast.FunctionDef) and mine.name == solved.name
            assert ast.dump(mine.args) == ast.dump(solved.args)
            assert (mine.returns is None) == (solved.returns is None)
            assert mine.returns is None or ast.dump(mine.returns) == ast.dump(solved.returns)
            assert ast.get_docstring(mine) == ast.get_docstring(solved) and ast.get_docstring(mine)
            body = mine.body[1:]
            assert len(body) == 1 and isinstance(body[0], ast.Raise), f"{mine.name}: only a raise after the docstring"
            call = body[0].exc
            assert call.func.id == "NotImplementedError" and call.args[0].value.startswith(f"exercise {number}: ")
        else:
            assert ast.dump(mine) == ast.dump(solved), f"{path.name}: the given code differs from the solution's"


# Typical mistakes, each a function replacing one of a solution's; the check must catch every one.
def _divide_by_scale(x, scale, zero_point, qmin, qmax):
    s = np.float32(scale)
    q = np.rint(np.asarray(x, np.float32) / s) + np.float32(zero_point)
    return ((np.clip(q, qmin, qmax) - np.float32(zero_point)) * s).astype(np.float32)


def _zero_point_before_rounding(x, scale, zero_point, qmin, qmax):
    s = np.float32(scale)
    q = np.rint(np.asarray(x, np.float32) * (np.float32(1) / s) + np.float32(zero_point))
    return ((np.clip(q, qmin, qmax) - np.float32(zero_point)) * s).astype(np.float32)


def _symmetric_over_qmax(solution):
    original = solution.scale_zero_point_from_range

    def scale_zero_point(min_val, max_val, qmin, qmax, symmetric):
        if not symmetric:
            return original(min_val, max_val, qmin, qmax, symmetric)
        largest = max(-min(np.float32(min_val), 0), max(np.float32(max_val), 0))
        return np.float32(max(largest / np.float32(qmax), np.finfo(np.float32).eps)), 0 if qmin < 0 else qmax // 2
    return scale_zero_point


def _staircase_slope(solution):  # the true derivative inside, forgetting what the STE adds
    def terms(x, scale, zero_point, qmin, qmax):
        x = np.asarray(x, np.float32)
        q = np.rint(x * (np.float32(1) / np.float32(scale))) + zero_point
        return np.clip(q, qmin, qmax).astype(np.float64) - zero_point
    return terms


def _mask_after_clamping(grad_y, x, scale, zero_point, qmin, qmax):
    return np.asarray(grad_y, np.float32) * np.float32(1)


def _mask_by_select(solution):
    original = solution.ste_backward

    def backward(grad_y, x, scale, zero_point, qmin, qmax):
        passed = original(np.ones_like(grad_y), x, scale, zero_point, qmin, qmax) == 1
        return np.where(passed, np.asarray(grad_y, np.float32), np.float32(0))
    return backward


def _without_correction(solution):
    fold_eval = solution.fold_eval

    def forward(x, weight, bias, gamma, beta, running_mean, running_var, eps, weight_fake_quant,
                use_batch_statistics=True):
        folded_weight, folded_bias = fold_eval(weight, bias, gamma, beta, running_mean, running_var, eps)
        return (np.asarray(x, np.float64) @ np.asarray(weight_fake_quant(folded_weight), np.float64).T
                + folded_bias).astype(np.float32)
    return forward


def _no_carry(real_multiplier):
    fraction, exponent = np.frexp(np.asarray(real_multiplier, dtype=np.float64))
    return np.floor(fraction * 2.0**31 + 0.5).astype(np.int64), (-exponent).astype(np.int64)


def _amplitude_db(x, y):  # 20 log10 of a power ratio: twice the decibels
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    noise = np.sum((x64 - y64) ** 2)
    return float("inf") if noise == 0 else float(20 * np.log10(np.sum(x64 * x64) / noise))


def _expanded_without_constant(solution):
    original = solution.matmul_expanded

    def expanded(a_q, a_zero, b_q, b_zero):
        depth = np.shape(a_q)[1]
        return original(a_q, a_zero, b_q, b_zero) - depth * a_zero * b_zero
    return expanded


MISTAKES = [  # (exercise number, function replaced, the wrong one or a factory taking the solution module)
    ("01", "fake_quantize", _divide_by_scale),
    ("01", "fake_quantize", _zero_point_before_rounding),
    ("01", "scale_zero_point_from_range", _symmetric_over_qmax),
    ("02", "scale_gradient_terms", _staircase_slope),
    ("02", "grad_factor", lambda numel, qmax: 1.0),
    ("03", "ste_backward", _mask_after_clamping),
    ("03", "ste_backward", _mask_by_select),
    ("03", "clip_fraction", lambda x, scale, zero_point, qmin, qmax: 0.0),
    ("04", "krishnamoorthi_forward", _without_correction),
    ("05", "quantize_multiplier", _no_carry),
    ("05", "headroom_shift", lambda acc, shift: np.zeros(np.shape(acc), np.int64)),
    ("06", "sqnr_db", _amplitude_db),
    ("07", "percentile_range", lambda x, percentile: (np.float32(np.min(x)), np.float32(np.max(x)))),
    ("08", "predicted_sqnr_db", lambda bits: 6.02 * bits),
    ("09", "matmul_expanded", _expanded_without_constant),
]
FACTORIES = {_symmetric_over_qmax, _staircase_slope, _mask_by_select, _without_correction, _expanded_without_constant}


@pytest.mark.parametrize("number, name, wrong", MISTAKES, ids=[f"ex{n}-{f}-{w.__name__}" for n, f, w in MISTAKES])
def test_checks_catch_typical_mistakes(number, name, wrong):
    (path,) = [p for p in EXERCISES if p.name.startswith(f"ex{number}_")]
    solution = load(EXERCISE_DIR / "solutions" / path.name, "mistake")
    # module functions look their helpers up in the module, so replacing one changes every caller
    setattr(solution, name, wrong(solution) if wrong in FACTORIES else wrong)
    with pytest.raises(AssertionError):
        check_of(path)(solution)
