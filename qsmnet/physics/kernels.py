"""k-space kernels: the dipole kernel, spherical-mean-value (SMV) kernels, Laplacian spectra.

All kernels use ``k_i = fftfreq(N_i, d=voxel_size_i)`` (cycles/mm, DC at index 0, no fftshift),
which is exact for odd sizes too. ``half=True`` returns the ``rfftn`` layout (last axis
``N_z // 2 + 1``); all kernels here are real and even in k, so that layout is exact.

Per-sample geometry: ``voxel_size`` and ``b0_dir`` may be ``(3,)`` or ``(B, 3)``; with a batch
the kernel gets a leading ``B`` axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Vec3 = Sequence[float] | torch.Tensor


def _as_vec3(v: Vec3, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64, device=device)
    if t.shape[-1:] != (3,) or t.ndim > 2:
        raise ValueError(f"{name} must have shape (3,) or (B, 3), got {tuple(t.shape)}")
    if not bool(torch.all(torch.isfinite(t))):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return t


def kspace_grid(shape: Sequence[int], voxel_size: Vec3 = (1.0, 1.0, 1.0), *, half: bool = False,
                device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spatial frequencies (cycles/mm, float64) broadcastable to ``(..., X, Y, Z')``.

    With a ``(B, 3)`` ``voxel_size`` each grid has a leading batch axis ``(B, X, 1, 1)`` etc.
    """
    vs = _as_vec3(voxel_size, "voxel_size", torch.float64, device)
    if bool(torch.any(vs <= 0)):
        raise ValueError(f"voxel_size must be positive, got {voxel_size!r}")
    nx, ny, nz = (int(n) for n in shape)
    fx = torch.fft.fftfreq(nx, dtype=torch.float64, device=device)
    fy = torch.fft.fftfreq(ny, dtype=torch.float64, device=device)
    fz = (torch.fft.rfftfreq if half else torch.fft.fftfreq)(nz, dtype=torch.float64, device=device)
    vs = vs.reshape(-1, 3) if vs.ndim == 2 else vs.reshape(1, 3)
    kx = fx.reshape(1, -1, 1, 1) / vs[:, 0].reshape(-1, 1, 1, 1)
    ky = fy.reshape(1, 1, -1, 1) / vs[:, 1].reshape(-1, 1, 1, 1)
    kz = fz.reshape(1, 1, 1, -1) / vs[:, 2].reshape(-1, 1, 1, 1)
    if torch.as_tensor(voxel_size).ndim == 1:
        kx, ky, kz = kx[0], ky[0], kz[0]
    return kx, ky, kz


