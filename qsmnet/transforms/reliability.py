"""Unreliable-phase voxels: find them in a total field map and keep them out of later steps.

Next to air (sinuses, ear canals) the field can change by several ppm from one voxel to the next.
Where neighbouring phases of the spatially unwrapped echo differ by more than pi, no spatial
unwrapper can know the 2pi count (Itoh's condition fails), and a few voxels end up off by
exactly ``1 / (gamma_bar B0 TE)`` ppm (2 ppm at 3 T, TE 4 ms). A handful of such voxels are
enough to spoil everything downstream: PDF fits them with background dipoles, the SMV filters
smear them over their kernels, and every inversion turns a 2 ppm spike into dipole streaks.

The test is on the fitted total field: a voxel is *unreliable* where its field differs from one
of its 6 neighbours (both inside the mask) by more than the field that turns the phase of the
reference echo by ``max_step_rad`` (default pi/2, half the aliasing limit, so the steep slopes
around a wrong voxel are caught too); the set is then grown by ``dilate_voxels``. On the
qsm-forward head phantoms (3 T, TE1 4 ms, 1 mm) it flags a small fraction of the brain and
contains every voxel of echo 1 with a wrong 2pi count (see the 'Unreliable phase and field
mapping' section of docs/benchmarks.md).

:func:`fill_unreliable` then replaces a field on those voxels by the Gaussian-weighted mean of the
reliable voxels around them (normalised convolution), so that downstream steps see a smooth
field there instead of a spike; the voxels stay in the mask, and the inversions fill in chi
there from their neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qsmnet.physics.units import phase_to_ppm
from qsmnet.transforms.smoothing import gaussian_smooth_mm

__all__ = ["DEFAULT_MAX_PHASE_STEP_RAD", "fill_unreliable", "phase_step_ppm",
           "unreliable_phase_mask"]

#: half the aliasing limit: the steep slopes around a wrong voxel are caught too
DEFAULT_MAX_PHASE_STEP_RAD = math.pi / 2


def phase_step_ppm(te_s: float, b0_t: float, step_rad: float = DEFAULT_MAX_PHASE_STEP_RAD
                   ) -> float:
    """The field step (ppm) that turns the phase by ``step_rad`` at echo time ``te_s``."""
    return float(phase_to_ppm(torch.tensor(float(step_rad), dtype=torch.float64), te_s, b0_t))


def unreliable_phase_mask(field_ppm: torch.Tensor, mask: torch.Tensor, te_s: float, b0_t: float,
                          max_step_rad: float = DEFAULT_MAX_PHASE_STEP_RAD, dilate_voxels: int = 1
                          ) -> torch.Tensor:
    """Voxels of ``mask`` whose field jumps by more than ``max_step_rad`` of phase at ``te_s``.

    Parameters
    ----------
    field_ppm : (X, Y, Z) tensor
        Total field, ppm (e.g. :class:`~qsmnet.transforms.field_mapping.FieldMapping`'s output).
    mask : (X, Y, Z) bool tensor
        Brain mask; neighbours outside it are not compared.
    te_s : float
        Echo time of the spatially unwrapped (reference) echo, s.
    b0_t : float
        Field strength, T.
    max_step_rad : float
        Largest trusted phase difference between 6-neighbours at ``te_s``, rad.
    dilate_voxels : int
        Grow the unreliable set by this many voxels (6-connected steps), within the mask.

    Returns
    -------
    (X, Y, Z) bool tensor: True where the field is not to be trusted (always inside ``mask``).
    """
    if field_ppm.shape != mask.shape or field_ppm.ndim != 3:
        raise ValueError(f"field {tuple(field_ppm.shape)} and mask {tuple(mask.shape)} must be "
                         "the same 3D shape")
    if max_step_rad <= 0 or dilate_voxels < 0:
        raise ValueError(f"need max_step_rad > 0 and dilate_voxels >= 0, got {max_step_rad}, "
                         f"{dilate_voxels}")
    limit = phase_step_ppm(te_s, b0_t, max_step_rad)
    m = mask.to(torch.bool)
    f = field_ppm.to(torch.float64 if field_ppm.dtype == torch.float64 else torch.float32)
    bad = torch.zeros_like(m)
    for axis in range(3):
        n = f.shape[axis]
        a, b = f.narrow(axis, 0, n - 1), f.narrow(axis, 1, n - 1)
        both = m.narrow(axis, 0, n - 1) & m.narrow(axis, 1, n - 1)
        jump = both & ((a - b).abs() > limit)
        bad.narrow(axis, 0, n - 1).logical_or_(jump)
        bad.narrow(axis, 1, n - 1).logical_or_(jump)
    if dilate_voxels:
        cross = torch.zeros(1, 1, 3, 3, 3, dtype=torch.float32, device=m.device)
        cross[0, 0, 1, 1, :] = cross[0, 0, 1, :, 1] = cross[0, 0, :, 1, 1] = 1.0
        grown = bad[None, None].to(torch.float32)
        for _ in range(int(dilate_voxels)):
            grown = (F.conv3d(grown, cross, padding=1) > 0).to(torch.float32)
        bad = grown[0, 0] > 0
    return bad & m


def fill_unreliable(field_ppm: torch.Tensor, mask: torch.Tensor, unreliable: torch.Tensor,
                    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0), sigma_mm: float = 2.0
                    ) -> torch.Tensor:
    """Replace ``field_ppm`` on ``unreliable`` voxels by the Gaussian-weighted mean of the
    reliable voxels of ``mask`` around them (normalised convolution, width ``sigma_mm``).

    Returns a new (X, Y, Z) tensor equal to ``field_ppm`` elsewhere (0 outside ``mask``). An
    unreliable voxel with no reliable voxel within a few ``sigma_mm`` gets 0.
    """
    m = mask.to(torch.bool)
    bad = unreliable.to(torch.bool) & m
    if not bool(bad.any()):
        return torch.where(m, field_ppm, torch.zeros_like(field_ppm))
    good = (m & ~bad).to(torch.float64)
    f = field_ppm.to(torch.float64) * good
    num = gaussian_smooth_mm(f, sigma_mm, voxel_size_mm)
    den = gaussian_smooth_mm(good, sigma_mm, voxel_size_mm)
    filled = torch.where(den > 1e-6, num / den.clamp_min(1e-6), torch.zeros_like(num))
    out = torch.where(bad, filled.to(field_ppm.dtype), field_ppm)
    return torch.where(m, out, torch.zeros_like(out))
