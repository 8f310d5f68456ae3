"""Data-parallel QAT across processes: MPI ranks, each with the whole model and a share of
every global batch (``docs/distributed.md``).

- :class:`DataParallel` (``data_parallel.py``): the model wrapper; gradients averaged over the
  global batch, in buckets, during backward.
- :class:`ThreadGroup` (``thread_group.py``): simulated ranks as threads, for tests and teaching.
"""

from qatcore.lazy_exports import lazy_exports

__all__ = ["DataParallel", "ThreadGroup"]

__getattr__, __dir__ = lazy_exports(__name__, names={
    "qatcore.distributed.data_parallel": ("DataParallel",),
    "qatcore.distributed.thread_group": ("ThreadGroup",),
})
