"""Data-parallel QAT across processes: MPI ranks, each with the whole model and a share of
every global batch (``docs/distributed.md``).

- :class:`DataParallel` (``data_parallel.py``): the model wrapper; gradients averaged over the
  global batch, in buckets, during backward.
- :class:`ThreadGroup` (``thread_group.py``): simulated ranks as threads, for tests and teaching.
- :class:`MPIGroup`, :func:`failing_fast` (``mpi_group.py``): the ranks as MPI processes
  (the optional ``distributed`` extra), whose waits stop on a failed, lost or silent rank.
- :func:`launch_workers`, :func:`find_mpiexec` (``launch.py``): start N ranks under mpiexec.
"""

from qatcore.lazy_exports import lazy_exports

__all__ = ["DataParallel", "ThreadGroup", "MPIGroup", "failing_fast", "launch_workers", "find_mpiexec"]

__getattr__, __dir__ = lazy_exports(__name__, names={
    "qatcore.distributed.data_parallel": ("DataParallel",),
    "qatcore.distributed.thread_group": ("ThreadGroup",),
    "qatcore.distributed.mpi_group": ("MPIGroup", "failing_fast"),
    "qatcore.distributed.launch": ("launch_workers", "find_mpiexec"),
})
