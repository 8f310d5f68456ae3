"""kernels/ is installed as qatcore.kernels: from the editable install the suite
runs on, and from a wheel; importing qatcore compiles nothing and stays fast."""

import os
import subprocess
import sys
from pathlib import Path

import qatcore
import qatcore.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_map_to_top_level_folder():
    assert Path(qatcore.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_import_is_fast_and_compiles_nothing():
    code = (
        "import time, sys; t = time.perf_counter(); import qatcore, qatcore.nn, qatcore.optim, "
        "qatcore.data, qatcore.models; dt = time.perf_counter() - t; "
        "print(dt, 'numba' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, numba_loaded = out.split()
    assert float(seconds) < 1.0
    assert numba_loaded == "False"  # kernels load numba on first use, not at import


def test_wheel_contains_and_imports_kernels(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stderr
    wheels = list(wheel_dir.glob("qatcore-*.whl"))
    assert len(wheels) == 1
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheels[0])],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    code = (
        "import qatcore, qatcore.kernels.im2col, qatcore.data, qatcore.pipeline; "
        "print(qatcore.__file__); print(qatcore.kernels.im2col.__file__); "
        "print(len(qatcore.data.load_digits()[0])); print(qatcore.pipeline.__file__)"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=env).stdout.splitlines()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site))
    assert out[1].endswith(os.path.join("qatcore", "kernels", "im2col.py"))
    assert int(out[2]) > 1000
    assert out[3].startswith(str(site))  # every subpackage is listed in pyproject.toml
