"""Data-parallel QAT on real MPI ranks (``mpiexec -n 2`` and ``-n 4`` on this machine): the
acceptance of docs/distributed.md. Skipped, saying why, without the distributed extra
(``pip install "qatcore[distributed]"``); CI installs it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("mpi4py") is None:
    pytest.skip('needs the distributed extra: pip install "qatcore[distributed]"', allow_module_level=True)

from qatcore.distributed import find_mpiexec  # noqa: E402
from qatcore.errors import ConfigError  # noqa: E402

try:
    MPIEXEC = find_mpiexec()
except ConfigError as e:  # pragma: no cover - the extra without its mpiexec
    pytest.skip(str(e), allow_module_level=True)

SCRIPTS = Path(__file__).parent / "scripts"
RUN = ["--model", "cnn", "--epochs", "3", "--qat-epochs", "2", "--batch-size", "64", "--json"]


def _mpiexec(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout)


def _qatcore(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qatcore", "run", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("ranks", [2, 4])
def test_distributed_qat_keeps_ranks_identical_and_equals_one_process_on_the_global_batch(ranks):
    """scripts/qat_equivalence.py says why QAT is compared step by step and float free-running."""
    done = _mpiexec(ranks, str(SCRIPTS / "qat_equivalence.py"), "20")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["world_size"] == ranks and result["qat_steps"] == 20
    assert result["qat_identical_every_step"], "parameters, buffers or qparams differed between ranks after a step"
    assert result["qat_step_observer_ranges_exact"] == 20, "an observer's range differed from one process's"
    assert result["qat_step_max_rel_bn"] <= 1e-5 and result["qat_step_max_rel_params"] <= 1e-5, result
    assert result["float_max_rel_bn"] <= 1e-5 and result["float_max_rel_params"] <= 1e-5, result
    # free-running QAT drifts no more than one process does when its weights move by one ulp
    assert result["qat_free_running_max_rel_params"] <= 2 * result["qat_one_ulp_sensitivity_max_rel_params"]
    assert result["parity_exact"] == 1.0 and result["top1"] == 1.0, result


def test_the_program_of_docs_distributed_md_runs_on_two_ranks(tmp_path):
    text = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/distributed.md shows its program"
    script = tmp_path / "program.py"
    # one write per rank (print with several arguments writes them apart, and the ranks share stdout)
    script.write_text(blocks[0] + "\nimport sys\nsys.stdout.write(f'rank {group.rank} of {group.world_size} done\\n')\n"
                      "sys.stdout.flush()\n")
    done = _mpiexec(2, str(script))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.splitlines()) == ["rank 0 of 2 done", "rank 1 of 2 done"], done.stdout


def test_workers_run_prints_one_summary_and_converts_exactly(tmp_path):
    done = _qatcore("--workers", "2", *RUN, "--output", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # rank 0 alone prints
    result = json.loads(lines[0])
    assert result["parity_exact"] == 1.0 and result["int8_accuracy"] > 0.8
    assert not (tmp_path / "run" / "resume.ckpt").exists()
    assert {"float.qat", "qat.ckpt", "model.int8", "result.json"} <= {p.name for p in (tmp_path / "run").iterdir()}


def _rank_pid(folder: Path, rank: int) -> int | None:
    """The pid of rank ``rank`` of the run writing ``folder`` (from /proc: mpich's PMI_RANK)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(folder).encode() in command and b"--distributed" in command and f"PMI_RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_others_naming_it_and_the_run_resumes_at_any_world_size(tmp_path):
    reference = tmp_path / "uninterrupted"
    done = _qatcore("--workers", "2", *RUN, "--output", str(reference))
    assert done.returncode == 0, done.stderr[-3000:]

    folder = tmp_path / "killed"
    run = subprocess.Popen([sys.executable, "-m", "qatcore", "run", "--workers", "2", *RUN, "--output", str(folder),
                            "--rank-timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (folder / "resume.ckpt").exists():  # an epoch has ended: a checkpoint to come back to
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    pid = _rank_pid(folder, 1)
    assert pid is not None, "rank 1's process not found"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = run.communicate(timeout=120)
    assert time.monotonic() - killed < 60, "the surviving rank took too long to stop"
    assert run.returncode != 0
    assert "rank 1" in stderr, stderr[-3000:]

    for ranks in (1, 4):  # the same checkpoint continues at another world size
        copy = tmp_path / f"resumed-{ranks}"
        shutil.copytree(folder, copy)
        args = ["--resume", str(copy), "--json"] + ([] if ranks == 1 else ["--workers", str(ranks)])
        finished = _qatcore(*args)
        assert finished.returncode == 0, finished.stderr[-3000:]
        assert json.loads(finished.stdout.strip().splitlines()[-1])["parity_exact"] == 1.0

    finished = _qatcore("--workers", "2", "--resume", str(folder), "--json")
    assert finished.returncode == 0, finished.stderr[-3000:]
    for name in ("float.qat", "model.int8"):  # at the same world size, the run it would have been
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    ours, theirs = (json.loads((f / "result.json").read_text()) for f in (folder, reference))
    for key in ("float_accuracy", "ptq_accuracy", "qat_accuracy", "int8_accuracy", "parity_exact"):
        assert ours[key] == theirs[key], key
