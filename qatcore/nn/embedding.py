"""Embedding layer: a table of learned vectors looked up by integer index (see
:func:`qatcore.nn.functional.embedding`)."""

from __future__ import annotations

import numpy as np

from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.nn import init
from qatcore.nn.module import Module
from qatcore.nn.parameter import Parameter
from qatcore.random import generator_or_default

__all__ = ["Embedding"]


class Embedding(Module):
    """out = weight[input], weight (num_embeddings, embedding_dim) drawn from N(0, 1) as PyTorch's
    ``nn.Embedding``, from ``rng`` or without one from qatcore's default generator. With
    ``padding_idx`` that row starts at zero and is never trained.

    >>> import numpy as np
    >>> table = Embedding(10, 3, padding_idx=0, rng=np.random.default_rng(0))
    >>> out = table(np.array([[0, 4, 4]]))
    >>> out.shape, out.numpy()[0, 0].tolist()
    ((1, 3, 3), [0.0, 0.0, 0.0])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 rng: np.random.Generator | None = None, dtype=np.float32) -> None:
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"Embedding: {name} must be a positive int, got {value!r}")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)) \
                    or not -num_embeddings <= padding_idx < num_embeddings:
                raise ConfigError(f"Embedding: padding_idx must be None or an int in [{-num_embeddings}, "
                                  f"{num_embeddings - 1}], got {padding_idx!r}")
            padding_idx = int(padding_idx) % num_embeddings
        rng = generator_or_default(rng, "Embedding: rng")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        self.weight = Parameter(np.empty((self.num_embeddings, self.embedding_dim), dtype=dtype))
        init.normal_(self.weight, 0.0, 1.0, rng)
        if padding_idx is not None:
            self.weight.data[padding_idx] = 0

    def forward(self, input):  # noqa: A002 - PyTorch's name
        return F.embedding(input, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        padding = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{padding}"
