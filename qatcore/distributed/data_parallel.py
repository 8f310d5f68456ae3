"""``DataParallel``: one model per rank, gradients averaged over the global batch.

Each rank holds the whole model and runs forward and backward on its share of every
global batch (``ShardedLoader``). The wrapper keeps the ranks equal:

- at construction, every parameter and buffer is broadcast from rank 0;
- in each training forward, the ranks sum their local batch sizes, ``N = sum_r n_r``;
- during backward, the gradients are averaged over the ranks *weighted by their share*:

      grad = sum_r (n_r / N) * grad_r

  where ``grad_r`` is rank r's gradient of its loss. When the loss is the mean over the
  batch (cross-entropy, MSE, ...), this is exactly the gradient of the mean loss over the
  global batch, whatever the shares; with equal shares it is the plain average.
  Synchronized BatchNorm and observers (``qatcore.process_group``) make the forward of each
  rank's share the forward the global batch gives, so the gradients agree too.
- The parameters are packed into buckets of about ``bucket_bytes`` (in reverse order of
  registration, the order backward reaches them). A bucket is reduced as soon as the
  backward pass has accumulated its last gradient (``qatcore.autograd.hooks``), overlapping
  the communication with the rest of the pass where the group can (``MPIGroup``); the pass
  ends by waiting for every bucket, so ``.grad`` holds the average when ``loss.backward()``
  returns and optimizers, loops and losses stay unchanged.
- A parameter that got no gradient on any rank keeps ``grad`` None (each bucket carries a
  presence flag per parameter); one that got a gradient on some ranks only counts as zero
  on the others.

Every rank then takes the same optimizer step on the same values and stays bitwise equal
to the others (the group's reductions give every rank the same bits).

>>> import numpy as np
>>> from qatcore import nn
>>> from qatcore.distributed import ThreadGroup
>>> x, y = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32), np.arange(6) % 2
>>> def rank_main(group):
...     model = DataParallel(nn.Linear(3, 2))      # rank 0's initial weights everywhere
...     share = slice(0, 4) if group.rank == 0 else slice(4, 6)   # 4 + 2 samples
...     nn.functional.cross_entropy(model(x[share]), y[share]).backward()
...     return model.module.weight.grad
>>> grads = ThreadGroup.run(2, rank_main)
>>> bool(np.array_equal(grads[0], grads[1]))
True
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from qatcore.autograd import is_grad_enabled, queue_callback, register_grad_ready_hook
from qatcore.errors import ConfigError
from qatcore.nn import Module
from qatcore.process_group import ProcessGroup, current_group, local_batch_size

__all__ = ["DataParallel"]


class _Bucket:
    """Parameters reduced together: their gradients, scaled, then one presence flag each."""

    def __init__(self, params: list) -> None:
        self.params = params
        self.sizes = [p.data.size for p in params]
        self.dtype = params[0].data.dtype
        self.ready = 0
        self.pending = None

    def pack(self, weight: float) -> np.ndarray:
        buffer = np.zeros(sum(self.sizes) + len(self.params), dtype=self.dtype)
        offset = 0
        for index, (p, size) in enumerate(zip(self.params, self.sizes)):
            if p.grad is not None:
                np.multiply(p.grad.reshape(-1), self.dtype.type(weight), out=buffer[offset:offset + size])
                buffer[-len(self.params) + index] = 1
            offset += size
        return buffer

    def unpack(self, buffer: np.ndarray) -> None:
        offset = 0
        flags = buffer[-len(self.params):]
        for p, size, flag in zip(self.params, self.sizes, flags):
            if flag > 0:
                p.grad = buffer[offset:offset + size].reshape(p.data.shape).copy()
            offset += size


class DataParallel(Module):
    """Wrap ``module`` for data-parallel training in ``group`` (module docstring).

    Args:
        module: the model; it is used, not copied (``.module`` gives it back), and its
            state is overwritten by rank 0's at construction.
        group: the ranks; None: the group installed in this context
            (``qatcore.process_group.current_group``). With no group, or a single rank,
            the wrapper only forwards.
        bucket_bytes: the size a gradient bucket grows to before a new one starts.

    ``state_dict()`` keys carry the ``module.`` prefix, as PyTorch's DDP does; checkpoint
    ``.module`` to get the plain keys.
    """

    def __init__(self, module: Module, group: ProcessGroup | None = None, bucket_bytes: int = 1 << 20) -> None:
        super().__init__()
        if not isinstance(module, Module):
            raise ConfigError(f"DataParallel: module must be a qatcore Module, got {type(module).__name__}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ConfigError(f"DataParallel: bucket_bytes must be a positive int, got {bucket_bytes!r}")
        self.module = module
        object.__setattr__(self, "group", group if group is not None else current_group())
        object.__setattr__(self, "bucket_bytes", bucket_bytes)
        object.__setattr__(self, "_buckets", [])
        object.__setattr__(self, "_hooks", [])
        object.__setattr__(self, "_params", [])
        object.__setattr__(self, "_weight", 1.0)
        object.__setattr__(self, "_syncing", True)
        object.__setattr__(self, "_finishing", False)
        if self.world_size > 1:
            self.broadcast_state()

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else self.group.world_size

    @property
    def rank(self) -> int:
        return 0 if self.group is None else self.group.rank

    # ---- state ---------------------------------------------------------------------------
    def broadcast_state(self, root: int = 0) -> None:
        """Overwrite every parameter and buffer with rank ``root``'s, in place."""
        for _, tensor in sorted([*self.module.named_parameters(), *self.module.named_buffers()]):
            tensor.data[...] = self.group.broadcast(tensor.data, root)

    # ---- forward: the global batch size, the buckets -------------------------------------------
    def forward(self, *args, **kwargs):
        if self.world_size > 1 and self.training and is_grad_enabled() and self._syncing:
            local = local_batch_size(args)
            total = float(self.group.allreduce(np.array([local], dtype=np.float64), "sum")[0])
            object.__setattr__(self, "_weight", local / total)
            self._ensure_buckets()
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside the block, backward passes accumulate local gradients without reducing them
        (gradient accumulation over several micro-batches: reduce on the last one, outside)."""
        previous = self._syncing
        object.__setattr__(self, "_syncing", False)
        try:
            yield
        finally:
            object.__setattr__(self, "_syncing", previous)

    def _ensure_buckets(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if [id(p) for p in params] == [id(p) for p in self._params]:
            return
        for handle in self._hooks:
            handle.remove()
        buckets: list[_Bucket] = []
        current: list = []
        size = 0
        for p in reversed(params):  # backward reaches the last layers first
            if current and (size + p.data.nbytes > self.bucket_bytes or p.data.dtype != current[0].data.dtype):
                buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += p.data.nbytes
        if current:
            buckets.append(_Bucket(current))
        hooks = [register_grad_ready_hook(p, lambda t, i=index: self._grad_ready(i))
                 for index, bucket in enumerate(buckets) for p in bucket.params]
        object.__setattr__(self, "_buckets", buckets)
        object.__setattr__(self, "_hooks", hooks)
        object.__setattr__(self, "_params", params)

    # ---- backward: reduce buckets as they fill, wait at the end --------------------------------
    def _grad_ready(self, index: int) -> None:
        if not self._syncing or self.world_size == 1:
            return
        if not self._finishing:
            object.__setattr__(self, "_finishing", True)
            queue_callback(self._finish)
        bucket = self._buckets[index]
        bucket.ready += 1
        self._launch(complete_only=True)

    def _launch(self, complete_only: bool) -> None:
        """Start the reductions of the buckets in order, up to the first incomplete one
        (all of them when ``complete_only`` is False): every rank starts the same
        reductions in the same order."""
        for bucket in self._buckets:
            if bucket.pending is not None:
                continue
            if complete_only and bucket.ready < len(bucket.params):
                return
            bucket.pending = self.group.iallreduce(bucket.pack(self._weight), "sum")

    def _finish(self) -> None:
        self._launch(complete_only=False)
        for bucket in self._buckets:
            bucket.unpack(bucket.pending.wait())
            bucket.pending, bucket.ready = None, 0
        object.__setattr__(self, "_finishing", False)

    def extra_repr(self) -> str:
        return f"rank {self.rank} of {self.world_size}, {len(self._buckets)} gradient buckets"
