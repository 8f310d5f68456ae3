"""MPIGroup and launch_workers on real MPI processes: each test writes a small rank script
to tmp_path and runs it under mpiexec (``subprocess.run`` with a timeout, so a hang fails the
test instead of stalling the suite).

The tests that start MPI processes need the "distributed" extra (mpi4py and an mpiexec) and
are skipped, with that reason, without it; the argument checks and the missing-mpi4py error
run everywhere, since they are what a user without the extra meets.
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest

from qatcore.distributed import MPIGroup, find_mpiexec, launch_workers
from qatcore.distributed.launch import mpiexec_flags
from qatcore.errors import ConfigError


def _mpi_missing() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return 'mpi4py is not installed (pip install "qatcore[distributed]")'
    try:
        find_mpiexec()
    except ConfigError as e:
        return str(e)
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=f"needs MPI: {_mpi_missing()}")


def _run_ranks(tmp_path, n: int, body: str, timeout_s: float, via_launch_workers: bool = False):
    """Run ``body`` as a rank script on ``n`` ranks; the CompletedProcess (text output)."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(body))
    if via_launch_workers:
        command = [sys.executable, "-c", "import sys; from qatcore.distributed import launch_workers; "
                   f"sys.exit(launch_workers({n}, [{str(script)!r}]))"]
    else:
        mpiexec = find_mpiexec()
        command = [mpiexec, *mpiexec_flags(mpiexec), "-n", str(n), sys.executable, str(script)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=tmp_path)


_REDUCTIONS = """
    import sys
    import numpy as np
    from qatcore.distributed import MPIGroup, failing_fast
    from qatcore.errors import ConfigError, DTypeError

    group = MPIGroup.world(timeout=20)
    with failing_fast(group):
        rng = np.random.default_rng(1000 + group.rank)
        for dtype in (np.float32, np.float64, np.int64):
            for size in (1, 7, 300):   # fewer elements than ranks, too: some blocks are empty
                x = (rng.standard_normal((size, 1)) * 1e4).astype(dtype)
                inputs = group.allgather_object(x)
                for op in ("sum", "min", "max"):
                    result = group.allreduce(x, op)
                    assert result.shape == x.shape and result.dtype == x.dtype
                    everyone = group.allgather_object(result.tobytes())
                    assert all(bits == everyone[0] for bits in everyone), (op, dtype, size, "bits differ")
                    if op == "sum" and dtype != np.int64:
                        expected = sum(inputs[1:], inputs[0].astype(np.float64))
                        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-2)
                    else:
                        combine = {"sum": np.add, "min": np.minimum, "max": np.maximum}[op]
                        np.testing.assert_array_equal(result, combine.reduce(np.stack(inputs)))
        # several in flight, of different sizes, waited in the order started
        pending = [group.iallreduce(np.full(k + 1, group.rank + 10.0 * k), "sum") for k in range(5)]
        n = group.world_size
        for k, p in enumerate(pending):
            assert p.wait().tolist() == [n * (n - 1) / 2 + n * 10.0 * k] * (k + 1)
        root = n - 1
        got = group.broadcast(np.arange(6, dtype=np.float32).reshape(2, 3) * (group.rank + 1), root=root)
        assert got.tolist() == (np.arange(6, dtype=np.float32).reshape(2, 3) * n).tolist()
        assert group.broadcast_object({"from": group.rank}, root=root) == {"from": root}
        assert group.allgather_object(("rank", group.rank)) == [("rank", r) for r in range(n)]
        group.barrier()
        for bad, error in (((np.ones(2), "mean"), ConfigError), ((np.ones(2, bool), "sum"), DTypeError)):
            try:
                group.allreduce(*bad)
            except error:
                pass
            else:
                raise AssertionError(f"allreduce{bad} did not raise {error.__name__}")
        sys.stdout.write(f"rank {group.rank} of {n}: all reductions agree\\n")  # one write: ranks share stdout
"""


@needs_mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_reductions_match_numpy_and_are_bitwise_equal_on_every_rank(tmp_path, n):
    done = _run_ranks(tmp_path, n, _REDUCTIONS, timeout_s=60)
    assert done.returncode == 0, done.stderr
    agreed = re.findall(rf"rank (\d) of {n}: all reductions agree", done.stdout)
    assert sorted(agreed) == [str(r) for r in range(n)], done.stdout


_FAILS_AT_STEP_20 = """
    import os, signal, sys
    import numpy as np
    from qatcore.distributed import MPIGroup, failing_fast

    group = MPIGroup.world(timeout={timeout})
    with failing_fast(group):
        for step in range(1_000_000):
            if step == 20 and group.rank == 1:
                {failure}
            group.allreduce(np.ones(4, np.float32))
"""


