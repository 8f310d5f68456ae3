"""How a tensor's values map to integers: one scale for the whole tensor or one per
channel, and whether zero point is free (affine) or fixed (symmetric).

>>> QScheme.PER_CHANNEL_SYMMETRIC.per_channel, QScheme.PER_CHANNEL_SYMMETRIC.symmetric
(True, True)
"""

from __future__ import annotations

import enum

__all__ = ["QScheme"]


class QScheme(enum.Enum):
    PER_TENSOR_AFFINE = "per_tensor_affine"
    PER_TENSOR_SYMMETRIC = "per_tensor_symmetric"
    PER_CHANNEL_AFFINE = "per_channel_affine"
    PER_CHANNEL_SYMMETRIC = "per_channel_symmetric"

    @property
    def per_channel(self) -> bool:
        return self in (QScheme.PER_CHANNEL_AFFINE, QScheme.PER_CHANNEL_SYMMETRIC)

    @property
    def symmetric(self) -> bool:
        return self in (QScheme.PER_TENSOR_SYMMETRIC, QScheme.PER_CHANNEL_SYMMETRIC)
