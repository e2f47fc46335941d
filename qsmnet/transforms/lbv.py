"""Laplacian boundary value (LBV) background-field removal (Zhou et al. 2014).

Inside the mask the background field is harmonic, so the local field ``l = f - b`` obeys
``lap(l) = lap(f)``. LBV takes the background equal to the total field on the mask's boundary
(``l = 0`` there) and solves this Poisson problem for ``l`` on the interior. With the 7-point
Laplacian (spacings in mm) the problem is ``A l = -lap(f)`` on the interior voxels ``I`` (the
mask voxels whose six neighbours are all in the mask), ``A = -lap`` with ``l = 0`` outside
``I``: symmetric positive definite, solved by conjugate gradients on the mask's bounding box.

The solve is exact for the background it assumes: a field harmonic in the mask (the discrete
Laplacian annihilates harmonic polynomials up to degree three exactly) leaves no trace, and a
local field that is zero on the boundary comes back unchanged. What LBV cannot recover is the
local field's own value on the boundary; the returned mask is the interior ``I``, less ``peel``
more layers where the boundary value is least certain.
"""

from __future__ import annotations

import torch

from qsmnet.physics.geometry import as_voxel_size_mm
from qsmnet.transforms._grid import (
    Vec3,
    checked_field,
    crop_box,
    map_samples,
    mask_bbox,
    per_sample_vectors,
    uncrop_box,
)
from qsmnet.transforms.base import Transform
from qsmnet.transforms.inversion import reference_to_mask_mean
from qsmnet.transforms.solvers import conjugate_gradient

__all__ = ["LBV", "LBV_MAX_ITER", "LBV_PEEL", "LBV_TOL", "lbv"]

#: CG budget and relative tolerance of the Poisson solve.
LBV_MAX_ITER = 2000
LBV_TOL = 1e-6
#: Layers peeled off beyond the boundary by default: chosen on a tuning subject outside the
#: evaluation sets ("Background removal" in the notes of docs/benchmarks.md).
LBV_PEEL = 1


def _laplacian(u: torch.Tensor, inv_h2: tuple[float, float, float]) -> torch.Tensor:
    """7-point Laplacian of a 3-D tensor (zero beyond its edges), per mm^2."""
    p = torch.nn.functional.pad(u[None, None], (1, 1, 1, 1, 1, 1))[0, 0]
    c = p[1:-1, 1:-1, 1:-1]
    out = (p[2:, 1:-1, 1:-1] + p[:-2, 1:-1, 1:-1] - 2 * c) * inv_h2[0]
    out += (p[1:-1, 2:, 1:-1] + p[1:-1, :-2, 1:-1] - 2 * c) * inv_h2[1]
    out += (p[1:-1, 1:-1, 2:] + p[1:-1, 1:-1, :-2] - 2 * c) * inv_h2[2]
    return out


def _interior(m: torch.Tensor) -> torch.Tensor:
    """Voxels of ``m`` whose six face neighbours are all in ``m`` (outside the grid: not)."""
    p = torch.nn.functional.pad(m[None, None].to(torch.uint8), (1, 1, 1, 1, 1, 1))[0, 0].bool()
    inner = p[1:-1, 1:-1, 1:-1].clone()
    for axis in range(3):
        for shift in (slice(2, None), slice(None, -2)):
            idx = [slice(1, -1)] * 3
            idx[axis] = shift
            inner &= p[tuple(idx)]
    return inner


def _lbv_single(f, m, vs, peel, max_iter, tol):
    full = tuple(f.shape)
    box = mask_bbox(m, 1)
    fc, mc = crop_box(f, box), crop_box(m, box)
    inv_h2 = tuple(1.0 / float(v) ** 2 for v in vs)
    inner = _interior(mc)
    for _ in range(peel):
        inner = _interior(inner)
    w = inner.to(fc.dtype)
    rhs = -_laplacian(fc * mc, inv_h2) * w

    def apply_a(x):
        return -_laplacian(x * w, inv_h2) * w

    x, _, _ = conjugate_gradient(apply_a, rhs, max_iter=max_iter, tol=tol)
    return uncrop_box(x * w, box, full), uncrop_box(inner, box, full)


def lbv(field_ppm: torch.Tensor, mask: torch.Tensor, voxel_size_mm: Vec3 = (1.0, 1.0, 1.0),
        peel: int = LBV_PEEL, max_iter: int = LBV_MAX_ITER, tol: float = LBV_TOL
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplacian boundary value background removal.

    Parameters
    ----------
    field_ppm : (..., X, Y, Z) tensor
        Total field, ppm (only its values in the mask are used).
    mask : (X, Y, Z) or (B, X, Y, Z) bool tensor
        Region of reliable field (brain, or brain and its CSF rim).
    voxel_size_mm : (3,) or (B, 3)
        Voxel size, mm (the Laplacian's spacings).
    peel : int
        Layers removed beyond the boundary itself; the field there is not used (Zhou 2014 peel
        1-3 layers whose field is least certain: at the edge of the region, the field map is
        the noisiest and the local field is furthest from the zero that LBV assumes there).
    max_iter, tol : int, float
        Conjugate-gradient budget and relative residual tolerance.

    Returns
    -------
    local_field_ppm : (..., X, Y, Z) tensor, zero mean in the returned mask, 0 outside.
    mask : (..., X, Y, Z) bool tensor, the interior of the input mask (less ``peel`` layers).

    References
    ----------
    Zhou D., Liu T., Spincemaille P., Wang Y., NMR Biomed. 27:312 (2014).
    """
    if peel < 0:
        raise ValueError(f"peel must be >= 0, got {peel}")
    x = checked_field(field_ppm, mask)
    mask = torch.as_tensor(mask).bool()
    lead = tuple(x.shape[:-3])
    vss = per_sample_vectors(voxel_size_mm, lead, "voxel_size_mm")

    def one(f, m, vs, _extra):
        as_voxel_size_mm(vs)
        if not bool(m.any()):
            raise ValueError("mask is empty: there is no voxel to reconstruct")
        return _lbv_single(f, m, vs, peel, max_iter, tol)

    with torch.no_grad():
        local, out_mask = map_samples(one, x, mask, vss)
    if not bool(out_mask.any()):
        raise ValueError("the mask has no interior voxel (too thin for LBV)")
    return reference_to_mask_mean(local, out_mask), out_mask


class LBV(Transform):
    """Transform wrapper of :func:`lbv`.

    Dict keys: total_field_ppm, mask, voxel_size_mm -> local_field_ppm, mask (the interior
    replaces the input mask, so a following inversion uses it).
    """

    input_keys = {"field_ppm": "total_field_ppm", "mask": "mask",
                  "voxel_size_mm": "voxel_size_mm"}
    output_keys = ("local_field_ppm", "mask")

    def __init__(self, peel: int = LBV_PEEL, max_iter: int = LBV_MAX_ITER,
                 tol: float = LBV_TOL) -> None:
        self.peel, self.max_iter, self.tol = peel, max_iter, tol

    def __call__(self, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0)):
        return lbv(field_ppm, mask, voxel_size_mm, peel=self.peel, max_iter=self.max_iter,
                   tol=self.tol)

    def __repr__(self) -> str:
        return f"LBV(peel={self.peel}, max_iter={self.max_iter}, tol={self.tol:g})"
