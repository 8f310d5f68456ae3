"""``MPIGroup``: the ranks of a data-parallel run as MPI processes, which stop instead of hanging.

Each rank is one process started by ``mpiexec`` (see :func:`qatcore.distributed.launch_workers`);
the group talks through mpi4py, an optional extra (``pip install "qatcore[distributed]"``),
imported only when a group is made. A rank's script looks like this::

    from qatcore.distributed import MPIGroup, failing_fast
    from qatcore.process_group import use_group

    group = MPIGroup.world(timeout=60.0)
    with failing_fast(group), use_group(group):
        train(...)                     # every rank runs the same steps

**Same bits on every rank.** The MPI standard only *recommends* that ``MPI_Allreduce`` hand
every rank the same result; an implementation may combine the ranks' floats in a different
order on different ranks (and MPICH picks among several algorithms by message size and
tuning files). Float sums are not associative, so that could leave the ranks' models a few
ulps apart, and they would drift. The reduction here is therefore built so that each element
is reduced on exactly one rank and then copied: a *reduce-scatter* (rank ``k`` gets the
finished sum of the ``k``-th block of the array) followed by an *allgather* of the blocks.
It moves the same number of bytes as a ring allreduce. The two halves run on two separate
communicators, so that several reductions can be in flight (:meth:`MPIGroup.iallreduce`) and
each one's allgather starts as soon as its reduce-scatter is done, in the order the
reductions were started, which is the same on every rank (MPI asks that every rank start the
collectives of one communicator in the same order).

**Never hang.** Every wait polls its MPI request (``Test``, sleeping 0 s at first and then
backing off to 1 ms) and meanwhile looks for three signs that the run cannot finish:

1. a failure notice on the control channel (a third communicator): a rank whose work raised
   sends one to every other rank (:meth:`MPIGroup.announce_failure`, done by
   :func:`failing_fast`), and its peers raise ``DistributedError("rank 1 failed:
   ValueError: ...; stopping rank 0")``;
2. every 0.5 s, the processes of the peers on the same host (pids exchanged when the group
   is made): a pid that is gone or a zombie raises ``DistributedError("rank 1 (pid N on host
   H) is gone: it exited or was killed; stopping rank 0")``. Under ``mpiexec
   -disable-auto-cleanup`` MPICH's launcher also sends SIGUSR1 to the survivors when a rank
   dies (and, at the end of a run, when one exits before the others); its default action
   would kill them silently, so the group catches it (if nobody else handles SIGUSR1),
   checks its peers at once, and ignores it while the process exits;
3. ``timeout`` seconds without completion: a roll call (a ping over the control channel to
   every peer, answered by any rank that is itself waiting in the group) names the ranks that
   do not answer within a grace period; if they all answer, the ranks are making different
   calls.

Known gap: after a rank is SIGKILLed, hydra (MPICH 5.0.2) also SIGKILLs the survivors a
little later, sometimes before they have reported the lost rank; the run still ends, with
hydra's "Killed (signal 9)". A survivor busy outside the group's operations (a rank stuck in
a kernel) only learns of a failure at its next wait.

A rank that raises should stop its process with ``os._exit`` rather than return: returning
runs ``MPI_Finalize``, which waits for peers that may be gone. :func:`failing_fast` does that.

>>> MPIGroup.world(timeout=0)
Traceback (most recent call last):
...
qatcore.errors.ConfigError: MPIGroup.world: timeout must be a positive number of seconds, got 0
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from qatcore.errors import ConfigError, DistributedError, DTypeError
from qatcore.process_group import REDUCE_OPS, ProcessGroup

__all__ = ["MPIGroup", "PendingAllreduce", "failing_fast"]

_TAG_FAILURE, _TAG_PING, _TAG_PONG = 11, 12, 13
_PEER_CHECK_INTERVAL_S = 0.5
_MAX_POLL_SLEEP_S = 0.001
# a wait polls without sleeping this long first: most reductions of a training step finish
# within it, and a sleep, however short, costs tens of microseconds
_SPIN_S = 2e-4
# reductions of at most this many bytes over all ranks take the one-collective path
_SMALL_ALLREDUCE_BYTES = 1 << 16
_COMBINE = {"sum": np.add, "min": np.minimum, "max": np.maximum}
_ROLL_CALL_GRACE_S = 3.0
_ANNOUNCE_WAIT_S = 1.0
_GONE_GRACE_S = 0.05
_HOST_BYTES = 256
# set by launch_workers: the folder where each rank leaves "rank world_size pid host"
RANK_FOLDER_VARIABLE = "QATCORE_RANK_FOLDER"


def _import_mpi() -> Any:
    """mpi4py's ``MPI`` module, or ConfigError naming the extra to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConfigError('MPIGroup needs mpi4py and an MPI library, the "distributed" extra: '
                          'pip install "qatcore[distributed]"') from e
    return MPI