@needs_mpi
def test_a_rank_that_raises_stops_every_rank_and_the_others_name_it(tmp_path):
    body = _FAILS_AT_STEP_20.format(timeout=30, failure='raise ValueError("bad batch at step 20")')
    done = _run_ranks(tmp_path, 3, body, timeout_s=20, via_launch_workers=True)
    assert done.returncode != 0
    assert "qatcore: rank 1 of 3 failed: ValueError: bad batch at step 20" in done.stderr
    for survivor in (0, 2):
        assert (f"qatcore: rank {survivor} of 3 stopped: rank 1 failed: ValueError: bad batch at step 20"
                in done.stderr), done.stderr


@needs_mpi
def test_a_killed_rank_stops_the_others_and_they_name_it(tmp_path):
    body = _FAILS_AT_STEP_20.format(timeout=10, failure="os.kill(os.getpid(), signal.SIGKILL)")
    done = _run_ranks(tmp_path, 3, body, timeout_s=60, via_launch_workers=True)
    assert done.returncode != 0  # and mpiexec returned: no rank is left hanging
    assert "Killed (signal 9)" in done.stdout, done.stdout  # hydra's own report of the kill
    # Hydra SIGKILLs the survivors some time after the kill (not yet explained: see the
    # MPIGroup docstring), sometimes before any of them has printed; whatever a survivor
    # printed names the lost rank, and the launcher, which watched the ranks' processes, always does.
    stopped = [line for line in done.stderr.splitlines() if " stopped: " in line]
    assert all(" stopped: rank 1 (pid " in line and "is gone: it exited or was killed" in line
               for line in stopped), done.stderr
    assert "qatcore: rank 1 of 3 (pid " in done.stderr and "was lost first (Killed (signal 9))" in done.stderr, \
        done.stderr


@needs_mpi
def test_a_rank_that_stops_answering_is_named_after_the_timeout(tmp_path):
    body = _FAILS_AT_STEP_20.format(timeout=1, failure="import time; time.sleep(4)")
    done = _run_ranks(tmp_path, 3, body, timeout_s=30, via_launch_workers=True)
    assert done.returncode != 0
    for survivor in (0, 2):
        assert (f"qatcore: rank {survivor} of 3 stopped: allreduce did not complete within 1 s; rank 1 (pid "
                in done.stderr), done.stderr
    assert "did not answer a roll call" in done.stderr


# ---- without MPI: arguments and the missing extra ----------------------------------------


def test_a_missing_mpi4py_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` raise ImportError
    with pytest.raises(ConfigError, match=r'pip install "qatcore\[distributed\]"'):
        MPIGroup.world()


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), "60", True])
def test_world_rejects_a_timeout_that_is_not_a_positive_number(timeout):
    with pytest.raises(ConfigError, match="timeout must be a positive number of seconds"):
        MPIGroup.world(timeout=timeout)


@pytest.mark.parametrize("n", [0, -2, 1.5, True, "2"])
def test_launch_workers_rejects_a_bad_rank_count(n):
    with pytest.raises(ConfigError, match="n must be a positive int"):
        launch_workers(n, ["train.py"])


@pytest.mark.parametrize("argv", ["train.py", [], ["train.py", 3]])
def test_launch_workers_rejects_a_bad_argv(argv):
    with pytest.raises(ConfigError, match="argv must be a non-empty list of strings"):
        launch_workers(2, argv)


def test_find_mpiexec_prefers_the_one_beside_python_and_names_the_extra_without_one(tmp_path, monkeypatch):
    venv_bin = tmp_path / "bin"
    venv_bin.mkdir()
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r'pip install "qatcore\[distributed\]"'):
        find_mpiexec()
    beside = venv_bin / "mpiexec"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(beside.stat().st_mode | stat.S_IXUSR)
    assert find_mpiexec() == str(beside)


@pytest.mark.parametrize("version, flags", [
    ("HYDRA build details:\n    Version: 5.0.2\n", ["-disable-auto-cleanup"]),
    ("mpiexec (Open MPI) 5.0.3\n", []),
    ("mpiexec (OpenRTE) 4.1.6\n", []),
])
def test_mpiexec_flags_follow_the_implementation(tmp_path, version, flags):
    fake = tmp_path / "mpiexec"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version}EOF\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert mpiexec_flags(str(fake)) == flags


def test_mpiexec_flags_refuse_an_unknown_implementation(tmp_path):
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'Some Other MPI Library, Version 2021'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(ConfigError, match="neither MPICH's hydra nor Open MPI.*Some Other MPI"):
        mpiexec_flags(str(fake))


def test_importing_the_mpi_modules_does_not_import_mpi4py():
    code = ("import sys, qatcore, qatcore.distributed.mpi_group, qatcore.distributed.launch; "
            "print('mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONWARNINGS": "error"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
