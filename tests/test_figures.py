"""The teaching figures: docs/figures/draw_figures.py draws them deterministically, and each
committed PNG is in docs/figures/ and shown by at least one docs/*.md page.

The script is drawn twice into two folders in one process. Its trained models (the digits
CNN, the TinyGPT) are made once per process (``functools.cache`` in the script), so the
second draw repeats everything else (the staircase, the QAT preparation, calibration and
conversion, the QAT run behind the statistics, every plot) and the comparison is of the
bytes of both draws; training twice would take the test past its time budget.
"""

import importlib.util
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES_DIR = ROOT / "docs" / "figures"
SCRIPT = FIGURES_DIR / "draw_figures.py"
# the figures the teaching path (issue 21) asks for
EXPECTED = ("staircase.png", "qat_vs_integer_graph.png", "per_tensor_vs_per_channel.png", "statistics.png",
            "tinygpt_outliers.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which must come first after the signature."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG: wrong signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"the first PNG chunk is {kind!r}, not IHDR"
    return struct.unpack(">II", data[16:24])


def _load_script():
    spec = importlib.util.spec_from_file_location("draw_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_draws(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="the figures need matplotlib: pip install 'qatcore[plot]'")
    script = _load_script()
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    return script, script.main(["--output", str(first)]), script.main(["--output", str(second)])


def test_the_script_draws_the_expected_figures_as_pngs(two_draws):
    script, first, second = two_draws
    assert tuple(script.FIGURES) == EXPECTED
    for paths in (first, second):
        assert [path.name for path in paths] == list(EXPECTED)
        for path in paths:
            width, height = _png_size(path.read_bytes())
            assert 800 <= width <= 1400 and 400 <= height <= 1400, f"{path.name} is {width} x {height} px"


def test_two_draws_write_the_same_bytes(two_draws):
    _, first, second = two_draws
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two draws"


@pytest.mark.parametrize("name", EXPECTED)
def test_each_figure_is_committed_and_shown_in_the_docs(name):
    committed = FIGURES_DIR / name
    assert committed.is_file(), f"docs/figures/{name} is not committed: run python docs/figures/draw_figures.py"
    _png_size(committed.read_bytes())
    pages = [page.name for page in sorted((ROOT / "docs").glob("*.md")) if f"figures/{name}" in page.read_text()]
    assert pages, f"no docs/*.md page shows figures/{name}"
