"""Brain-like masks and the head around them (CSF gap, skull, scalp, air, sinus air pockets).

The mask is the zero level set of an approximate signed distance (mm): the union of a main
ellipsoid and a few "lobe" ellipsoids, perturbed by a smooth random field (the effect of random
radial harmonics, without their cost). The same distance gives the layers outside the mask, so
their thicknesses are in millimetres on any voxel grid.

Susceptibility outside the mask is relative to CSF/tissue, as in the evaluation phantom: air is
about +9.4 ppm (tissue is about -9.05 ppm, air +0.36 ppm) and cortical bone about -2 ppm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qsmnet.simulation.sampling import int_in, lerp, scalars
from qsmnet.simulation.sources import (
    ELLIPSOID,
    Shape,
    paint_shapes,
    quat_to_rot,
    random_voxel_indices,
)

#: Tissue classes of the head model (``labels`` volume).
BRAIN, CSF, SKULL, SOFT_TISSUE, AIR = 0, 1, 2, 3, 4


@dataclass
class Head:
    """Mask, tissue classes and background susceptibility of one sample (all ``(X, Y, Z)``)."""

    mask: torch.Tensor          # bool
    labels: torch.Tensor | None  # uint8, BRAIN / CSF / SKULL / SOFT_TISSUE / AIR
    chi_background: torch.Tensor | None  # float32 ppm, zero inside the mask
    distance_mm: torch.Tensor | None  # approximate signed distance to the mask surface (negative inside)
    full: bool                  # the patch lies entirely inside the brain


def _quadratic_form(dx: torch.Tensor, dy: torch.Tensor, dz: torch.Tensor,
                    a: Sequence[Sequence[float]]) -> torch.Tensor:
    """``d^T A d`` on the grid ``dx x dy x dz`` (1-D), evaluated separably (3 full-size ops)."""
    dx, dy, dz = dx.reshape(-1, 1, 1), dy.reshape(1, -1, 1), dz.reshape(1, 1, -1)
    xy = dx * dx * a[0][0] + (dx * dy) * (2.0 * a[0][1]) + dy * dy * a[1][1]
    lin = dx * (2.0 * a[0][2]) + dy * (2.0 * a[1][2])
    return (xy + lin * dz) + dz * dz * a[2][2]


def ellipsoid_distance(ax: torch.Tensor, ay: torch.Tensor, az: torch.Tensor,
                       centre: Sequence[float], radii: Sequence[float],
                       rotation: Sequence[Sequence[float]]) -> torch.Tensor:
    """Approximate signed distance (mm) to an ellipsoid surface, ``(q - 1) q / |A (x - c)|``.

    ``q^2 = (x - c)^T A (x - c)`` with ``A = R diag(1 / r^2) R^T`` is the normalised radius; the
    first-order distance is exact for spheres and close to the surface of any ellipsoid, which is
    where it is used. ``rotation`` columns are the ellipsoid's axes in array coordinates.
    """
    r = [float(v) for v in radii]
    rot = rotation
    a1 = [[sum(rot[i][k] * rot[m][k] / r[k] ** 2 for k in range(3)) for m in range(3)] for i in range(3)]
    a2 = [[sum(rot[i][k] * rot[m][k] / r[k] ** 4 for k in range(3)) for m in range(3)] for i in range(3)]
    dx, dy, dz = ax - centre[0], ay - centre[1], az - centre[2]
    q2 = _quadratic_form(dx, dy, dz, a1).clamp_min(0.0)
    g2 = _quadratic_form(dx, dy, dz, a2).clamp_min((1e-6 / min(r)) ** 2)
    q = torch.sqrt(q2)
    return (q2 - q) * torch.rsqrt(g2)


def _full_head(shape: tuple[int, ...], dev: torch.device, with_background: bool) -> Head:
    """The head whose mask is the whole grid (brain everywhere, no background)."""
    mask = torch.ones(shape, dtype=torch.bool, device=dev)
    if not with_background:
        return Head(mask=mask, labels=None, chi_background=None, distance_mm=None, full=True)
    return Head(mask=mask, labels=torch.full(shape, BRAIN, dtype=torch.uint8, device=dev),
                chi_background=torch.zeros(shape, device=dev),
                distance_mm=torch.full(shape, -1e3, device=dev), full=True)


def _main_ellipsoid_mask(main: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dist, mask)`` of the main ellipsoid alone; one voxel when it holds none."""
    dist = main
    mask = dist <= 0
    if int(mask.sum()) == 0:
        # Degenerate geometry (radii below a voxel): keep the voxel nearest the centre.
        flat = torch.argmin(dist.reshape(-1))
        mask.reshape(-1)[flat] = True
        dist = dist - dist.reshape(-1)[flat]
    return dist, mask


