"""Background-field removal: total field (ppm) -> local (tissue) field (ppm) and its mask.

Every method returns ``(local_field_ppm, mask)`` where ``mask`` is the region on which it
returns a field (SMV methods erode the input mask by their kernel radius; PDF keeps it). The
local field is zero outside that mask and referenced to zero mean inside it: a constant is a
harmonic function, so no background-removal method can tell it from the background (qsm-forward's
local-field truth is referenced the same way).

Methods
-------
* :func:`vsharp` — variable-radius SHARP (Wu 2012), radii in mm, largest first, deconvolution
  with the largest kernel's truncated inverse.
* :func:`resharp` — regularised SHARP (Sun & Wilman 2013): Tikhonov-regularised deconvolution of
  the SMV-filtered field by conjugate gradients.
* :func:`vresharp` — V-SHARP's variable-radius high-pass with RESHARP's regularised solve, each
  voxel matched with the kernel of its own radius.
* :func:`pdf` — projection onto dipole fields (Liu 2011): least-squares fit of the field inside
  the mask by dipoles outside it, optional noise weights, CG on the normal equations.
* :func:`~qsmnet.transforms.lbv.lbv` — Laplacian boundary value (Zhou 2014), in its own module.
* :class:`~qsmnet.transforms.tfi.TFIBackground` — total-field inversion (Liu 2017):
  susceptibility fitted on the mask and a band around it at once; the local field is the field
  of the part inside the mask, on the whole mask; in :mod:`qsmnet.transforms.tfi`.

Grid: each sample is cropped to the bounding box of its mask and zero padded (by the largest
SMV radius, or ``pad`` voxels for PDF) to an FFT-friendly size; spectra use ``rfftn``. The total
field is multiplied by the mask first, so values outside the mask are never used. Batched input
``(B, X, Y, Z)`` with per-sample masks and ``(B, 3)`` geometry runs sample by sample.

Erosion is done on counts (``conv(mask, sphere) > n_sphere - 0.5`` with an unnormalised sphere),
which is exact in float32 for spheres of up to ~10^5 voxels, instead of the usual
``> 1 - eps`` test whose ``eps`` must be below ``1 / n_sphere`` yet above float32 round-off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qsmnet.physics.geometry import as_voxel_size_mm
from qsmnet.physics.forward import _crop, _pad, pad_amount
from qsmnet.physics.kernels import (
    SPHERE_SUBSAMPLES,
    _periodic_coords,
    _sphere_weights_on,
    dipole_kernel,
)
from qsmnet.transforms._grid import (
    PadArg,
    Vec3,
    broadcast_mask,
    checked_field,
    crop_box,
    map_samples,
    nonempty_box,
    per_sample_vectors,
    prepare_weights,
    uncrop_box,
)
from qsmnet.transforms.base import Transform
from qsmnet.transforms.inversion import reference_to_mask_mean
from qsmnet.transforms.lbv import LBV
from qsmnet.transforms.solvers import conjugate_gradient
from qsmnet.transforms.tfi import TFIBackground


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _radius_voxels(radius_mm: float, vs: Sequence[float]) -> list[int]:
    """Reach of the partial-volume sphere's support, in voxels per axis."""
    reach = float(radius_mm) + 0.5 * math.sqrt(sum(float(h) ** 2 for h in vs))
    return [int(math.floor(reach / h + 1e-9)) for h in vs]


def _padded_crop(f: torch.Tensor, m: torch.Tensor, margin: Sequence[int]):
    """Mask, crop to the mask bbox, zero pad by ``margin`` (voxels per side, FFT-friendly)."""
    box = nonempty_box(m)
    fc = crop_box(f * m.to(f.dtype), box)
    mc = crop_box(m, box)
    cshape = tuple(fc.shape)
    pads = pad_amount(cshape, [int(a) for a in margin])
    padded = [n + a + b for n, (a, b) in zip(cshape, pads)]
    return _pad(fc, pads), _pad(mc.to(f.dtype), pads), pads, box, cshape, padded


