"""How a tensor's values map to integers: one scale for the whole tensor, one per
channel, one per group of consecutive elements or one per token (row); whether the zero
point is free (affine) or fixed at 0 (symmetric); and whether the scale comes from an
observer's range or from each call's own values (*dynamic*).

- per tensor / per channel: the scale comes from an observer (or is learned);
- per group (``group_size`` consecutive elements along the last axis: a weight's input
  features), per token (each row over the last axis: one token's features), and the
  absmean schemes (BitNet b1.58's ternary weights): the scale is computed from the
  values on every call, no observer (docs/numerics.md, "Per-group and per-token fake
  quantization"); a per-group symmetric scale may instead be learned (LSQ).

>>> QScheme.PER_CHANNEL_SYMMETRIC.per_channel, QScheme.PER_CHANNEL_SYMMETRIC.symmetric
(True, True)
>>> QScheme.PER_TOKEN_AFFINE.dynamic, QScheme.PER_GROUP_SYMMETRIC.grouped
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
    PER_GROUP_AFFINE = "per_group_affine"
    PER_GROUP_SYMMETRIC = "per_group_symmetric"
    PER_TOKEN_AFFINE = "per_token_affine"
    PER_TOKEN_SYMMETRIC = "per_token_symmetric"
    PER_TENSOR_ABSMEAN = "per_tensor_absmean"
    PER_GROUP_ABSMEAN = "per_group_absmean"

    @property
    def per_channel(self) -> bool:
        return self in (QScheme.PER_CHANNEL_AFFINE, QScheme.PER_CHANNEL_SYMMETRIC)

    @property
    def symmetric(self) -> bool:
        """Zero point 0 (the absmean schemes are symmetric too)."""
        return self in (QScheme.PER_TENSOR_SYMMETRIC, QScheme.PER_CHANNEL_SYMMETRIC, QScheme.PER_GROUP_SYMMETRIC,
                        QScheme.PER_TOKEN_SYMMETRIC, QScheme.PER_TENSOR_ABSMEAN, QScheme.PER_GROUP_ABSMEAN)

    @property
    def grouped(self) -> bool:
        """One scale per ``group_size`` consecutive elements along the last axis."""
        return self in (QScheme.PER_GROUP_AFFINE, QScheme.PER_GROUP_SYMMETRIC, QScheme.PER_GROUP_ABSMEAN)

    @property
    def per_token(self) -> bool:
        """One scale per row over the last axis."""
        return self in (QScheme.PER_TOKEN_AFFINE, QScheme.PER_TOKEN_SYMMETRIC)

    @property
    def absmean(self) -> bool:
        """BitNet b1.58's ternary rule: scale mean(|x|) of the tensor or group, grid {-1, 0, 1}."""
        return self in (QScheme.PER_TENSOR_ABSMEAN, QScheme.PER_GROUP_ABSMEAN)

    @property
    def dynamic(self) -> bool:
        """The scale (and zero point) come from each call's values, not from an observer."""
        return self.grouped or self.per_token or self.absmean