def _add_air_pockets(chi_bg: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     idx: torch.Tensor, blob_u: torch.Tensor,
                     axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     voxel_size_mm: Sequence[float], cfg, air_ppm: float) -> torch.Tensor:
    """Paint air pockets centred at the flat voxel indices ``idx``, outside ``mask``.

    Returns the new background chi; sets ``labels`` to AIR in the pockets (in place).
    """
    shape = tuple(int(a.numel()) for a in axes)
    dev = axes[0].device
    nx, ny, nz = shape
    pts = torch.stack([torch.div(idx, ny * nz, rounding_mode="floor"),
                       torch.div(idx, nz, rounding_mode="floor") % ny, idx % nz], 1)
    packed = torch.cat([pts.to(torch.float64), blob_u], 1).cpu().tolist()
    shapes = []
    for row in packed:
        c = [(row[i] - (shape[i] - 1) / 2.0) * float(voxel_size_mm[i]) for i in range(3)]
        r = [lerp(row[3 + i], cfg.air_blob_radius_mm) for i in range(3)]
        q = [row[6] - 0.5, row[7] - 0.5, row[8] - 0.5, row[9] - 0.5]
        shapes.append(Shape(ELLIPSOID, tuple(c), tuple(r), quat_to_rot(q), 1.0))
    pocket = torch.zeros(shape, device=dev)
    edge = float(cfg.edge_voxels) * min(float(v) for v in voxel_size_mm)
    paint_shapes(pocket, shapes, voxel_size_mm, edge, mode="over", axes=axes)
    pocket = pocket * (~mask)
    chi_bg = chi_bg + pocket * (air_ppm - chi_bg)
    labels[(pocket > 0.5) & ~mask] = AIR
    return chi_bg


def random_head(g: torch.Generator, axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                voxel_size_mm: Sequence[float], cfg, perturbation: torch.Tensor,
                with_background: bool = True) -> Head:
    """Draw a brain-like mask with skull, scalp, air and air pockets around it.

    Parameters
    ----------
    g : generator on the volume's device.
    axes : voxel-centre coordinates (mm) along x, y, z.
    voxel_size_mm : (3,)
    cfg : :class:`qsmnet.simulation.config.SimulationConfig`
    perturbation : smooth random field ``(X, Y, Z)`` (about unit variance) for the boundary; it
        is scaled by ``cfg.mask_perturb_frac`` times the mean radius (times a random 0.3..1).
    with_background : build the tissue classes and the background susceptibility (else only the
        mask: ``labels`` and ``chi_background`` are None). The random draws are the same either
        way, so the mask does not depend on this flag.
    """
    shape = tuple(int(a.numel()) for a in axes)
    dev = axes[0].device
    half = [0.5 * n * float(d) for n, d in zip(shape, voxel_size_mm)]
    u = scalars(g, 32 + 6 * int(cfg.mask_lobes_max))
    quats = torch.randn(1 + cfg.mask_lobes_max, 4, generator=g, device=dev,
                        dtype=torch.float64).cpu().tolist()

    if u[0] < cfg.full_mask_prob:
        return _full_head(shape, dev, with_background)

    frac = lerp(u[1], cfg.mask_radius_frac)
    j = float(cfg.mask_axis_jitter)
    radii = [frac * h * lerp(u[2 + i], (1.0 - j, 1.0 + j)) for i, h in enumerate(half)]
    centre = [lerp(u[5 + i], (-cfg.mask_center_jitter, cfg.mask_center_jitter)) * h
              for i, h in enumerate(half)]
    identity = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    rot = quat_to_rot(quats[0]) if cfg.mask_rotate else identity
    main = ellipsoid_distance(*axes, centre, radii, rot)
    dist = main
    n_lobes = int_in(u[8], (0, cfg.mask_lobes_max))
    for k in range(n_lobes):
        b = 32 + 6 * k
        off = [lerp(u[b + i], (-0.6, 0.6)) * r for i, r in enumerate(radii)]
        lobe_r = [lerp(u[b + 3], (0.4, 0.7)) * r for r in radii]
        lobe = ellipsoid_distance(*axes, [c + o for c, o in zip(centre, off)], lobe_r,
                                  quat_to_rot(quats[1 + k]) if cfg.mask_rotate else identity)
        dist = torch.minimum(dist, lobe)
    r_mean = sum(radii) / 3.0
    dist = dist + perturbation * (cfg.mask_perturb_frac * r_mean * lerp(u[21], (0.3, 1.0)))
    mask = dist <= 0
    n_vox = mask.numel()
    if int(mask.sum()) < cfg.mask_min_fraction * n_vox:
        dist, mask = _main_ellipsoid_mask(main)

    # Layers outside the mask, by distance (mm).
    csf = lerp(u[22], cfg.csf_mm)
    skull = lerp(u[23], cfg.skull_mm) if u[24] < cfg.skull_prob else 0.0
    scalp = lerp(u[25], cfg.scalp_mm)
    air_around = u[26] < cfg.head_air_prob
    skull_ppm = lerp(u[27], cfg.skull_ppm)
    air_ppm = lerp(u[28], cfg.air_ppm)
    soft_ppm = lerp(u[29], cfg.soft_tissue_ppm)

    n_blobs = int_in(u[30], (0, cfg.air_blobs_max))
    blob_idx = random_voxel_indices(g, dist > 0.5 * csf, n_blobs) if n_blobs else None
    blob_u = torch.rand(n_blobs, 7, generator=g, device=dev, dtype=torch.float64)
    if not with_background:
        return Head(mask=mask, labels=None, chi_background=None, distance_mm=dist, full=False)

    # Class boundaries by distance: brain <= 0 < CSF <= csf < skull <= csf+skull < scalp, air.
    far = csf + skull + scalp if air_around else math.inf
    bounds = torch.tensor([0.0, csf, csf + skull, far], device=dev, dtype=dist.dtype)
    labels = torch.bucketize(dist, bounds, right=False).to(torch.uint8)  # 0..4 = BRAIN..AIR
    labels = torch.where(mask, torch.zeros_like(labels), labels)
    table = torch.tensor([0.0, 0.0, skull_ppm, soft_ppm, air_ppm], device=dev)
    chi_bg = table[labels.long()]

    # Sinus / ear-canal air pockets: ellipsoids centred outside the mask, never inside it.
    if n_blobs:
        chi_bg = _add_air_pockets(chi_bg, labels, mask, blob_idx, blob_u, axes, voxel_size_mm,
                                  cfg, air_ppm)
    chi_bg = chi_bg * (~mask)
    return Head(mask=mask, labels=labels, chi_background=chi_bg, distance_mm=dist, full=False)