def _process_start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), which tells a
    reused pid from the original; None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])


def _process_is_gone(pid: int, start_ticks: int | None) -> bool:
    """True when ``pid`` no longer runs the process that had ``start_ticks``: it exited, is a
    zombie (dead, not yet reaped by the launcher) or the pid was reused."""
    if start_ticks is not None:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return True
        return fields[0] in (b"Z", b"X") or int(fields[19]) != start_ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class _Peer:
    rank: int
    host: str
    pid: int
    start_ticks: int | None


class MPIGroup(ProcessGroup):
    """The ranks of ``MPI.COMM_WORLD``; make it with :meth:`world` on every rank."""

    def __init__(self, comm: Any, gather_comm: Any, control: Any, timeout: float, mpi: Any) -> None:
        self._MPI, self._comm, self._gather_comm, self._control = mpi, comm, gather_comm, control
        # from COMM_WORLD: ``comm`` may not be used until its Idup completes
        self.rank, self.world_size = mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()
        self.timeout = timeout
        self.peers: tuple[_Peer, ...] = ()
        self._control_ready = False             # the control channel's Idup has completed
        self._in_flight: collections.deque[PendingAllreduce] = collections.deque()
        self._outgoing: list[Any] = []          # control-channel sends not yet known to be out
        self._pongs: set[tuple[int, int]] = set()  # (roll call, rank) answers received
        self._roll_calls = 0
        self._signalled = False                 # the launcher sent SIGUSR1: a process of the job died
        # (the rank it stops for or None, why, the DistributedError raised) once the group stops this rank
        self._stopped: tuple[int | None, str, DistributedError] | None = None

    # ---- making the group -------------------------------------------------------------

    @classmethod
    def world(cls, timeout: float = 60.0) -> MPIGroup:
        """The group of every process ``mpiexec`` started, on duplicates of ``COMM_WORLD`` (one
        for the reductions, one for their allgather halves, one as the control channel), so
        that its messages never mix with other MPI users'. Collective: every rank calls it.

        Args:
            timeout: seconds a rank waits in any one operation before it gives up and
                raises DistributedError naming the ranks that did not answer.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"MPIGroup.world: timeout must be a positive number of seconds, got {timeout!r}")
        mpi = _import_mpi()
        world = mpi.COMM_WORLD
        comms, requests = [], []
        for _ in range(3):
            comm, request = world.Idup()
            comms.append(comm)
            requests.append(request)
        group = cls(*comms, timeout=float(timeout), mpi=mpi)
        group._wait_until(lambda: mpi.Request.Testall(requests), "MPIGroup.world (duplicating COMM_WORLD)")
        group._control_ready = True
        group._exchange_identities()
        group._catch_launcher_signal()
        group._register_with_launcher()
        return group

    def _register_with_launcher(self) -> None:
        """Under ``launch_workers`` (``RANK_FOLDER_VARIABLE`` set), leave this rank's pid and host
        in the launcher's folder, so that the launcher can name a rank that dies before the
        survivors get to say it (hydra may kill them first)."""
        folder = os.environ.get(RANK_FOLDER_VARIABLE)
        if folder:
            path = os.path.join(folder, f"rank-{self.rank}")
            with open(path + ".tmp", "w") as f:
                f.write(f"{self.rank} {self.world_size} {os.getpid()} {socket.gethostname()}\n")
            os.replace(path + ".tmp", path)

    def _exchange_identities(self) -> None:
        host = socket.gethostname().encode()[:_HOST_BYTES]
        mine = np.zeros(_HOST_BYTES + 24, np.uint8)
        mine[:len(host)] = np.frombuffer(host, np.uint8)
        ticks = _process_start_ticks(os.getpid())
        mine[_HOST_BYTES:].view(np.int64)[:] = (os.getpid(), -1 if ticks is None else ticks, len(host))
        everyone = np.empty((self.world_size, mine.size), np.uint8)
        request = self._comm.Iallgather(mine, everyone)
        self._wait_until(lambda: request.Test(), "MPIGroup.world (exchanging host names and pids)")
        peers = []
        for rank, row in enumerate(everyone):
            pid, ticks, length = (int(v) for v in row[_HOST_BYTES:].view(np.int64))
            peers.append(_Peer(rank, row[:length].tobytes().decode(errors="replace"), pid,
                               None if ticks < 0 else ticks))
        self.peers = tuple(peers)

    def _catch_launcher_signal(self) -> None:
        # Only where nobody else handles SIGUSR1, and only from the main thread (Python's rule).
        if (hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL):
            signal.signal(signal.SIGUSR1, self._on_launcher_signal)
            # Hydra also signals the ranks still finishing when one exits normally, and Python
            # puts SIG_DFL back for its own handlers as it shuts down: ignore the signal from
            # then on, or a late one kills a rank that has done all its work.
            atexit.register(signal.signal, signal.SIGUSR1, signal.SIG_IGN)

    def _on_launcher_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True

    # ---- reductions -------------------------------------------------------------------

    def allreduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """The elementwise ``op`` ("sum", "min" or "max") of ``array`` over every rank: a new
        array of the same shape and dtype, bitwise equal on every rank (reduce-scatter then
        allgather, see the module docstring). Every rank passes the same shape and dtype."""
        return self.iallreduce(array, op).wait()

    def iallreduce(self, array: np.ndarray, op: str = "sum") -> PendingAllreduce:
        """Start :meth:`allreduce` of ``array`` and return at once; ``.wait()`` on the result
        gives the reduced array. ``array`` is copied, so the caller may reuse it. Several may
        be in flight; they finish in the order they were started."""
        if op not in REDUCE_OPS:
            raise ConfigError(f"MPIGroup.allreduce: op must be one of {REDUCE_OPS}, got {op!r} (rank {self.rank})")
        array = np.asarray(array)
        if array.dtype.kind not in "fiu":
            raise DTypeError(f"MPIGroup.allreduce: rank {self.rank} got an array of dtype {array.dtype}; "
                             "expected a float or integer dtype")
        pending = PendingAllreduce(self, array, op)
        self._in_flight.append(pending)
        self._advance_in_flight()
        return pending

    def _advance_in_flight(self) -> None:
        for pending in self._in_flight:
            pending._advance()
            if pending._gather_request is None:
                # the allgathers must start in the order the reductions did, on every rank,
                # whatever the timing: the later ones wait for this one's
                break
        while self._in_flight and self._in_flight[0]._done:
            self._in_flight.popleft()

    # ---- broadcasts and gathers -------------------------------------------------------

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """A new array holding root's ``array``, on every rank. Every rank passes an array of
        root's shape and dtype (the values of the others are not read)."""
        self._check_root(root, "broadcast")
        array = np.asarray(array)
        header = self.broadcast_object((array.shape, array.dtype.str), root)
        if header != (array.shape, array.dtype.str):
            raise DistributedError(f"MPIGroup.broadcast: rank {self.rank} passed an array of shape {array.shape} "
                                   f"and dtype {array.dtype.str}, root {root} sends shape {header[0]} and "
                                   f"dtype {header[1]}; every rank must pass the same shape and dtype")
        result = np.ascontiguousarray(array).copy()
        request = self._comm.Ibcast(result.reshape(-1).view(np.uint8), root=root)
        self._wait_until(request.Test, "broadcast")
        return result

    def broadcast_object(self, obj: Any = None, root: int = 0) -> Any:
        """Root's ``obj`` (pickled), on every rank; the others' ``obj`` is ignored."""
        self._check_root(root, "broadcast_object")
        data = np.frombuffer(pickle.dumps(obj), np.uint8) if self.rank == root else np.empty(0, np.uint8)
        length = np.array([data.size], np.int64)
        request = self._comm.Ibcast(length, root=root)
        self._wait_until(request.Test, "broadcast_object (length)")
        if self.rank != root:
            data = np.empty(int(length[0]), np.uint8)
        request = self._comm.Ibcast(data, root=root)
        self._wait_until(request.Test, "broadcast_object")
        return obj if self.rank == root else pickle.loads(data.tobytes())

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (pickled), in rank order, on every rank."""
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        lengths = np.empty(self.world_size, np.int64)
        request = self._comm.Iallgather(np.array([data.size], np.int64), lengths)
        self._wait_until(request.Test, "allgather_object (lengths)")
        counts = [int(n) for n in lengths]
        everything = np.empty(sum(counts), np.uint8)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        request = self._comm.Iallgatherv(data, [everything, (counts, offsets[:-1].tolist()), self._MPI.BYTE])
        self._wait_until(request.Test, "allgather_object")
        return [pickle.loads(everything[offsets[k]:offsets[k + 1]].tobytes()) for k in range(self.world_size)]

    def barrier(self) -> None:
        """Return once every rank has called barrier."""
        request = self._comm.Ibarrier()
        self._wait_until(request.Test, "barrier")

    def _check_root(self, root: int, what: str) -> None:
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.world_size:
            raise ConfigError(f"MPIGroup.{what}: root must be a rank in 0..{self.world_size - 1}, got {root!r} "
                              f"(rank {self.rank})")

    # ---- failures ---------------------------------------------------------------------

    def announce_failure(self, exc: BaseException) -> None:
        """Tell every other rank that this rank stops because of ``exc`` (its next wait raises
        DistributedError naming this rank and ``exc``). If ``exc`` is this group's own report
        that another rank was lost, that report is passed on instead. Returns after the
        notices are out or after 1 s, whichever comes first."""
        if self._stopped is not None and exc is self._stopped[2]:
            lost_rank, sentence, _ = self._stopped
            origin = self.rank if lost_rank is None else lost_rank
            sentence = sentence if lost_rank is not None else f"rank {self.rank} stopped: {sentence}"
        else:
            origin, sentence = self.rank, f"rank {self.rank} failed: {type(exc).__name__}: {exc}"
        notice = {"rank": origin, "sentence": sentence}
        # the lost rank too: one that did not answer a roll call may only be slow, and should stop
        sends = [self._control.isend(notice, dest=peer, tag=_TAG_FAILURE)
                 for peer in range(self.world_size) if peer != self.rank]
        deadline = time.monotonic() + _ANNOUNCE_WAIT_S
        while sends and not self._MPI.Request.Testall(sends) and time.monotonic() < deadline:
            time.sleep(_MAX_POLL_SLEEP_S)

    def _stop(self, lost_rank: int | None, sentence: str) -> DistributedError:
        """The error this rank raises; ``lost_rank`` names the rank it stops for, if any."""
        error = DistributedError(f"{sentence}; stopping rank {self.rank}")
        self._stopped = (lost_rank, sentence, error)
        return error

    def stopped_by_group(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the DistributedError this group raised to stop this rank (for a
        failure elsewhere, a lost rank or a timeout) rather than an error of this rank's work."""
        return self._stopped is not None and exc is self._stopped[2]

    def _read_control(self) -> None:
        """Answer pings, note answers, and raise for a failure notice."""
        mpi = self._MPI
        status = mpi.Status()
        while (message := self._control.improbe(mpi.ANY_SOURCE, mpi.ANY_TAG, status)) is not None:
            payload, source, tag = message.recv(), status.Get_source(), status.Get_tag()
            if tag == _TAG_FAILURE:
                relayed = "" if payload["rank"] == source else f" (relayed by rank {source})"
                raise self._stop(payload["rank"], payload["sentence"] + relayed)
            if tag == _TAG_PING:
                self._outgoing.append(self._control.isend(payload, dest=source, tag=_TAG_PONG))
            elif tag == _TAG_PONG:
                self._pongs.add((payload, source))
        self._outgoing = [request for request in self._outgoing if not request.Test()]

    def _check_peers(self, done: Callable[[], bool]) -> None:
        """Raise if a peer process on this host is gone, unless ``done`` turns true within a
        short grace (a rank that made its last call and exited normally is gone too)."""
        host = socket.gethostname()
        for peer in self.peers:
            if peer.rank != self.rank and peer.host == host and _process_is_gone(peer.pid, peer.start_ticks):
                deadline = time.monotonic() + _GONE_GRACE_S
                while time.monotonic() < deadline:
                    if done():
                        return
                    self._read_control()  # a notice it sent before it went says more than its absence
                    time.sleep(_MAX_POLL_SLEEP_S)
                raise self._stop(peer.rank, f"rank {peer.rank} (pid {peer.pid} on host {peer.host}) is gone: "
                                 "it exited or was killed")

    def _wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Poll ``done`` until it is true, raising DistributedError on any sign of failure."""
        start = next_peer_check = time.monotonic()
        sleep_s = 0.0
        try:
            while not done():
                if self._control_ready:
                    self._read_control()
                now = time.monotonic()
                if now >= next_peer_check or self._signalled:
                    self._signalled = False
                    self._check_peers(done)
                    next_peer_check = now + _PEER_CHECK_INTERVAL_S
                if now - start > self.timeout:
                    self._roll_call(done, what)
                    return
                if now - start > _SPIN_S:
                    time.sleep(sleep_s)
                    sleep_s = min(_MAX_POLL_SLEEP_S, max(1e-5, 2 * sleep_s))
        except self._MPI.Exception as e:
            raise self._stop(None, f"rank {self.rank}: MPI reported an error in {what}: {e}") from None

    def _roll_call(self, done: Callable[[], bool], what: str) -> None:
        """Ping every peer and raise naming those that do not answer within the grace period;
        return normally if the operation completes meanwhile."""
        if not self.peers:  # the group is still being made: nobody to ask yet
            raise self._stop(None, f"not every rank reached {what} within {self.timeout:g} s")
        self._roll_calls += 1
        call = self._roll_calls
        others = [peer.rank for peer in self.peers if peer.rank != self.rank]
        self._outgoing += [self._control.isend(call, dest=rank, tag=_TAG_PING) for rank in others]
        deadline = time.monotonic() + min(_ROLL_CALL_GRACE_S, self.timeout)
        while time.monotonic() < deadline:
            if done():
                return
            self._read_control()
            self._check_peers(done)
            if all((call, rank) in self._pongs for rank in others):
                break
            time.sleep(_MAX_POLL_SLEEP_S)
        silent = [rank for rank in others if (call, rank) not in self._pongs]
        reason = f"{what} did not complete within {self.timeout:g} s"
        if silent:
            names = ", ".join(f"{r} (pid {self.peers[r].pid} on host {self.peers[r].host})" for r in silent)
            raise self._stop(silent[0], f"{reason}; rank{'s' if len(silent) > 1 else ''} {names} did not answer "
                             "a roll call: lost, or stuck outside the group's operations")
        raise self._stop(None, f"{reason}, yet every rank answered a roll call: the ranks are making different "
                         "calls (every rank must make the same reductions in the same order)")


class PendingAllreduce:
    """An allreduce in flight (see :meth:`MPIGroup.iallreduce`); :meth:`wait` gives its result."""

    def __init__(self, group: MPIGroup, array: np.ndarray, op: str) -> None:
        mpi = group._MPI
        self._group, self._shape = group, array.shape
        self._flat = np.array(array, order="C").reshape(-1)  # a copy: the caller may reuse its array
        n, size = group.world_size, self._flat.size
        self._counts = [size // n + (1 if k < size % n else 0) for k in range(n)]
        self._offsets = np.concatenate([[0], np.cumsum(self._counts)])[:-1].tolist()
        self._block = np.empty(self._counts[group.rank], self._flat.dtype)
        self._result = np.empty_like(self._flat)
        self._gather_request: Any = None
        self._done = False
        self._gathered: np.ndarray | None = None
        if self._flat.nbytes * n <= _SMALL_ALLREDUCE_BYTES:
            # small: one allgather of every rank's array, then the same reduction in rank order
            # on every rank (one collective instead of two; the latency is what costs here)
            self._op = _COMBINE[op]
            self._gathered = np.empty((n, size), self._flat.dtype)
            try:
                self._scatter_request = group._comm.Iallgather(self._flat, self._gathered)
            except (mpi.Exception, KeyError, ValueError, TypeError) as e:
                raise DTypeError(f"MPIGroup.allreduce: rank {group.rank}: MPI cannot gather arrays of dtype "
                                 f"{self._flat.dtype}: {e}") from None
            self._gather_request = self._scatter_request  # nothing left to start: see _advance
            return
        op_handle = {"sum": mpi.SUM, "min": mpi.MIN, "max": mpi.MAX}[op]
        try:
            # mpi4py reads the MPI datatype off the numpy buffers
            self._scatter_request = group._comm.Ireduce_scatter(self._flat, self._block, self._counts, op_handle)
        except (mpi.Exception, KeyError, ValueError, TypeError) as e:
            raise DTypeError(f"MPIGroup.allreduce: rank {group.rank}: MPI cannot {op} arrays of dtype "
                             f"{self._flat.dtype}: {e}") from None

    def _advance(self) -> bool:
        """Move this reduction on without blocking (start its allgather once its reduce-scatter
        is done); True when it is finished."""
        if self._done:
            return True
        if self._gathered is not None:
            if not self._scatter_request.Test():
                return False
            result = self._gathered[0].copy()
            for row in self._gathered[1:]:
                self._op(result, row, out=result)
            self._result, self._gathered, self._done = result, None, True
            return True
        if self._gather_request is None:
            if not self._scatter_request.Test():
                return False
            self._gather_request = self._group._gather_comm.Iallgatherv(
                self._block, [self._result, (self._counts, self._offsets)])
        self._done = bool(self._gather_request.Test())
        return self._done

    def wait(self) -> np.ndarray:
        """Block until every rank has reduced; the reduced array (shape and dtype of the input).
        Raises DistributedError if a rank fails, is lost or stops answering meanwhile."""
        group = self._group

        def finished() -> bool:
            group._advance_in_flight()
            return self._done

        group._wait_until(finished, "allreduce")
        return self._result.reshape(self._shape)


@contextlib.contextmanager
def failing_fast(group: MPIGroup) -> Iterator[MPIGroup]:
    """Run a rank's work so that a failure anywhere stops every rank promptly and says why.

    If the block raises, this rank tells the others (:meth:`MPIGroup.announce_failure`),
    prints the traceback (for its own exceptions) and one line to stderr,
    ``qatcore: rank 1 of 4 failed: ValueError: ...`` or, when it stops because another rank
    was lost, ``qatcore: rank 0 of 4 stopped: rank 1 failed: ...``, and ends the process with
    ``os._exit(1)``. Not ``sys.exit``: a normal exit runs ``MPI_Finalize`` (mpi4py registers
    it at exit), which waits for peers that may be dead and would hang this rank, and runs
    the atexit hooks and thread joins of a process that is being abandoned anyway.
    ``SystemExit`` with code 0 or None passes through (a rank that is done).
    """
    try:
        yield group
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        try:
            group.announce_failure(exc)
        except Exception as announce_error:  # noqa: BLE001 - the rank is stopping either way
            sys.stderr.write(f"qatcore: rank {group.rank} could not tell the others: {announce_error}\n")
        # one write per line: the launcher merges the ranks' stderr, and print() writes in pieces
        if group.stopped_by_group(exc):
            sys.stderr.write(f"qatcore: rank {group.rank} of {group.world_size} stopped: {exc}\n")
        else:
            sys.stderr.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            sys.stderr.write(f"qatcore: rank {group.rank} of {group.world_size} failed: {type(exc).__name__}: {exc}\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
