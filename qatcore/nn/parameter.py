"""``Parameter``: a leaf Tensor that a Module registers as trainable.

Assigning a Parameter to a Module attribute registers it under that name; an
optimizer updates ``p.data`` in place from ``p.grad``, so a Parameter keeps its
identity for its whole life (the QAT preparer relies on this: the QAT model
holds the very same Parameter objects as the float model).

>>> import numpy as np
>>> p = Parameter(np.zeros((2, 3), dtype=np.float32))
>>> p.requires_grad, p.shape
(True, (2, 3))
"""

from __future__ import annotations

from typing import Any

from qatcore.tensor import Tensor

__all__ = ["Parameter"]


class Parameter(Tensor):
    """A trainable leaf tensor (``requires_grad=True`` unless told otherwise)."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True, dtype: Any = None) -> None:
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self) -> str:
        return "Parameter(" + super().__repr__()[len("tensor("):]
