"""Crop to the mask's bounding box, pad to the network's divisor, and restore the full grid.

The network sees only the brain plus a margin (cheaper on CPU, and the field outside the mask
carries no information); the margin lets the dipole's non-local effects and the U-Net's receptive
field see past the mask edge. Padding is centred and zero-valued (TorchIO's EnsureShapeMultiple
idea): zeros are what the masked local field holds outside the brain anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qsmnet.transforms._grid import mask_bbox as grid_mask_bbox


@dataclass(frozen=True)
class CropPad:
    """How a full grid maps to the network's grid.

    ``crop`` are the bounding-box slices (per spatial axis) of the full grid; ``pad`` the
    ``(before, after)`` zero padding added to the crop. :meth:`apply` goes full -> network grid,
    :meth:`restore` network -> full grid (zeros outside the box).
    """

    full_shape: tuple[int, int, int]
    crop: tuple[slice, slice, slice]
    pad: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start + a + b for s, (a, b) in zip(self.crop, self.pad))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(..., X, Y, Z) full grid -> (..., X', Y', Z') network grid."""
        x = x[(..., *self.crop)]
        (a0, b0), (a1, b1), (a2, b2) = self.pad
        return F.pad(x, (a2, b2, a1, b1, a0, b0))

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """(..., X', Y', Z') network grid -> (..., X, Y, Z) full grid, zero outside the box."""
        (a0, _), (a1, _), (a2, _) = self.pad
        sx, sy, sz = (s.stop - s.start for s in self.crop)
        inner = y[..., a0:a0 + sx, a1:a1 + sy, a2:a2 + sz]
        out = y.new_zeros(*y.shape[:-3], *self.full_shape)
        out[(..., *self.crop)] = inner
        return out


def mask_bbox(mask: torch.Tensor, margin: Sequence[int] | int = 0) -> tuple[slice, slice, slice]:
    """Bounding box of the non-zero voxels of ``mask`` (X, Y, Z), grown by ``margin`` voxels
    and clipped to the grid. An empty mask raises ValueError."""
    m = mask.reshape(mask.shape[-3:]) if mask.ndim > 3 else mask
    box = grid_mask_bbox(m, margin)
    if box is None:
        raise ValueError("the mask is empty")
    return box


def plan_crop_pad(mask: torch.Tensor, divisor: int = 8, margin: Sequence[int] | int = 8,
                  min_size: int = 0) -> CropPad:
    """Crop to the mask's box plus ``margin`` voxels, then pad each axis (centred) to a multiple
    of ``divisor`` and at least ``min_size``."""
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    crop = mask_bbox(mask, margin)
    pads = []
    for s in crop:
        n = s.stop - s.start
        target = max(n, min_size)
        target = -(-target // divisor) * divisor
        extra = target - n
        pads.append((extra // 2, extra - extra // 2))
    return CropPad(tuple(int(n) for n in mask.shape[-3:]), crop, tuple(pads))