def distant_sphere_field(axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                         centres_mm: Sequence[Sequence[float]], radii_mm: Sequence[float],
                         chi_ppm: Sequence[float], b0_dir: Sequence[float]) -> torch.Tensor:
    """Analytic field (ppm) of uniform spheres, valid outside them (where the patch is).

    ``f = chi / 3 * (a / r)^3 * (3 cos^2(theta) - 1)``, theta the angle to B0 — the conventions'
    sphere truth. Used for sources outside the patch (the head's air boundary, distant sinuses).
    """
    shape = tuple(int(a.numel()) for a in axes)
    out = torch.zeros(shape, device=axes[0].device, dtype=axes[0].dtype)
    b = [float(v) for v in b0_dir]
    nb = math.sqrt(sum(v * v for v in b))
    b = [v / nb for v in b]
    for c, a, chi in zip(centres_mm, radii_mm, chi_ppm):
        dx = (axes[0] - c[0]).reshape(-1, 1, 1)
        dy = (axes[1] - c[1]).reshape(1, -1, 1)
        dz = (axes[2] - c[2]).reshape(1, 1, -1)
        inv_r2 = torch.reciprocal(((dx * dx + dy * dy) + dz * dz).clamp_min(float(a) ** 2))
        proj = (dx * b[0] + dy * b[1]) + dz * b[2]
        cos2 = proj * proj * inv_r2
        out += (float(chi) / 3.0 * float(a) ** 3) * (3.0 * cos2 - 1.0) * inv_r2 * torch.sqrt(inv_r2)
    return out


def harmonic_polynomial(axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        coefficients: Sequence[float], half_fov_mm: float) -> torch.Tensor:
    """Residual shim field: a combination of the 8 harmonic 1st/2nd-order terms.

    Terms (coordinates divided by ``half_fov_mm``): x, y, z, x^2 - y^2, xy, 2z^2 - x^2 - y^2,
    yz, xz. All have zero Laplacian, as a field from sources outside the region must.
    """
    x = (axes[0] / half_fov_mm).reshape(-1, 1, 1)
    y = (axes[1] / half_fov_mm).reshape(1, -1, 1)
    z = (axes[2] / half_fov_mm).reshape(1, 1, -1)
    c = [float(v) for v in coefficients]
    xy_part = c[0] * x + c[1] * y + c[3] * (x * x - y * y) + c[4] * (x * y) - c[5] * (x * x + y * y)
    z_part = c[2] * z + 2.0 * c[5] * z * z
    return (xy_part + z_part) + z * (c[6] * y + c[7] * x)
