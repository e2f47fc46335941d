"""Random susceptibility sources, defined in millimetres so that anisotropic voxels sample the
right geometry.

* :func:`paint_shapes` — spheres, rotated ellipsoids and rotated boxes with a partial-volume edge
  ramp, painted over (or added to) a volume; each shape only touches its bounding box.
* :func:`vessel_tubes` — paramagnetic tubes of small radius along smooth random curves, rasterised
  from the exact distance to the curve's segments (vectorised scatter-max).
* :func:`random_textures` — low-pass and band-pass Gaussian random fields (one batched FFT).
* :func:`random_mask_points` — random points inside a mask (lesion and vessel centres).

All functions take a ``torch.Generator`` on the volume's device; nothing leaves that device except
the few shape parameters read back once to find bounding boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qsmnet.simulation.sampling import grid_axes

ELLIPSOID = "ellipsoid"
BOX = "box"


@dataclass
class Shape:
    """One solid shape. ``rotation`` columns are the shape's axes in array coordinates."""

    kind: str
    centre_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]
    value: float


def _half_extent(shape: Shape) -> list[float]:
    """Half-extent (mm) of the shape's axis-aligned bounding box along each array axis."""
    r = shape.radii_mm
    rot = shape.rotation
    if shape.kind == BOX:
        return [sum(abs(rot[i][j]) * r[j] for j in range(3)) for i in range(3)]
    return [math.sqrt(sum((rot[i][j] * r[j]) ** 2 for j in range(3))) for i in range(3)]


def _index_range(c: float, ext: float, n: int, d: float) -> tuple[int, int]:
    centre = (n - 1) / 2.0
    lo = max(0, int(math.ceil((c - ext) / d + centre)))
    hi = min(n, int(math.floor((c + ext) / d + centre)) + 1)
    return lo, hi


def shape_occupancy(shape: Shape, ax: torch.Tensor, ay: torch.Tensor, az: torch.Tensor,
                    edge_mm: float) -> torch.Tensor:
    """Occupancy in [0, 1] of ``shape`` on the grid ``ax x ay x az`` (1-D mm coordinates).

    The surface has a linear ramp of width ``edge_mm`` (partial volume): exact distance to the
    faces for a box, measured along the shortest semi-axis for an ellipsoid.
    """
    cx, cy, cz = shape.centre_mm
    dx = (ax - cx).reshape(-1, 1, 1)
    dy = (ay - cy).reshape(1, -1, 1)
    dz = (az - cz).reshape(1, 1, -1)
    rot = shape.rotation
    r = shape.radii_mm
    rmin = min(r)
    if shape.kind == BOX:
        # Signed distance (mm) inside a box: the distance to the nearest face plane.
        inner = None
        for j in range(3):
            p = (dx * rot[0][j] + dy * rot[1][j]) + dz * rot[2][j]
            dj = r[j] - p.abs()
            inner = dj if inner is None else torch.minimum(inner, dj)
        return torch.clamp(inner / edge_mm + 0.5, 0.0, 1.0)
    else:
        # Quadratic form (x - c)^T A (x - c), A = R diag(1/r^2) R^T, evaluated separably:
        # a 2-D (x, y) part plus a term linear in dz and a 1-D dz^2 part.
        a = [[sum(rot[i][k] * rot[m][k] / (r[k] * r[k]) for k in range(3)) for m in range(3)]
             for i in range(3)]
        xy = dx * dx * a[0][0] + (dx * dy) * (2 * a[0][1]) + dy * dy * a[1][1]
        lin = dx * (2 * a[0][2]) + dy * (2 * a[1][2])
        q = torch.sqrt((xy + lin * dz) + dz * dz * a[2][2])
    return torch.clamp((1.0 - q) * (rmin / edge_mm) + 0.5, 0.0, 1.0)