def dipole_kernel(shape: Sequence[int], voxel_size: Vec3 = (1.0, 1.0, 1.0),
                  b0_dir: Vec3 = (0.0, 0.0, 1.0), *, half: bool = False,
                  dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The unit dipole kernel ``D(k) = 1/3 - (k . b)^2 / |k|^2`` with ``D(0) = 0``.

    Parameters
    ----------
    shape : (X, Y, Z)
        Grid size (the padded size when used for convolution).
    voxel_size : (3,) or (B, 3)
        Voxel size in mm along the array axes.
    b0_dir : (3,) or (B, 3)
        B0 direction in array-axis coordinates; normalised here.
    half : bool
        Return the ``rfftn`` half-spectrum layout.

    Returns
    -------
    Tensor (X, Y, Z) or (B, X, Y, Z) (last axis Z // 2 + 1 when ``half``), real.

    Notes
    -----
    ``D(0) = 0`` makes the simulated field zero-mean and leaves the mean of chi undetermined,
    so inversions reference chi to its mean inside the mask.
    """
    b = _as_vec3(b0_dir, "b0_dir", torch.float64, device)
    bn = b.norm(dim=-1, keepdim=True)
    if bool(torch.any(bn < 1e-8)):
        raise ValueError("b0_dir must be non-zero")
    b = b / bn
    batched = b.ndim == 2 or torch.as_tensor(voxel_size).ndim == 2
    # The grid is built in float64 (exact frequencies) and the kernel in the requested dtype:
    # float32 keeps ~1e-7 relative accuracy and is several times faster at training sizes.
    kx, ky, kz = (k.to(dtype) for k in kspace_grid(shape, voxel_size, half=half, device=device))
    if batched:
        b = b.reshape(-1, 3).to(dtype)
        bx, by, bz = (b[:, i].reshape(-1, 1, 1, 1) for i in range(3))
        if kx.ndim == 3:
            kx, ky, kz = kx[None], ky[None], kz[None]
    else:
        bx, by, bz = (float(b[i]) for i in range(3))
    k2 = kx * kx + ky * ky + kz * kz
    k2[..., 0, 0, 0] = 1.0  # avoid 0/0 at DC; D(0) is set below
    d = None
    # On an even axis the Nyquist frequency -1/(2 dx) stands for +1/(2 dx) too. With an oblique
    # B0 the cross terms of (k.b)^2 differ between the two, so D would not be even in k on those
    # planes and strong sources (air, +9 ppm) would ring. Averaging D over the sign of every
    # Nyquist component makes the kernel exactly real and even; elsewhere nothing changes.
    flips = [(axis, k) for axis, (n, k) in enumerate(zip(shape, (kx, ky, kz)))
             if int(n) % 2 == 0 and int(n) > 1]
    combos = range(1 << len(flips)) if not _axis_aligned(b) else range(1)
    for combo in combos:
        ks = [kx, ky, kz]
        for bit, (axis, k) in enumerate(flips):
            if combo >> bit & 1:
                nyq = int(shape[axis]) // 2
                k = k.clone()
                idx = [slice(None)] * k.ndim
                idx[k.ndim - 3 + axis] = nyq
                k[tuple(idx)] = -k[tuple(idx)]
                ks[axis] = k
        kb = ks[0] * bx + ks[1] * by + ks[2] * bz
        term = kb.square_().div_(k2)
        d = term if d is None else d.add_(term)
    d = d.div_(len(combos)).neg_().add_(1.0 / 3.0)
    d[..., 0, 0, 0] = 0.0
    return d


def _axis_aligned(b: torch.Tensor) -> bool:
    """True when every B0 vector has one non-zero component (no cross terms in (k.b)^2)."""
    return bool(torch.all((b.reshape(-1, 3).abs() > 1e-12).sum(dim=-1) <= 1))


def sphere_mask(shape: Sequence[int], voxel_size: Vec3, radius_mm: float,
                device=None) -> torch.Tensor:
    """Binary sphere ``|r| <= radius_mm`` centred on voxel 0 with periodic distances (bool)."""
    if radius_mm <= 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    vs = _as_vec3(voxel_size, "voxel_size", torch.float64, device).reshape(3)
    coords = []
    for n, d in zip(shape, vs):
        i = torch.arange(int(n), dtype=torch.float64, device=device)
        coords.append(torch.minimum(i, int(n) - i) * d)
    x = coords[0].reshape(-1, 1, 1)
    y = coords[1].reshape(1, -1, 1)
    z = coords[2].reshape(1, 1, -1)
    # A small tolerance keeps grid points exactly on the surface (e.g. r = 2 mm at 1 mm) inside.
    return (x * x + y * y + z * z) <= radius_mm * radius_mm * (1.0 + 1e-9)


#: sub-samples per axis of a voxel the sphere's surface cuts (:func:`sphere_weights`)
SPHERE_SUBSAMPLES = 7


def sphere_weights(shape: Sequence[int], voxel_size: Vec3, radius_mm: float,
                   subsamples: int = SPHERE_SUBSAMPLES, device=None) -> torch.Tensor:
    """Partial-volume sphere: the fraction of each voxel inside ``|r| <= radius_mm`` (float64).

    Centred on voxel 0 with periodic distances, like :func:`sphere_mask`. Voxels wholly inside
    get 1, wholly outside 0; those the surface cuts are sampled on ``subsamples^3`` points.

    Why: a spherical mean removes a harmonic field only as far as the discrete sphere's moments
    match a sphere's. The binary sphere misses that on anisotropic grids: at 1x1x2 mm and
    6 mm radius its mean x^2 is 7.45 mm^2 and mean z^2 is 6.79 mm^2, against 7.2 for a sphere.
    The harmonic background then leaks through SHARP-type filters on anisotropic grids; these
    weights stop the leak (figures: "Background removal" in the notes of ``docs/benchmarks.md``).
    """
    if radius_mm <= 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    if int(subsamples) < 1:
        raise ValueError(f"subsamples must be >= 1, got {subsamples}")
    vs = [float(v) for v in _as_vec3(voxel_size, "voxel_size", torch.float64, None).reshape(3)]
    return _sphere_weights_on(_periodic_coords(shape, vs, device), vs, float(radius_mm),
                              int(subsamples))


def _periodic_coords(shape: Sequence[int], vs: Sequence[float], device=None):
    """Signed periodic coordinates (mm) of each axis, broadcastable, and the distance to 0."""
    signed = []
    for axis, (n, d) in enumerate(zip(shape, vs)):
        i = torch.arange(int(n), dtype=torch.float64, device=device)
        view = [1, 1, 1]
        view[axis] = -1
        signed.append((torch.where(i > int(n) / 2, i - int(n), i) * d).reshape(view))
    x, y, z = signed
    return signed, torch.sqrt(x * x + y * y + z * z)


def _sphere_weights_on(coords, vs: Sequence[float], r: float, k: int) -> torch.Tensor:
    """:func:`sphere_weights` on coordinates from :func:`_periodic_coords` (reusable across
    radii on one grid)."""
    signed, dist = coords
    half_diag = 0.5 * math.sqrt(sum(d * d for d in vs))
    w = (dist + half_diag <= r).to(torch.float64)
    cut = ((dist - half_diag) <= r) & ((dist + half_diag) > r)
    idx = cut.nonzero(as_tuple=True)
    if idx[0].numel():
        off = (torch.arange(k, dtype=torch.float64, device=dist.device) + 0.5) / k - 0.5
        ox, oy, oz = torch.meshgrid(off * vs[0], off * vs[1], off * vs[2], indexing="ij")
        px = signed[0].reshape(-1)[idx[0]][:, None] + ox.reshape(1, -1)
        py = signed[1].reshape(-1)[idx[1]][:, None] + oy.reshape(1, -1)
        pz = signed[2].reshape(-1)[idx[2]][:, None] + oz.reshape(1, -1)
        w[idx] = ((px * px + py * py + pz * pz) <= r * r).to(torch.float64).mean(dim=1)
    return w


def smv_kernel(shape: Sequence[int], voxel_size: Vec3, radius_mm: float, *, half: bool = False,
               dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Spectrum of the normalised spherical-mean-value kernel (sphere of ``radius_mm``).

    The sphere is built on the physical (possibly anisotropic) grid, normalised to sum 1 and
    Fourier transformed; the result is real with value 1 at DC. ``S * f`` is the mean of ``f``
    over the sphere, and ``1 - S`` is the SMV high-pass used by SHARP-type methods.
    """
    s = sphere_mask(shape, voxel_size, radius_mm, device=device).to(torch.float64)
    s = s / s.sum()
    spec = torch.fft.rfftn(s) if half else torch.fft.fftn(s)
    return spec.real.to(dtype)


def laplacian_eigenvalues(shape: Sequence[int], voxel_size: Vec3 = (1.0, 1.0, 1.0), *,
                          half: bool = False, dtype: torch.dtype = torch.float32,
                          device=None) -> torch.Tensor:
    """Eigenvalues of the periodic 7-point Laplacian (scaled by 1/voxel_size^2); <= 0, 0 at DC.

    ``-laplacian_eigenvalues`` equals ``|E|^2``, the spectrum of ``grad^T grad`` for the periodic
    forward-difference gradient in :mod:`qsmnet.physics.operators`.
    """
    vs = _as_vec3(voxel_size, "voxel_size", torch.float64, device).reshape(3)
    out = None
    for axis, (n, d) in enumerate(zip(shape, vs)):
        m = (n // 2 + 1) if (half and axis == 2) else n
        idx = torch.arange(m, dtype=torch.float64, device=device)
        lam = -(2.0 - 2.0 * torch.cos(2.0 * math.pi * idx / n)) / (float(d) ** 2)
        view = [1, 1, 1]
        view[axis] = -1
        lam = lam.reshape(view)
        out = lam if out is None else out + lam
    return out.to(dtype)
