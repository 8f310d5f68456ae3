"""Start N ranks of a Python script under ``mpiexec``, set up so that a lost rank is reported.

:func:`launch_workers` runs ``mpiexec <flags> -n N <this python> <argv...>`` and returns its
exit code. The flags depend on the MPI implementation, read off ``mpiexec --version``:

- MPICH's launcher, hydra (what ``pip install "qatcore[distributed]"`` installs: the
  ``mpich`` wheel puts ``mpiexec`` beside the venv's python; its version output starts with
  ``HYDRA build details``): ``-disable-auto-cleanup``. By default hydra kills every rank the
  moment one dies, with ``BAD TERMINATION ... PID ...`` and no word on which rank or why.
  With the flag the survivors keep running (hydra sends them SIGUSR1, which
  :class:`~qatcore.distributed.MPIGroup` catches), find out which rank was lost and print it
  before they stop.
- Open MPI (``mpiexec (Open MPI) ...`` or ``(OpenRTE)``): no flag. Its runtime stops the whole
  job when a rank exits non-zero or is killed and prints which rank it was; Open MPI has no
  portable switch to keep the survivors running (only fault-tolerant ULFM builds do), so they
  are stopped by the runtime rather than by their own report.
- anything else: ConfigError, rather than guessing at flags.

Hydra may still kill the survivors before they have printed anything (see ``MPIGroup``), so
the launcher names the lost rank too: each rank leaves its pid and host in a folder the
launcher gives it (``QATCORE_RANK_FOLDER``), the launcher watches those processes while it
waits, and when mpiexec fails it prints which rank's process was gone first, e.g.
``qatcore: rank 1 of 2 (pid 4242 on vm) was lost first (Killed (signal 9)); every rank
stopped``. mpiexec's output passes through unchanged.

>>> launch_workers(0, ["train.py"])
Traceback (most recent call last):
...
qatcore.errors.ConfigError: launch_workers: n must be a positive int (the number of ranks), got 0
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from qatcore.distributed.mpi_group import RANK_FOLDER_VARIABLE, _process_is_gone, _process_start_ticks
from qatcore.errors import ConfigError

__all__ = ["find_mpiexec", "launch_workers", "mpiexec_flags"]

_INSTALL = 'pip install "qatcore[distributed]"'


def find_mpiexec() -> str:
    """The path of ``mpiexec``: the one beside ``sys.executable`` (where the ``mpich`` wheel
    installs it in a venv) first, else the first on PATH; ConfigError naming the install
    command when there is none."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise ConfigError(f"no mpiexec beside {sys.executable} or on PATH; install MPI with {_INSTALL}")
    return found


def mpiexec_flags(mpiexec: str) -> list[str]:
    """The flags that keep the survivors of a lost rank running under this ``mpiexec`` (see
    the module docstring), chosen from its ``--version`` output."""
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"could not run {mpiexec} --version: {e}") from None
    text = version.stdout + version.stderr
    if "HYDRA" in text:
        return ["-disable-auto-cleanup"]
    if "Open MPI" in text or "OpenRTE" in text:
        return []
    first_line = text.strip().splitlines()[0] if text.strip() else "(nothing)"
    raise ConfigError(f"{mpiexec} is neither MPICH's hydra nor Open MPI (its --version printed {first_line!r}); "
                      f"install MPICH with {_INSTALL}")


def launch_workers(n: int, argv: list[str]) -> int:
    """Run ``argv`` (a script and its arguments) on ``n`` ranks with this interpreter under
    ``mpiexec`` and return its exit code (128 + the signal number if mpiexec itself was
    killed by a signal). SIGINT and SIGTERM sent to this process while it waits are passed
    on to mpiexec, which passes them on to the ranks."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"launch_workers: n must be a positive int (the number of ranks), got {n!r}")
    if isinstance(argv, str) or not all(isinstance(arg, str) for arg in argv) or not argv:
        raise ConfigError(f"launch_workers: argv must be a non-empty list of strings (the script and its "
                          f"arguments), got {argv!r}")
    mpiexec = find_mpiexec()
    command = [mpiexec, *mpiexec_flags(mpiexec), "-n", str(n), sys.executable, *argv]
    with tempfile.TemporaryDirectory(prefix="qatcore-ranks-") as folder:
        env = {**os.environ, RANK_FOLDER_VARIABLE: folder}
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 errors="replace")
        report = _LauncherReport(child.stdout, child.stderr, Path(folder))
        returncode = _wait(child)
        report.finish()
        if returncode != 0:
            lost = report.lost_rank()
            if lost:
                print(f"qatcore: {lost}", file=sys.stderr, flush=True)
    return 128 - returncode if returncode < 0 else returncode


class _LauncherReport:
    """Passes mpiexec's stdout and stderr through, line by line, and watches the ranks'
    processes (from the files they leave in the launcher's folder) to tell which one was lost
    first: the survivors say it themselves when they can, but hydra may kill them first."""

    def __init__(self, stdout, stderr, folder: Path) -> None:
        self.exit_string: str | None = None
        self._folder = folder
        self._ranks: dict[int, tuple[str, int, str, int | None]] = {}  # rank -> (world, pid, host, ticks)
        self._lost: list[int] = []  # ranks in the order their processes were seen gone
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._pump, args=(stream, target), daemon=True)
                         for stream, target in ((stdout, sys.stdout), (stderr, sys.stderr))]
        self._threads.append(threading.Thread(target=self._watch, daemon=True))
        for thread in self._threads:
            thread.start()

    def _pump(self, stream, target) -> None:
        for line in stream:
            target.write(line)
            target.flush()
            found = re.search(r"EXIT STRING: (.+)", line)
            if found and self.exit_string is None:
                self.exit_string = found.group(1).strip()

    def _watch(self) -> None:
        here = socket.gethostname()
        world: int | None = None
        while not self._done.wait(0.01):
            if world is None or len(self._ranks) < world:  # until every rank has left its file
                for path in self._folder.glob("rank-*"):
                    if path.suffix == ".tmp":  # still being written (the rank renames it when done)
                        continue
                    try:
                        rank_text, world_text, pid, host = path.read_text().split()
                        rank = int(rank_text)
                    except (OSError, ValueError):
                        continue
                    if rank not in self._ranks:
                        world = int(world_text)
                        self._ranks[rank] = (world_text, int(pid), host, _process_start_ticks(int(pid)))
            for rank, (_, pid, host, ticks) in self._ranks.items():
                if rank not in self._lost and host == here and _process_is_gone(pid, ticks):
                    self._lost.append(rank)

    def finish(self) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def lost_rank(self) -> str | None:
        """"rank 1 of 2 (pid 1234 on vm) was lost first (Killed (signal 9)); every rank stopped",
        or None when no rank's process was seen gone before the others."""
        if not self._lost:
            return None
        rank = self._lost[0]
        world, pid, host, _ = self._ranks[rank]
        how = f" ({self.exit_string})" if self.exit_string else ""
        return f"rank {rank} of {world} (pid {pid} on {host}) was lost first{how}; every rank stopped"


def _wait(child: subprocess.Popen) -> int:
    """Wait for ``child``, passing SIGINT and SIGTERM on to it meanwhile."""
    forwarded = (signal.SIGINT, signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:  # Python only lets the main thread set signal handlers
        for signum in forwarded:
            previous[signum] = signal.signal(signum, lambda received, frame: child.send_signal(received))
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