def paint_shapes(volume: torch.Tensor, shapes: Sequence[Shape], voxel_size_mm: Sequence[float],
                 edge_mm: float, mode: str = "over",
                 axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Paint ``shapes`` into ``volume`` ``(X, Y, Z)`` in place (in order) and return it.

    Parameters
    ----------
    volume : (X, Y, Z) float tensor
    shapes : shapes with centres in mm relative to the patch centre (see
        :func:`qsmnet.simulation.sampling.grid_axes`).
    voxel_size_mm : (3,)
    edge_mm : partial-volume ramp width.
    mode : ``"over"`` (alpha-blend the value over what is there: a later shape hides an earlier
        one) or ``"add"`` (add ``occupancy * value``).
    """
    if mode not in ("over", "add"):
        raise ValueError(f"mode must be 'over' or 'add', got {mode!r}")
    shape3 = tuple(volume.shape[-3:])
    if axes is None:
        axes = grid_axes(shape3, voxel_size_mm, volume.device, volume.dtype)
    vs = [float(v) for v in voxel_size_mm]
    for s in shapes:
        ext = [e + edge_mm for e in _half_extent(s)]
        (x0, x1), (y0, y1), (z0, z1) = (_index_range(s.centre_mm[i], ext[i], shape3[i], vs[i])
                                        for i in range(3))
        if x1 <= x0 or y1 <= y0 or z1 <= z0:
            continue
        occ = shape_occupancy(s, axes[0][x0:x1], axes[1][y0:y1], axes[2][z0:z1], edge_mm)
        block = volume[x0:x1, y0:y1, z0:z1]
        if mode == "over":
            block.add_(occ * (s.value - block))
        else:
            block.add_(occ, alpha=s.value)
    return volume


def random_shapes(g: torch.Generator, n: int, centres_mm: torch.Tensor,
                  radius_range_mm: Sequence[float], value_range: Sequence[float],
                  kind_probs: Sequence[float] = (1.0, 0.0, 0.0)) -> list[Shape]:
    """``n`` random shapes around the given centres ``(n, 3)``.

    ``kind_probs`` weighs (sphere, ellipsoid, box); semi-axes are log-uniform in
    ``radius_range_mm`` (one for a sphere, one per axis otherwise), values uniform in
    ``value_range``, orientations uniform on SO(3).
    """
    if n <= 0:
        return []
    dev = g.device
    u = torch.rand(n, 5, generator=g, device=dev, dtype=torch.float64)
    q = torch.randn(n, 4, generator=g, device=dev, dtype=torch.float64)
    packed = torch.cat([u, q, centres_mm.to(torch.float64).reshape(n, 3)], dim=1).cpu().tolist()
    lo, hi = math.log(float(radius_range_mm[0])), math.log(float(radius_range_mm[1]))
    p = [float(x) for x in kind_probs]
    tot = sum(p)
    c_sphere, c_ellipsoid = p[0] / tot, (p[0] + p[1]) / tot
    out = []
    for row in packed:
        uk, ur0, ur1, ur2, uv = row[:5]
        quat = row[5:9]
        centre = tuple(row[9:12])
        if uk < c_sphere:
            kind, radii = ELLIPSOID, (math.exp(lo + (hi - lo) * ur0),) * 3
            rot = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
        else:
            kind = ELLIPSOID if uk < c_ellipsoid else BOX
            radii = tuple(math.exp(lo + (hi - lo) * v) for v in (ur0, ur1, ur2))
            rot = quat_to_rot(quat)
        value = float(value_range[0]) + (float(value_range[1]) - float(value_range[0])) * uv
        out.append(Shape(kind, centre, radii, rot, value))  # type: ignore[arg-type]
    return out


def quat_to_rot(q: Sequence[float]) -> tuple[tuple[float, float, float], ...]:
    n = math.sqrt(sum(v * v for v in q)) or 1.0
    w, x, y, z = (v / n for v in q)
    return ((1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)),
            (2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)),
            (2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)))


def random_voxel_indices(g: torch.Generator, mask: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` flat indices of voxels drawn uniformly (with replacement) from ``mask``.

    Exact integer inverse-CDF sampling (cumulative count + ``searchsorted``), much cheaper than
    ``torch.multinomial`` on a large volume. An empty mask draws from the whole volume.
    """
    flat = mask.reshape(-1)
    counts = torch.cumsum(flat.to(torch.int64), 0)
    total = counts[-1:]
    u = torch.rand(n, generator=g, device=flat.device, dtype=torch.float64)
    has = total > 0
    numel = torch.full_like(total, flat.numel())
    k = torch.floor(u * torch.where(has, total, numel)).to(torch.int64)
    idx = torch.searchsorted(counts, k, right=True)
    # An empty mask: the cumulative count is all zero and searchsorted returns numel; use k.
    return torch.where(has, idx, k).clamp_(0, flat.numel() - 1)


def random_mask_points(g: torch.Generator, mask: torch.Tensor, n: int,
                       voxel_size_mm: Sequence[float]) -> torch.Tensor:
    """``n`` random points (mm, patch-centred, ``(n, 3)``) at voxels of ``mask`` (uniform over
    its voxels, with a sub-voxel jitter). An empty mask gives points uniform in the patch."""
    shape = tuple(mask.shape[-3:])
    dev = mask.device
    if n <= 0:
        return torch.zeros(0, 3, device=dev)
    idx = random_voxel_indices(g, mask, n)
    nx, ny, nz = shape
    ix = torch.div(idx, ny * nz, rounding_mode="floor")
    iy = torch.div(idx, nz, rounding_mode="floor") % ny
    iz = idx % nz
    ijk = torch.stack([ix, iy, iz], dim=1).to(torch.float32)
    jitter = torch.rand(n, 3, generator=g, device=dev) - 0.5
    centre = torch.tensor([(s - 1) / 2.0 for s in shape], device=dev)
    vs = torch.tensor([float(v) for v in voxel_size_mm], device=dev)
    return (ijk + jitter - centre) * vs


def random_textures(g: torch.Generator, shape: Sequence[int], voxel_size_mm: Sequence[float],
                    bands: Sequence[tuple[float, float | None]], downsample: int = 1,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit-variance Gaussian random fields ``(K, X, Y, Z)``, one per band, from one FFT.

    ``bands[k] = (sigma_mm, None)`` is a low-pass field (white noise convolved with a Gaussian of
    standard deviation ``sigma_mm``); ``(sigma_lo_mm, sigma_hi_mm)`` with ``sigma_lo < sigma_hi``
    a band-pass (difference of Gaussians): structure between about ``sigma_lo`` and ``sigma_hi``.
    The fields are periodic over the (coarse) grid and normalised to zero mean and unit standard
    deviation.

    ``downsample = f > 1`` draws the fields on a grid ``f`` times coarser and interpolates them
    (trilinear) to ``shape``: ``f**3`` times cheaper, and accurate for low-pass fields whose
    ``sigma_mm`` is at least about ``f`` voxels.
    """
    dev = g.device
    f = max(1, int(downsample))
    full = tuple(int(n) for n in shape)
    grid = tuple(max(2, -(-n // f)) for n in full)
    vs = [float(v) * n / m for v, n, m in zip(voxel_size_mm, full, grid)]
    white = torch.randn(len(bands), *grid, generator=g, device=dev, dtype=dtype)
    spec = torch.fft.rfftn(white, dim=(-3, -2, -1))
    kx = torch.fft.fftfreq(grid[0], d=vs[0], device=dev, dtype=dtype).reshape(-1, 1, 1)
    ky = torch.fft.fftfreq(grid[1], d=vs[1], device=dev, dtype=dtype).reshape(1, -1, 1)
    kz = torch.fft.rfftfreq(grid[2], d=vs[2], device=dev, dtype=dtype).reshape(1, 1, -1)
    k2 = (kx * kx + ky * ky) + kz * kz
    filters = []
    for lo, hi in bands:
        flt = torch.exp(k2 * (-2.0 * math.pi ** 2 * float(lo) ** 2))
        if hi is not None:
            flt = flt - torch.exp(k2 * (-2.0 * math.pi ** 2 * float(hi) ** 2))
        filters.append(flt)
    out = torch.fft.irfftn(spec * torch.stack(filters), s=grid, dim=(-3, -2, -1))
    out = out - out.mean(dim=(-3, -2, -1), keepdim=True)
    out = out / out.std(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-12)
    if grid != full:
        out = F.interpolate(out.unsqueeze(0), size=full, mode="trilinear", align_corners=False)[0]
    return out


def vessel_tubes(g: torch.Generator, shape: Sequence[int], voxel_size_mm: Sequence[float],
                 centres_mm: torch.Tensor, radii_mm: torch.Tensor, deltas: torch.Tensor,
                 lengths_mm: torch.Tensor, edge_mm: float, curvature: float = 0.6,
                 taper: float = 0.3, n_ctrl: int = 6) -> torch.Tensor:
    """Vessel-like tubes along smooth random curves, as a volume ``(X, Y, Z)``.

    Each tube ``v`` is a curve of length ``lengths_mm[v]`` through ``centres_mm[v]`` whose
    direction drifts smoothly (random control vectors of size ``curvature`` interpolated along
    the curve), with radius ``radii_mm[v]`` tapering by up to ``exp(+-taper)`` along it. The
    value at a voxel is ``deltas[v] * occupancy`` with occupancy from the exact distance to the
    curve's segments (linear ramp of width ``edge_mm``); where tubes cross, the larger value wins.

    Cost is proportional to the tubes' surface, not to the volume: only voxels near each segment
    are evaluated (scatter-max into the volume).
    """
    dev = g.device
    n = int(centres_mm.shape[0])
    nx, ny, nz = (int(s) for s in shape)
    if n == 0:
        return torch.zeros(nx, ny, nz, device=dev)
    vsl = [float(v) for v in voxel_size_mm]
    vs = torch.tensor(vsl, device=dev, dtype=torch.float32)
    step = min(vsl)
    stats = torch.stack([lengths_mm.max(), radii_mm.max()]).cpu().tolist()
    n_seg = max(2, int(math.ceil(float(stats[0]) / step)))
    r_max = float(stats[1]) * math.exp(taper)

    d0 = torch.randn(n, 3, 1, generator=g, device=dev)
    d0 = d0 / d0.norm(dim=1, keepdim=True).clamp_min(1e-6)
    ctrl = torch.randn(n, 3, n_ctrl, generator=g, device=dev) * curvature
    pert = F.interpolate(ctrl, size=n_seg, mode="linear", align_corners=True)
    dirs = d0 + pert
    dirs = (dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-6)).transpose(1, 2)  # (n, S, 3)
    ds = (lengths_mm.to(dev, torch.float32) / n_seg).reshape(n, 1, 1)
    pos = torch.cat([torch.zeros(n, 1, 3, device=dev), torch.cumsum(dirs * ds, dim=1)], dim=1)
    pos = pos - pos[:, n_seg // 2: n_seg // 2 + 1] + centres_mm.to(dev, torch.float32).reshape(n, 1, 3)
    ut = torch.rand(n, 1, generator=g, device=dev) * 2.0 - 1.0
    t = torch.linspace(-1.0, 1.0, n_seg, device=dev).reshape(1, -1)
    radius = radii_mm.to(dev, torch.float32).reshape(n, 1) * torch.exp(taper * ut * t)  # (n, S)

    a, b = pos[:, :-1], pos[:, 1:]                                   # (n, S, 3) segment ends
    reach = r_max + edge_mm + 0.5 * step * 1.01
    half = [int(math.ceil(reach / v)) for v in vsl]
    ox, oy, oz = torch.meshgrid(*(torch.arange(-h, h + 1, device=dev) for h in half), indexing="ij")
    offs = torch.stack([ox.reshape(-1), oy.reshape(-1), oz.reshape(-1)], dim=1)   # (M, 3)
    offs_mm = offs.to(torch.float32) * vs
    keep = offs_mm.norm(dim=1) <= reach + 0.87 * max(vsl)
    offs, offs_mm = offs[keep], offs_mm[keep]

    centre_idx = torch.tensor([(s - 1) / 2.0 for s in (nx, ny, nz)], device=dev)
    mid_idx = torch.round((a + b) * 0.5 / vs + centre_idx)                      # (n, S, 3)
    # Segments whose midpoint is more than one halo outside the patch cannot reach it.
    hal = torch.tensor(half, device=dev, dtype=torch.float32)
    upper = torch.tensor([nx - 1, ny - 1, nz - 1], device=dev, dtype=torch.float32) + hal
    useful = ((mid_idx >= -hal) & (mid_idx <= upper)).all(-1)                  # (n, S)
    mid_idx = torch.minimum(torch.maximum(mid_idx, -hal), upper)
    # Geometry relative to segment start: ap = base + offset, all dot products by matmul.
    base = (mid_idx - centre_idx) * vs - a                                     # (n, S, 3)
    ab = b - a
    l2 = (ab * ab).sum(-1, keepdim=True).clamp_min(1e-12)                      # (n, S, 1)
    ap_ab = (base * ab).sum(-1, keepdim=True) + ab @ offs_mm.T                 # (n, S, M)
    ap2 = (base * base).sum(-1, keepdim=True) + 2.0 * (base @ offs_mm.T) + (offs_mm * offs_mm).sum(-1)
    tt = (ap_ab / l2).clamp_(0.0, 1.0)
    d2 = (ap2 - 2.0 * tt * ap_ab + tt * tt * l2).clamp_min_(0.0)
    occ = (radius.unsqueeze(-1) - torch.sqrt(d2)).div_(edge_mm).add_(0.5).clamp_(0.0, 1.0)
    val = occ * (deltas.to(dev, torch.float32).reshape(n, 1) * useful).unsqueeze(-1)

    # Scatter-max into a volume padded by two halos (no bounds checks needed), then crop.
    px, py, pz = nx + 4 * half[0], ny + 4 * half[1], nz + 4 * half[2]
    mi = mid_idx.to(torch.long) + 2 * torch.tensor(half, device=dev)
    mid_flat = (mi[..., 0] * py + mi[..., 1]) * pz + mi[..., 2]                  # (n, S)
    off_flat = (offs[:, 0] * py + offs[:, 1]) * pz + offs[:, 2]                 # (M,)
    flat = mid_flat.unsqueeze(-1) + off_flat
    out = torch.zeros(px * py * pz, device=dev, dtype=torch.float32)
    out.scatter_reduce_(0, flat.reshape(-1), val.reshape(-1), reduce="amax", include_self=True)
    out = out.reshape(px, py, pz)
    h0, h1, h2 = (2 * h for h in half)
    return out[h0:h0 + nx, h1:h1 + ny, h2:h2 + nz].contiguous()