class _SphereSpectra:
    """Spectra of SMV spheres on one grid: the partial-volume sphere (:func:`sphere_weights`)
    that the filters use, and its support (every voxel it touches) for the erosion test."""

    def __init__(self, shape, vs, dtype, device):
        self.shape, self.vs, self.dtype = tuple(shape), [float(v) for v in vs], dtype
        self.coords = _periodic_coords(self.shape, self.vs, device)  # shared by every radius

    def __call__(self, radius_mm: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Return ``(S, support_count, n_support)``: the rfftn (real part) of the normalised
        sphere (:func:`sphere_weights`), of its support, and the support's voxel count."""
        w = _sphere_weights_on(self.coords, self.vs, float(radius_mm), SPHERE_SUBSAMPLES)
        support = (w > 0).to(self.dtype)
        spec = torch.fft.rfftn((w / w.sum()).to(self.dtype)).real
        return spec, torch.fft.rfftn(support).real, float(support.sum())


def _erode(mask_spec: torch.Tensor, support_count: torch.Tensor, n: float, shape) -> torch.Tensor:
    """Voxels whose whole sphere support lies in the mask: ``conv(mask, support) > n - 0.5``.

    Strict on purpose: the field is zero outside the mask, and the total field there is far
    larger than the local field, so even a sliver of sphere outside would bias the mean."""
    return torch.fft.irfftn(mask_spec * support_count, s=tuple(shape)) > (n - 0.5)


def _default_radii(vs: Sequence[float], max_radius_mm: float, min_radius_mm: float | None,
                   step_mm: float | None) -> list[float]:
    step = max(vs) if step_mm is None else float(step_mm)
    rmin = 2.0 * max(vs) if min_radius_mm is None else float(min_radius_mm)
    if step <= 0 or rmin <= 0 or max_radius_mm < rmin:
        raise ValueError(f"need 0 < min_radius_mm <= max_radius_mm and step_mm > 0, got "
                         f"{rmin}, {max_radius_mm}, {step}")
    n = int(math.floor((float(max_radius_mm) - rmin) / step + 1e-9)) + 1
    return [round(float(max_radius_mm) - i * step, 9) for i in range(n)]


def _radii(vs: Sequence[float], radii_mm: Sequence[float] | None, max_radius_mm: float,
           min_radius_mm: float | None, step_mm: float | None) -> list[float]:
    """The given radii (largest first), or the default range for this voxel size."""
    if radii_mm is None:
        return _default_radii(vs, max_radius_mm, min_radius_mm, step_mm)
    radii = sorted((float(r) for r in radii_mm), reverse=True)
    if not radii or radii[-1] <= 0:
        raise ValueError(f"radii_mm must be positive, got {radii_mm!r}")
    return radii


def _finish(local: torch.Tensor, out_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference_to_mask_mean(local, out_mask), out_mask


# --------------------------------------------------------------------------------------------
# V-SHARP
# --------------------------------------------------------------------------------------------

def _smv_bands(fp, mp, vs, radii, s):
    """Variable-radius SMV filters on the padded grid ``s``.

    Returns ``(c_max, kernels, bands, filled)``: ``c_max`` the high-pass ``1 - S`` (real
    rfftn) of the largest radius; for each radius whose eroded mask adds voxels (largest
    first), its high-pass and its band, the voxels whose largest fitting sphere has that radius
    (float 0/1); and ``filled``, the mask eroded by the smallest radius (bool).
    """
    spheres = _SphereSpectra(s, vs, fp.dtype, fp.device)
    m_spec = torch.fft.rfftn(mp)
    filled = torch.zeros(s, dtype=torch.bool, device=fp.device)
    c_max, kernels, bands = None, [], []
    for r in radii:
        sph, supp, n = spheres(r)
        ero = _erode(m_spec, supp, n, s)
        c = 1.0 - sph                              # the SMV high-pass (delta - S), real
        if c_max is None:
            c_max = c
        new = ero & ~filled
        if bool(new.any()):
            kernels.append(c)
            bands.append(new.to(fp.dtype))
            filled |= ero
    return c_max, kernels, bands, filled


def _vsharp_single(f, m, vs, radii, threshold):
    as_voxel_size_mm(vs)
    full = tuple(f.shape)
    margin = _radius_voxels(max(radii), vs)
    fp, mp, pads, box, cshape, padded = _padded_crop(f, m, [a + 1 for a in margin])
    s = tuple(padded)
    c_max, kernels, bands, filled = _smv_bands(fp, mp, vs, radii, s)
    inv = torch.where(c_max.abs() >= threshold,
                      1.0 / torch.where(c_max == 0, torch.ones_like(c_max), c_max),
                      torch.zeros_like(c_max))
    f_spec = torch.fft.rfftn(fp)
    out = torch.zeros_like(fp)
    for c, band in zip(kernels, bands):
        out = torch.where(band > 0, torch.fft.irfftn(f_spec * c, s=s), out)
    local = torch.fft.irfftn(torch.fft.rfftn(out) * inv, s=s) * filled.to(fp.dtype)
    local = uncrop_box(_crop(local, pads, cshape), box, full)
    out_mask = uncrop_box(_crop(filled, pads, cshape), box, full)
    return local, out_mask


def vsharp(field_ppm: torch.Tensor, mask: torch.Tensor,
           voxel_size_mm: Vec3 = (1.0, 1.0, 1.0), radii_mm: Sequence[float] | None = None,
           threshold: float = 0.05, max_radius_mm: float = 12.0,
           min_radius_mm: float | None = None,
           step_mm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-radius SHARP background removal (V-SHARP).

    For each radius ``r`` (mm, largest first) the mask eroded by a sphere of radius ``r`` is
    ``M_r = {x : sphere_r(x) inside the mask}``; voxels of ``M_r`` not yet filled by a larger
    radius take the SMV high-pass ``(delta - S_r) * f`` (harmonic background cancels there by the
    mean-value property). The combined high-passed field is deconvolved with the *largest*
    kernel's truncated inverse, ``1 / (1 - S_rmax)`` where ``|1 - S_rmax| >= threshold``, else 0,
    and masked by ``M_rmin``.

    Fast, and as the toolboxes do it; where tissue meets the mask's edge (a brain) the
    truncated deconvolution loses most of the local field, and :func:`vresharp`, which solves
    the same data by regularised least squares, keeps much more of it at several times the cost
    (head phantoms; see the 'Background removal' section of docs/benchmarks.md).

    Parameters
    ----------
    field_ppm : (..., X, Y, Z) tensor
        Total (unwrapped) field, ppm.
    mask : (X, Y, Z) or (B, X, Y, Z) bool tensor
        Brain mask; the field outside it is ignored.
    voxel_size_mm : (3,) or (B, 3)
        Voxel size, mm; spheres are built on the physical grid (ellipsoids in voxels).
    radii_mm : sequence of float, optional
        Radii in mm (sorted largest first here). Default: ``max_radius_mm`` down to
        ``min_radius_mm`` in steps of ``step_mm``.
    threshold : float
        Truncation of the deconvolution (Wu 2012, QSM.jl, QSM.rs: 0.05).
    max_radius_mm : float
        Largest radius (12 mm, STI Suite / QSM.rs). It sets the deconvolution kernel, and the
        error falls steeply with it on the head phantoms (sweep in the 'Background removal'
        section of docs/benchmarks.md). The default stays the toolboxes' 12 mm: the phantoms
        are smaller than an adult brain.
    min_radius_mm : float, optional
        Smallest radius; default two voxels (twice the largest voxel dimension). On the head
        phantoms 2 voxels gave a lower local-field error than 1 voxel for a slightly smaller
        mask (see the 'Background removal' section of docs/benchmarks.md).
    step_mm : float, optional
        Radius step; default the largest voxel dimension (1 mm iso: 12, 11, ..., 2;
        1x1x2 mm: 12, 10, ..., 4).

    Returns
    -------
    local_field_ppm : (..., X, Y, Z) tensor
        Local field in ppm on the returned mask (zero mean there), 0 elsewhere.
    mask : (..., X, Y, Z) bool tensor
        The mask eroded by the smallest radius.

    References
    ----------
    Schweser F. et al., NeuroImage 54:2789 (2011) (SHARP); Wu B. et al., MRM 67:137 (2012)
    (V-SHARP); Li W. et al., NeuroImage 55:1645 (2011).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    x = checked_field(field_ppm, mask)
    lead = tuple(x.shape[:-3])
    vss = per_sample_vectors(voxel_size_mm, lead, "voxel_size_mm")

    def one(f, m, vs, _extra):
        radii = _radii(vs, radii_mm, max_radius_mm, min_radius_mm, step_mm)
        return _vsharp_single(f, m, vs, radii, threshold)

    with torch.no_grad():
        local, out_mask = map_samples(one, x, mask, vss)
    return _finish(local, out_mask)


# --------------------------------------------------------------------------------------------
# V-RESHARP
# --------------------------------------------------------------------------------------------

def _vresharp_single(f, m, vs, radii, lam, max_iter, tol):
    as_voxel_size_mm(vs)
    full = tuple(f.shape)
    margin = _radius_voxels(max(radii), vs)
    fp, mp, pads, box, cshape, padded = _padded_crop(f, m, [a + 1 for a in margin])
    s = tuple(padded)
    _, kernels, bands, filled = _smv_bands(fp, mp, vs, radii, s)

    def normal(a):
        # sum_r C_r^T B_r C_r a, with one forward and one inverse FFT shared by every radius
        a_spec = torch.fft.rfftn(a)
        acc = torch.zeros_like(a_spec)
        for c, band in zip(kernels, bands):
            acc += torch.fft.rfftn(band * torch.fft.irfftn(a_spec * c, s=s)) * c
        return torch.fft.irfftn(acc, s=s)

    rhs = normal(fp)
    x, _, _ = conjugate_gradient(lambda a: normal(a).add_(a, alpha=lam), rhs,
                                 max_iter=max_iter, tol=tol)
    filled_f = filled.to(fp.dtype)
    local = uncrop_box(_crop(x * filled_f, pads, cshape), box, full)
    out_mask = uncrop_box(_crop(filled, pads, cshape), box, full)
    return local, out_mask


def vresharp(field_ppm: torch.Tensor, mask: torch.Tensor,
             voxel_size_mm: Vec3 = (1.0, 1.0, 1.0), radii_mm: Sequence[float] | None = None,
             lam: float = 1e-2, max_radius_mm: float = 12.0,
             min_radius_mm: float | None = None, step_mm: float | None = None,
             max_iter: int = 50, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-radius regularised SHARP (V-RESHARP): V-SHARP's data, RESHARP's solve.

    Each voxel of the mask eroded by the smallest radius gets the largest radius ``r`` whose
    sphere fits in the mask (as :func:`vsharp`: its band ``B_r``), and the local field
    minimises ``sum_r ||B_r C_r (x - f)||^2 + lam ||x||^2`` with ``C_r = delta - S_r``: every
    voxel's high-passed field is matched with the kernel that made it, and the Tikhonov term
    picks the smallest field that explains them all (:func:`resharp` with one radius).
    Conjugate gradients on the normal equations; each iteration costs
    ``2 + 2 * len(radii)`` FFTs.

    :func:`vsharp` instead deconvolves the combined high-passed field with the largest kernel's
    truncated inverse. That treats the smaller radii's voxels as if filtered by the largest
    kernel, and the field outside the returned mask as zero, and the truncation drops every
    frequency where ``|1 - S_rmax| < threshold``. On the head phantoms this method leaves far
    less local-field error than V-SHARP in the same returned mask, and both of its halves (the
    per-radius kernels and the regularised solve) matter: the same masked least squares with
    the largest kernel alone falls in between (figures in the 'Background removal' section of
    docs/benchmarks.md). It is close in spirit to iRSHARP (Fang 2017), which also varies the
    radius near the boundary under a regularised solve.

    Parameters
    ----------
    field_ppm : (..., X, Y, Z) tensor
        Total field, ppm.
    mask : (X, Y, Z) or (B, X, Y, Z) bool tensor
        Brain mask; the field outside it is ignored.
    voxel_size_mm : (3,) or (B, 3)
        Voxel size, mm.
    radii_mm : sequence of float, optional
        Radii in mm (sorted largest first here). Default: ``max_radius_mm`` down to
        ``min_radius_mm`` in steps of ``step_mm``.
    lam : float
        Tikhonov weight (dimensionless, as :func:`resharp`'s). Default 1e-2, chosen together
        with the step on a head phantom outside the evaluation set (seed 2, axial 1 mm, tilted
        25 deg and 1x1x2 mm; the sweep is in the 'Background removal' section of
        docs/benchmarks.md).
    max_radius_mm, min_radius_mm : float
        As :func:`vsharp` (12 mm; two voxels).
    step_mm : float, optional
        Radius step; default 2 mm, or the largest voxel dimension where that is larger (1 mm
        iso: 12, 10, ..., 2; 1x1x2 mm: 12, 10, ..., 4). On the phantom above a 2 mm step was
        as good as 1 mm at 1 mm voxels for half the cost, and a 4 mm step worse at 1x1x2 mm.
    max_iter : int
        CG iterations (fixed budget).
    tol : float
        CG relative residual tolerance.

    Returns
    -------
    local_field_ppm, mask : as :func:`vsharp` (the mask eroded by the smallest radius).

    References
    ----------
    Wu B. et al., MRM 67:137 (2012) (V-SHARP); Sun H., Wilman A. H., MRM 71:1151 (2014)
    (RESHARP); Fang J. et al., J. Magn. Reson. 281:130 (2017) (iRSHARP).
    """
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    x = checked_field(field_ppm, mask)
    lead = tuple(x.shape[:-3])
    vss = per_sample_vectors(voxel_size_mm, lead, "voxel_size_mm")

    def one(f, m, vs, _extra):
        step = max(2.0, max(vs)) if step_mm is None else step_mm
        radii = _radii(vs, radii_mm, max_radius_mm, min_radius_mm, step)
        return _vresharp_single(f, m, vs, radii, lam, max_iter, tol)

    with torch.no_grad():
        local, out_mask = map_samples(one, x, mask, vss)
    return _finish(local, out_mask)


# --------------------------------------------------------------------------------------------
# RESHARP
# --------------------------------------------------------------------------------------------

def _resharp_single(f, m, vs, radius_mm, lam, max_iter, tol):
    as_voxel_size_mm(vs)
    full = tuple(f.shape)
    margin = _radius_voxels(radius_mm, vs)
    fp, mp, pads, box, cshape, padded = _padded_crop(f, m, [a + 1 for a in margin])
    s = tuple(padded)
    sph, supp, n = _SphereSpectra(padded, vs, fp.dtype, fp.device)(radius_mm)
    ero = _erode(torch.fft.rfftn(mp), supp, n, s)
    erof = ero.to(fp.dtype)
    c = 1.0 - sph

    def hp(a):
        return torch.fft.irfftn(torch.fft.rfftn(a) * c, s=s)

    rhs = hp(hp(fp) * erof)

    def normal(a):
        return hp(hp(a) * erof).add_(a, alpha=lam)

    x, _, _ = conjugate_gradient(normal, rhs, max_iter=max_iter, tol=tol)
    local = uncrop_box(_crop(x * erof, pads, cshape), box, full)
    out_mask = uncrop_box(_crop(ero, pads, cshape), box, full)
    return local, out_mask


def resharp(field_ppm: torch.Tensor, mask: torch.Tensor,
            voxel_size_mm: Vec3 = (1.0, 1.0, 1.0), radius_mm: float = 6.0, lam: float = 1e-3,
            max_iter: int = 50, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Regularised SHARP (RESHARP) background removal.

    With the SMV high-pass ``C = delta - S_r`` and the mask ``M_r`` eroded by radius ``r``, the
    local field minimises ``||M_r C (x - f)||^2 + lam ||x||^2``: the harmonic background is
    cancelled by ``C`` inside ``M_r`` and the Tikhonov term picks the smallest field that
    explains the high-passed data. Solved by conjugate gradients on
    ``(C^T M_r C + lam I) x = C^T M_r C f``; returned on ``M_r``.

    Parameters
    ----------
    field_ppm : (..., X, Y, Z) tensor
        Total field, ppm.
    mask : (X, Y, Z) or (B, X, Y, Z) bool tensor
        Brain mask.
    voxel_size_mm : (3,) or (B, 3)
        Voxel size, mm.
    radius_mm : float
        SMV radius, mm. Default 6 mm (as QSM.rs and MEDI; the original default is 3 mm): on the
        head phantoms the local-field error falls steeply with the radius while the returned
        mask shrinks (sweep in the 'Background removal' section of docs/benchmarks.md).
    lam : float
        Tikhonov weight (dimensionless; 1e-4 original, 1e-2 MEDI). Default 1e-3, the best mean
        local-field error over the axial 1 mm and 1x1x2 mm head phantoms at 6 mm (sweep in
        the 'Background removal' section of docs/benchmarks.md).
    max_iter : int
        CG iterations (fixed budget).
    tol : float
        CG relative residual tolerance.

    Returns
    -------
    local_field_ppm, mask : as :func:`vsharp` (mask eroded by ``radius_mm``).

    References
    ----------
    Sun H., Wilman A. H., MRM 71:1151 (2014) (RESHARP).
    """
    if radius_mm <= 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    x = checked_field(field_ppm, mask)
    lead = tuple(x.shape[:-3])
    vss = per_sample_vectors(voxel_size_mm, lead, "voxel_size_mm")

    def one(f, m, vs, _extra):
        return _resharp_single(f, m, vs, radius_mm, lam, max_iter, tol)

    with torch.no_grad():
        local, out_mask = map_samples(one, x, mask, vss)
    return _finish(local, out_mask)


# --------------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------------

def _pdf_single(f, m, vs, b0, w, pad, max_iter, tol):
    as_voxel_size_mm(vs)
    full = tuple(f.shape)
    margin = [int(pad)] * 3 if isinstance(pad, int) else [int(p) for p in pad]
    fp, mp, pads, box, cshape, padded = _padded_crop(f, m, margin)
    s = tuple(padded)
    d = dipole_kernel(padded, vs, b0, half=True, dtype=fp.dtype, device=fp.device)
    outside = 1.0 - mp
    if w is None:
        w2 = mp
    else:
        wp = _pad(crop_box(w, box), pads) * mp
        w2 = wp * wp

    def dip(a):
        return torch.fft.irfftn(torch.fft.rfftn(a) * d, s=s)

    rhs = dip(w2 * fp) * outside

    def normal(a):
        return dip(w2 * dip(a * outside)) * outside

    x, _, _ = conjugate_gradient(normal, rhs, max_iter=max_iter, tol=tol)
    local = (fp - dip(x * outside)) * mp
    local = uncrop_box(_crop(local, pads, cshape), box, full)
    return local, m.clone()


#: PDF defaults, shared by :func:`pdf` and :class:`PDF`: padding around the mask's box (voxels
#: per side, room for the background dipoles), conjugate-gradient budget and relative tolerance
PDF_PAD_VOXELS, PDF_MAX_ITER, PDF_TOL = 24, 40, 1e-3


def pdf(field_ppm: torch.Tensor, mask: torch.Tensor, voxel_size_mm: Vec3 = (1.0, 1.0, 1.0),
        b0_dir: Vec3 = (0.0, 0.0, 1.0), weights: torch.Tensor | None = None,
        pad: PadArg = PDF_PAD_VOXELS, max_iter: int = PDF_MAX_ITER, tol: float = PDF_TOL
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection onto dipole fields (PDF) background removal.

    The background is modelled as the field of sources outside the mask (within the padded
    box): ``min_x ||W (f - M D (Mbar x))||^2`` with ``Mbar = 1 - M``, solved by conjugate
    gradients on the normal equations ``Mbar D W^2 D Mbar x = Mbar D W^2 f``; the local field
    is ``M (f - D Mbar x)``. ``D`` is the k-space dipole kernel (``D(0) = 0``) for the given,
    possibly oblique, B0 direction and anisotropic voxels, on the mask's bounding box zero padded
    by ``pad`` voxels per side.

    Parameters
    ----------
    field_ppm : (..., X, Y, Z) tensor
        Total field, ppm.
    mask : (X, Y, Z) or (B, X, Y, Z) bool tensor
        Brain mask (also the returned mask: PDF does not erode).
    voxel_size_mm, b0_dir : (3,) or (B, 3)
        Voxel size (mm) and B0 direction in array axes.
    weights : (X, Y, Z) or (B, X, Y, Z) tensor, optional
        Noise weights ``W`` (e.g. magnitude, or 1 / field noise std; normalised to a maximum of 1
        in the mask); default uniform. One more axis than the field: per-echo weights, combined
        by root mean square.
    pad : int or (3,) ints
        Padding around the mask bounding box, voxels per side: the room for background dipoles
        beyond the field of view and against wrap-around (MEDI uses 40). 24 is the default; on
        the head phantoms the error hardly depends on it between 8 and 40 voxels (see
        the 'Background removal' section of docs/benchmarks.md).
    max_iter : int
        CG iterations (MEDI: 30). Early stopping regularises: on the head phantoms fewer
        iterations help the axial case and more the tilted one, and 40 is the compromise (see
        the 'Background removal' section of docs/benchmarks.md).
    tol : float
        CG relative residual tolerance.

    Returns
    -------
    local_field_ppm : (..., X, Y, Z) tensor, zero mean in the mask, 0 outside.
    mask : (..., X, Y, Z) bool tensor, the input mask.

    References
    ----------
    Liu T. et al., NMR Biomed. 24:1129 (2011).
    """
    if pad is None or isinstance(pad, str):
        raise ValueError(f"pdf needs an explicit padding in voxels, got {pad!r}")
    x = checked_field(field_ppm, mask)
    lead = tuple(x.shape[:-3])
    vss = per_sample_vectors(voxel_size_mm, lead, "voxel_size_mm")
    b0s = per_sample_vectors(b0_dir, lead, "b0_dir")
    w = None
    if weights is not None:
        w = prepare_weights(weights, x)
        mb = broadcast_mask(mask, x).to(x.dtype)
        peak = (w * mb).amax(dim=(-3, -2, -1), keepdim=True)
        w = w / peak.clamp_min(torch.finfo(x.dtype).tiny)

    def one(f, m, vs, b0, wi):
        return _pdf_single(f, m, vs, b0, wi, pad, max_iter, tol)

    with torch.no_grad():
        local, out_mask = map_samples(one, x, mask, vss, b0s, extra=w)
    return _finish(local, out_mask)


def remove_background(method: str, field_ppm: torch.Tensor, mask: torch.Tensor,
                      voxel_size_mm: Vec3, b0_dir: Vec3 = (0.0, 0.0, 1.0),
                      **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the background removal called ``method`` (a key of :data:`BFR_TRANSFORMS`).

    The training data (``data.bfr``) and the inference pipeline both run the transform of
    :data:`BFR_TRANSFORMS`, so that a network trained on background-removed fields sees exactly
    what inference gives it. ``b0_dir`` is used by PDF and TFI only (the SMV methods and LBV do
    not depend on it); ``params`` are the transform's constructor arguments, plus ``weights``
    (PDF's noise weights; TFI's reliability weights) and, for TFI, ``field_noise_ppm``.
    Returns ``(local_field_ppm, mask)`` as the method does.
    """
    transform = make_bfr_transform(method, params)
    weights = params.get("weights")
    if method == "pdf":
        return transform(field_ppm, mask, voxel_size_mm, b0_dir, weights=weights)
    if method == "tfi":
        return transform(field_ppm, mask, voxel_size_mm, b0_dir, weights=weights,
                         field_noise_ppm=params.get("field_noise_ppm"))
    return transform(field_ppm, mask, voxel_size_mm)


def make_bfr_transform(method: str, params: dict | None = None) -> Transform:
    """The transform of background removal ``method`` with constructor ``params`` (the per-call
    inputs ``weights`` and ``field_noise_ppm`` are left out)."""
    if method not in BFR_TRANSFORMS:
        raise ValueError(f"unknown background-removal method {method!r}: use "
                         f"{', '.join(BFR_TRANSFORMS)}")
    per_call = ("weights", "field_noise_ppm")
    return BFR_TRANSFORMS[method](**{k: v for k, v in (params or {}).items()
                                     if k not in per_call})


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------

_BFR_KEYS = {"field_ppm": "total_field_ppm", "mask": "mask", "voxel_size_mm": "voxel_size_mm"}


class VSHARP(Transform):
    """Transform wrapper of :func:`vsharp`.

    Dict keys: total_field_ppm, mask, voxel_size_mm -> local_field_ppm, mask (the eroded mask
    replaces the input mask, so a following inversion uses it).
    """

    input_keys = _BFR_KEYS
    output_keys = ("local_field_ppm", "mask")

    def __init__(self, radii_mm: Sequence[float] | None = None, threshold: float = 0.05,
                 max_radius_mm: float = 12.0, min_radius_mm: float | None = None,
                 step_mm: float | None = None) -> None:
        self.radii_mm = None if radii_mm is None else [float(r) for r in radii_mm]
        self.threshold = threshold
        self.max_radius_mm = max_radius_mm
        self.min_radius_mm = min_radius_mm
        self.step_mm = step_mm

    def __call__(self, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0)):
        return vsharp(field_ppm, mask, voxel_size_mm, radii_mm=self.radii_mm,
                      threshold=self.threshold, max_radius_mm=self.max_radius_mm,
                      min_radius_mm=self.min_radius_mm, step_mm=self.step_mm)

    def __repr__(self) -> str:
        radii = self.radii_mm if self.radii_mm is not None else (
            f"{self.max_radius_mm}..{self.min_radius_mm or 'max voxel'}")
        return f"VSHARP(radii_mm={radii}, threshold={self.threshold})"


class RESHARP(Transform):
    """Transform wrapper of :func:`resharp` (keys as :class:`VSHARP`)."""

    input_keys = _BFR_KEYS
    output_keys = ("local_field_ppm", "mask")

    def __init__(self, radius_mm: float = 6.0, lam: float = 1e-3, max_iter: int = 50,
                 tol: float = 1e-4) -> None:
        self.radius_mm = radius_mm
        self.lam = lam
        self.max_iter = max_iter
        self.tol = tol

    def __call__(self, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0)):
        return resharp(field_ppm, mask, voxel_size_mm, radius_mm=self.radius_mm, lam=self.lam,
                       max_iter=self.max_iter, tol=self.tol)

    def __repr__(self) -> str:
        return f"RESHARP(radius_mm={self.radius_mm}, lam={self.lam}, max_iter={self.max_iter})"


class VRESHARP(Transform):
    """Transform wrapper of :func:`vresharp` (keys as :class:`VSHARP`)."""

    input_keys = _BFR_KEYS
    output_keys = ("local_field_ppm", "mask")

    def __init__(self, radii_mm: Sequence[float] | None = None, lam: float = 1e-2,
                 max_radius_mm: float = 12.0, min_radius_mm: float | None = None,
                 step_mm: float | None = None, max_iter: int = 50, tol: float = 1e-4) -> None:
        self.radii_mm = None if radii_mm is None else [float(r) for r in radii_mm]
        self.lam = lam
        self.max_radius_mm = max_radius_mm
        self.min_radius_mm = min_radius_mm
        self.step_mm = step_mm
        self.max_iter = max_iter
        self.tol = tol

    def __call__(self, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0)):
        return vresharp(field_ppm, mask, voxel_size_mm, radii_mm=self.radii_mm, lam=self.lam,
                        max_radius_mm=self.max_radius_mm, min_radius_mm=self.min_radius_mm,
                        step_mm=self.step_mm, max_iter=self.max_iter, tol=self.tol)

    def __repr__(self) -> str:
        radii = self.radii_mm if self.radii_mm is not None else (
            f"{self.max_radius_mm}..{self.min_radius_mm or '2 voxels'}")
        return f"VRESHARP(radii_mm={radii}, lam={self.lam}, max_iter={self.max_iter})"


class PDF(Transform):
    """Transform wrapper of :func:`pdf`.

    Dict keys: total_field_ppm, mask, voxel_size_mm, b0_dir (+ ``weights_key`` when given) ->
    local_field_ppm, mask.
    """

    output_keys = ("local_field_ppm", "mask")

    def __init__(self, pad: int | Sequence[int] = PDF_PAD_VOXELS, max_iter: int = PDF_MAX_ITER,
                 tol: float = PDF_TOL, weights_key: str | None = None) -> None:
        self.pad = pad if isinstance(pad, int) else [int(p) for p in pad]
        self.max_iter = max_iter
        self.tol = tol
        self.weights_key = weights_key
        self.input_keys = dict(_BFR_KEYS, b0_dir="b0_dir")
        if weights_key is not None:
            self.input_keys["weights"] = weights_key

    def __call__(self, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
                 weights=None):
        return pdf(field_ppm, mask, voxel_size_mm, b0_dir, weights=weights, pad=self.pad,
                   max_iter=self.max_iter, tol=self.tol)

    def __repr__(self) -> str:
        return f"PDF(pad={self.pad}, max_iter={self.max_iter}, tol={self.tol})"


#: background-removal transforms by name (``--bfr``, ``data.bfr``)
BFR_TRANSFORMS = {"vsharp": VSHARP, "pdf": PDF, "resharp": RESHARP, "vresharp": VRESHARP,
                  "lbv": LBV, "tfi": TFIBackground}
#: the method names, in the order the CLI lists them
BFR_METHODS = tuple(BFR_TRANSFORMS)
