"""Laplacian phase unwrapping with an exact integer-2pi correction.

The unwrapped phase ``phi`` of a wrapped phase ``psi = wrap(phi)`` is found in two steps.

1. **Laplacian solve** (Schofield & Zhu 2003, wrapped-difference form; reference section 3.1
   form (b)). The discrete Laplacian of ``phi`` is computed from *wrapped* neighbour differences,

   ``lap(i) = sum_axes [w(i,i+1) wrap(psi(i+1) - psi(i)) - w(i-1,i) wrap(psi(i) - psi(i-1))] / h^2``

   which equals the Laplacian of the true phase exactly wherever neighbour differences stay
   below pi (the sin/cos form instead attenuates every difference by ``sin(x)/x`` and
   underestimates steep phase). ``w`` are edge weights: 1 between two voxels of the mask, 0
   across the mask boundary and across the array border (Neumann: no gradient leaves the
   region). The Poisson problem ``-div(w grad u) = -lap`` is solved

   * without a mask: directly and exactly with the DCT (mirror-symmetric extension; no periodic
     boundary artefacts), or with the periodic FFT (``method="fft"``);
   * with a mask: by conjugate gradients on the masked operator, preconditioned by the DCT
     solve on the mask's bounding box (exact for a box mask, a few iterations otherwise).

2. **Integer correction.** ``u`` is a smooth estimate of ``phi`` up to a constant. The constant
   is first aligned on the unit circle (``c = angle(sum_mask exp(i(psi - u)))``), then
   ``k = round((u + c - psi) / 2pi)`` and the result is ``psi + 2pi k``: an exact integer unwrap
   of the measured phase (noise and all). Finally one global multiple of 2pi is chosen so that
   the mean inside the mask is closest to ``reference`` (default 0).

Conventions: volumes ``(..., X, Y, Z)`` indexed as nibabel returns them, phase in radians,
``voxel_size_mm`` in mm (the Laplacian is scaled by ``1/h^2`` per axis, consistent with
:mod:`qsmnet.physics.operators`: ``div = -grad^T``). Everything runs on the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import scipy.fft
import torch
import torch.nn.functional as F

from qsmnet.physics.geometry import as_voxel_size_mm
from qsmnet.physics.kernels import laplacian_eigenvalues
from qsmnet.physics.operators import divergence, gradient
from qsmnet.physics.units import wrap_phase
from qsmnet.transforms._grid import mask_bbox
from qsmnet.transforms.base import OptionalKeysTransform

_DIMS = (-3, -2, -1)
TWO_PI = 2.0 * math.pi
#: Use scipy's (pocketfft) DCT for CPU tensors; the torch path is used on other devices.
_SCIPY_DCT_ON_CPU = True

__all__ = ["LaplacianUnwrap", "dct_poisson_solve", "integer_unwrap_correction",
           "unwrap_laplacian", "wrapped_laplacian"]


# --------------------------------------------------------------------------------------------
# DCT-II / inverse along one axis (Makhoul's N-point real FFT algorithm), and the Neumann
# Poisson solve they diagonalise.
# --------------------------------------------------------------------------------------------

def _dct_ii(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Unnormalised DCT-II along ``dim`` (``scipy.fft.dct(x, type=2)``), via one rfft of size N."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spec = torch.fft.rfft(v, dim=-1)
    full = torch.cat([spec, spec[..., 1:(n - 1) // 2 + 1].flip(-1).conj()], dim=-1)
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    tw = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    return (2.0 * (full * tw).real).movedim(-1, dim)


def _idct_ii(y: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`_dct_ii` along ``dim`` (``scipy.fft.idct(y, type=2)``)."""
    y = y.movedim(dim, -1)
    n = y.shape[-1]
    m = n // 2 + 1
    yk = y[..., :m]
    # y_{n-k} for k = 0..m-1, with y_n := 0.
    ynk = torch.cat([torch.zeros_like(y[..., :1]), y[..., n - m + 1:].flip(-1)], dim=-1)
    k = torch.arange(m, device=y.device, dtype=y.dtype)
    tw = torch.polar(torch.full_like(k, 0.5), math.pi * k / (2 * n))
    v = torch.fft.irfft(torch.complex(yk, -ynk) * tw, n=n, dim=-1)
    h = (n + 1) // 2
    x = torch.empty_like(v)
    x[..., ::2] = v[..., :h]
    x[..., 1::2] = v[..., h:].flip(-1)
    return x.movedim(-1, dim)


def _neumann_eigenvalues(shape: Sequence[int], voxel_size: Sequence[float], dtype, device):
    """Eigenvalues (<= 0, 0 at DC) of the 7-point Laplacian with Neumann (mirror) borders in the
    DCT-II basis: ``-sum_i (2 - 2 cos(pi k_i / N_i)) / h_i^2``."""
    out = None
    for axis, (n, h) in enumerate(zip(shape, voxel_size)):
        k = torch.arange(int(n), dtype=torch.float64, device=device)
        lam = -(2.0 - 2.0 * torch.cos(math.pi * k / int(n))) / (h * h)
        view = [1, 1, 1]
        view[axis] = -1
        lam = lam.reshape(view)
        out = lam if out is None else out + lam
    return out.to(dtype)


def _dctn(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """3-D DCT-II (or its inverse) over the last three axes.

    On the CPU this calls ``scipy.fft.dctn`` (pocketfft, multi-threaded, no gradient); on other
    devices it runs the torch implementation above, axis by axis.
    """
    if x.device.type == "cpu" and _SCIPY_DCT_ON_CPU:
        arr = x.detach().numpy()
        fn = scipy.fft.idctn if inverse else scipy.fft.dctn
        out = fn(arr, type=2, axes=(-3, -2, -1), workers=max(torch.get_num_threads(), 1))
        return torch.from_numpy(out).to(x.dtype)
    f = _idct_ii if inverse else _dct_ii
    for d in _DIMS:
        x = f(x, d)
    return x


def _inverse_eigenvalues(lam: torch.Tensor) -> torch.Tensor:
    safe = torch.where(lam == 0, torch.ones_like(lam), lam)
    return torch.where(lam == 0, torch.zeros_like(lam), 1.0 / safe)


def dct_poisson_solve(rhs: torch.Tensor, voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                      eigenvalues: torch.Tensor | None = None,
                      inverse_eigenvalues: torch.Tensor | None = None) -> torch.Tensor:
    """Solve ``laplacian(u) = rhs`` with Neumann (mirror-symmetric) borders on the array.

    Parameters
    ----------
    rhs : (..., X, Y, Z) real tensor
        Right-hand side (units of u per mm^2). Its mean is ignored (the Neumann Laplacian has
        the constants as null space).
    voxel_size_mm : (3,)
        Voxel size in mm.
    eigenvalues, inverse_eigenvalues : (X, Y, Z) tensor, optional
        Precomputed Neumann eigenvalues or their inverses (0 at DC), for repeated solves.

    Returns
    -------
    (..., X, Y, Z) tensor: the zero-mean solution ``u`` (exact, up to round-off, for the 7-point
    stencil with ``1/h^2`` weights and no flux across the array border).
    """
    if inverse_eigenvalues is None:
        if eigenvalues is None:
            eigenvalues = _neumann_eigenvalues(rhs.shape[-3:], as_voxel_size_mm(voxel_size_mm),
                                               rhs.dtype, rhs.device)
        inverse_eigenvalues = _inverse_eigenvalues(eigenvalues)
    c = _dctn(rhs)
    c.mul_(inverse_eigenvalues)
    return _dctn(c, inverse=True)


def _fft_poisson_solve(rhs: torch.Tensor, voxel_size: Sequence[float]) -> torch.Tensor:
    """Periodic solve of ``laplacian(u) = rhs`` (eigenvalues from qsmnet.physics.kernels)."""
    shape = rhs.shape[-3:]
    lam = laplacian_eigenvalues(shape, voxel_size, half=True, dtype=rhs.dtype, device=rhs.device)
    inv = _inverse_eigenvalues(lam)
    spec = torch.fft.rfftn(rhs, dim=_DIMS)
    return torch.fft.irfftn(spec * inv, s=shape, dim=_DIMS)


# --------------------------------------------------------------------------------------------
# Wrapped-difference Laplacian
# --------------------------------------------------------------------------------------------

class _GraphLaplacian:
    """The 7-point Laplacian restricted to a region: edges (i, i+1) along each axis carry weight
    ``1/h^2`` when both voxels are in the mask (all voxels without a mask), none across the
    array border (Neumann). ``apply(u)`` is ``div(w grad u)`` (negative semi-definite);
    ``apply(u, wrap=True)`` uses wrapped differences (the Laplacian of the unwrapped phase).
    Implemented with slices (no periodic copies), so each axis costs a few passes over memory.
    """

    def __init__(self, mask: torch.Tensor | None, shape: Sequence[int], vs: Sequence[float],
                 dtype: torch.dtype, device) -> None:
        self.weights = []
        for axis, h in zip(_DIMS, vs):
            n = shape[axis]
            if mask is None:
                wa = 1.0 / (h * h)
            else:
                m = mask.to(dtype)
                wa = m.narrow(axis, 0, n - 1) * m.narrow(axis, 1, n - 1) * (1.0 / (h * h))
            self.weights.append(wa)

    def apply(self, u: torch.Tensor, wrap: bool = False) -> torch.Tensor:
        out = torch.zeros_like(u)
        for axis, wa in zip(_DIMS, self.weights):
            n = u.shape[axis]
            if n < 2:
                continue
            d = u.narrow(axis, 1, n - 1) - u.narrow(axis, 0, n - 1)
            if wrap:
                d = wrap_phase(d)
            d = d.mul_(wa) if isinstance(wa, torch.Tensor) else d.mul_(float(wa))
            out.narrow(axis, 0, n - 1).add_(d)
            out.narrow(axis, 1, n - 1).sub_(d)
        return out


def wrapped_laplacian(phase_rad: torch.Tensor, voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                      mask: torch.Tensor | None = None, periodic: bool = False) -> torch.Tensor:
    """Laplacian of the unwrapped phase computed from wrapped neighbour differences.

    Parameters
    ----------
    phase_rad : (..., X, Y, Z) tensor
        Wrapped phase in radians.
    voxel_size_mm : (3,)
        Voxel size in mm; the result is in rad/mm^2.
    mask : (..., X, Y, Z) bool tensor, optional
        Region; edges leaving it carry no gradient (Neumann on the mask boundary).
    periodic : bool
        Periodic array borders: ``divergence(wrap(gradient))`` with the operators of
        :mod:`qsmnet.physics.operators` (so that for phase without wraps it equals
        :func:`qsmnet.physics.operators.laplacian`). Otherwise Neumann (no gradient across
        the array border).

    Returns
    -------
    (..., X, Y, Z) tensor, rad/mm^2. Exact (equal to the Laplacian of the true phase) wherever
    every neighbour difference of the true phase is smaller than pi.
    """
    vs = as_voxel_size_mm(voxel_size_mm)
    if periodic:
        g = wrap_phase(gradient(phase_rad, (1.0, 1.0, 1.0)))
        if mask is not None:
            m = mask.to(g.dtype)
            g = g * torch.stack([m * torch.roll(m, -1, dims=d) for d in _DIMS], dim=-4)
        h = torch.tensor(vs, dtype=g.dtype, device=g.device).reshape(3, 1, 1, 1)
        return divergence(g / h, vs)
    return _GraphLaplacian(mask, phase_rad.shape, vs, phase_rad.dtype,
                           phase_rad.device).apply(phase_rad, wrap=True)


# --------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------

def _masked_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=_DIMS, keepdim=True)


def _pcg_masked_poisson(b: torch.Tensor, lap: _GraphLaplacian, inv_lam: torch.Tensor,
                        max_iter: int, tol: float) -> torch.Tensor:
    """Solve ``-lap(u) = b`` (the region's graph Laplacian) by CG preconditioned with the DCT
    (Neumann box) solve.

    The operator is symmetric positive semi-definite with the constants of each connected
    component in its null space; ``b`` is a divergence, so it sums to zero on every component
    and the system is consistent. Only voxels of the region are meaningful in the result.
    Stops when the preconditioned residual norm falls by ``tol`` (per sample) or after
    ``max_iter`` iterations.
    """
    def prec(r):
        return dct_poisson_solve(r, inverse_eigenvalues=inv_lam).neg_()

    u = prec(b)
    r = b + lap.apply(u)
    z = prec(r)
    p = z
    rz = _masked_sum(r * z)
    rz0 = rz.clamp_min(torch.finfo(b.dtype).tiny)
    for _ in range(max_iter):
        if bool(torch.all(rz <= (tol * tol) * rz0)):
            break
        ap = lap.apply(p).neg_()
        pap = _masked_sum(p * ap)
        ok = pap > 0
        alpha = torch.where(ok, rz / torch.where(ok, pap, torch.ones_like(pap)),
                            torch.zeros_like(pap))
        u = u.add_(alpha * p)
        r = r.sub_(alpha * ap)
        z = prec(r)
        rz_new = _masked_sum(r * z)
        ok = rz > 0
        beta = torch.where(ok, rz_new / torch.where(ok, rz, torch.ones_like(rz)),
                           torch.zeros_like(rz))
        p = z.add_(beta * p)
        rz = rz_new
    return u


def _fast_pad(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad the last three axes at the end to FFT-friendly (5-smooth, even) lengths."""
    shape = x.shape[-3:]
    target = [scipy.fft.next_fast_len(int(n), real=True) for n in shape]
    target = [t + (t % 2) if t > 2 else t for t in target]
    pads = [t - n for t, n in zip(target, shape)]
    if any(pads):
        x = F.pad(x, [0, pads[2], 0, pads[1], 0, pads[0]])
    return x, tuple(int(n) for n in shape)


def integer_unwrap_correction(phase_rad: torch.Tensor, smooth_rad: torch.Tensor,
                              mask: torch.Tensor | None = None,
                              reference_rad: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Turn a smooth unwrapped estimate into an exact integer unwrap of the measured phase.

    Parameters
    ----------
    phase_rad : (..., X, Y, Z)
        Wrapped (measured) phase, rad.
    smooth_rad : (..., X, Y, Z)
        Estimate of the unwrapped phase up to an arbitrary constant (e.g. a Laplacian solve).
    mask : (..., X, Y, Z) bool, optional
        Region used to align constants; outside it ``phase_rad`` is returned unchanged.
    reference_rad : float or (..., X, Y, Z) tensor
        The global multiple of 2pi is chosen so the mean of ``result - reference_rad`` inside
        the mask lies in [-pi, pi).

    Returns
    -------
    (..., X, Y, Z): ``phase_rad + 2 pi k`` with integer ``k``.
    """
    m = (torch.ones_like(phase_rad) if mask is None
         else mask.to(phase_rad.dtype).expand_as(phase_rad))
    n = _masked_sum(m).clamp_min(1.0)
    d = phase_rad - smooth_rad
    # Align the arbitrary constant of the smooth estimate on the unit circle, so that rounding
    # happens as far as possible from the +-pi decision boundaries.
    c = torch.atan2(_masked_sum(torch.sin(d) * m), _masked_sum(torch.cos(d) * m))
    k = torch.round((smooth_rad + c - phase_rad) / TWO_PI)
    out = phase_rad + TWO_PI * k
    shift = torch.round(_masked_sum((out - reference_rad) * m) / n / TWO_PI)
    out = out - TWO_PI * shift
    if mask is not None:
        out = torch.where(m > 0, out, phase_rad)
    return out


def unwrap_laplacian(phase_rad: torch.Tensor, mask: torch.Tensor | None = None,
                     voxel_size_mm: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
                     method: str = "dct", integer_correction: bool = True,
                     reference_rad: torch.Tensor | float = 0.0, max_iter: int = 10,
                     tol: float = 1e-3) -> torch.Tensor:
    """Laplacian phase unwrapping (wrapped-difference form) with integer-2pi correction.

    Parameters
    ----------
    phase_rad : (..., X, Y, Z) real tensor
        Wrapped phase in radians (any range; only differences modulo 2pi are used).
    mask : (..., X, Y, Z) bool tensor, optional
        Region to unwrap. Voxels outside are ignored (no gradient crosses the mask boundary)
        and returned unchanged. Disconnected components are unwrapped independently (each
        keeps its own 2pi offset).
    voxel_size_mm : (3,)
        Voxel size in mm (anisotropic voxels are weighted ``1/h^2``).
    method : {"dct", "fft"}
        "dct": Neumann borders (mirror-symmetric extension, no wrap-around artefacts);
        "fft": periodic borders (only without a mask).
    integer_correction : bool
        Return ``phase + 2 pi k`` (exact integer unwrap). Otherwise return the smooth Laplacian
        solution, its constant aligned to the wrapped phase.
    reference_rad : float or (..., X, Y, Z) tensor
        The global 2pi multiple is chosen so that the mask mean of ``result - reference_rad``
        lies in [-pi, pi) (default: mean phase in the mask closest to 0).
    max_iter, tol : int, float
        Preconditioned conjugate gradient iterations / relative tolerance (preconditioned
        residual norm) for the masked solve.

    Returns
    -------
    (..., X, Y, Z) tensor, unwrapped phase in radians, same dtype and device.

    Notes
    -----
    Without a mask, or with a mask that fills its bounding box, the DCT solve is exact for any
    phase whose neighbour differences stay below pi, so the integer correction recovers the
    true phase up to one global multiple of 2pi. With a general mask, CG only needs the error
    well below pi for the rounding to be exact (2-3 iterations on brain masks; ``tol`` stops
    earlier). Where the *true* phase jumps by more than pi between neighbours (aliasing, e.g.
    next to air at 1 mm) no spatial unwrapper can know the count; those voxels may be off by
    2pi. The masked solve runs on the mask's bounding box. CPU tensors use scipy's DCT (no
    autograd; the integer correction has no useful gradient anyway), other devices a torch DCT.
    """
    if phase_rad.ndim < 3:
        raise ValueError(f"phase_rad must be (..., X, Y, Z), got shape {tuple(phase_rad.shape)}")
    if method not in ("dct", "fft"):
        raise ValueError(f"method must be 'dct' or 'fft', got {method!r}")
    vs = as_voxel_size_mm(voxel_size_mm)
    dtype = phase_rad.dtype if phase_rad.dtype in (torch.float32, torch.float64) else torch.float32
    psi = phase_rad.to(dtype)
    if mask is not None:
        mask = mask.to(device=psi.device, dtype=torch.bool)
        if mask.shape[-3:] != psi.shape[-3:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match phase "
                             f"{tuple(psi.shape)}")
        mask = mask.expand(psi.shape) if mask.shape != psi.shape else mask
        if not bool(mask.any()):
            return psi.clone()
        if bool(mask.all()):
            mask = None

    if method == "fft":
        if mask is not None:
            raise ValueError("method='fft' (periodic) does not support a mask; use 'dct'")
        smooth = _fft_poisson_solve(wrapped_laplacian(psi, vs, periodic=True), vs)
        return _finish(psi, smooth, None, reference_rad, integer_correction)
    if mask is None:
        smooth = dct_poisson_solve(wrapped_laplacian(psi, vs), vs)
        return _finish(psi, smooth, None, reference_rad, integer_correction)
    # Masked: solve (and correct) on the mask's bounding box only.
    return _unwrap_masked(psi, mask, vs, reference_rad, integer_correction, max_iter, tol)


def _unwrap_masked(psi: torch.Tensor, mask: torch.Tensor, vs, reference_rad,
                   integer_correction: bool, max_iter: int, tol: float) -> torch.Tensor:
    """:func:`unwrap_laplacian` with a (non-empty, not full) mask: the masked Poisson solve and
    the correction on the mask's bounding box; outside the mask the input is kept."""
    dtype = psi.dtype
    # (unwrap_laplacian returns early on an empty mask; its box would be the whole grid)
    box = mask_bbox(mask) or tuple(slice(0, n) for n in mask.shape[-3:])
    sl = (Ellipsis, *box)
    psi_c = psi[sl]
    m_c = mask[sl]
    ref_c = reference_rad
    if isinstance(reference_rad, torch.Tensor) and reference_rad.ndim >= 3:
        ref_c = reference_rad.to(device=psi.device, dtype=dtype)[sl]
    psi_p, _ = _fast_pad(psi_c)
    m_p, _ = _fast_pad(m_c.to(dtype))
    lap = _GraphLaplacian(m_p, psi_p.shape, vs, dtype, psi.device)
    b = lap.apply(psi_p, wrap=True).neg_()
    inv_lam = _inverse_eigenvalues(_neumann_eigenvalues(psi_p.shape[-3:], vs, dtype, psi.device))
    u = _pcg_masked_poisson(b, lap, inv_lam, max_iter, tol)
    u = u[..., :psi_c.shape[-3], :psi_c.shape[-2], :psi_c.shape[-1]]
    out = psi.clone()
    out[sl] = _finish(psi_c, u, m_c, ref_c, integer_correction)
    return out


def _finish(psi: torch.Tensor, smooth: torch.Tensor, mask: torch.Tensor | None,
            reference_rad, integer_correction: bool) -> torch.Tensor:
    """Integer correction, or the smooth solution with its constant aligned to the data."""
    if integer_correction:
        return integer_unwrap_correction(psi, smooth, mask, reference_rad)
    m = torch.ones_like(psi) if mask is None else mask.to(psi.dtype)
    d = psi - smooth
    c = torch.atan2(_masked_sum(torch.sin(d) * m), _masked_sum(torch.cos(d) * m))
    out = smooth + c
    n = _masked_sum(m).clamp_min(1.0)
    out = out - TWO_PI * torch.round(_masked_sum((out - reference_rad) * m) / n / TWO_PI)
    return out if mask is None else torch.where(mask, out, psi)


class LaplacianUnwrap(OptionalKeysTransform):
    """Spatial phase unwrapping transform (see :func:`unwrap_laplacian`).

    Parameters
    ----------
    method : {"dct", "fft"}
        Neumann (mirror) or periodic array borders.
    integer_correction : bool
        Exact integer-2pi unwrap of the input (default) or the smooth Laplacian solution.
    max_iter, tol : masked-solve CG settings.

    Call
    ----
    ``LaplacianUnwrap()(phase_rad, mask=None, voxel_size_mm=(1, 1, 1))`` with
    ``phase_rad (..., X, Y, Z)`` (any leading dims, e.g. echoes or a batch) returns the
    unwrapped phase in rad, same shape. Sample dict: ``phase``, ``voxel_size_mm``, ``mask``
    (optional) -> ``phase``.
    """

    input_keys = {"phase_rad": "phase", "voxel_size_mm": "voxel_size_mm"}
    optional_input_keys = {"mask": "mask"}
    output_keys = ("phase",)

    def __init__(self, method: str = "dct", integer_correction: bool = True, max_iter: int = 10,
                 tol: float = 1e-3) -> None:
        if method not in ("dct", "fft"):
            raise ValueError(f"method must be 'dct' or 'fft', got {method!r}")
        self.method = method
        self.integer_correction = integer_correction
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    def __call__(self, phase_rad: torch.Tensor, mask: torch.Tensor | None = None,
                 voxel_size_mm: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0)) -> torch.Tensor:
        return unwrap_laplacian(phase_rad, mask, voxel_size_mm, method=self.method,
                                integer_correction=self.integer_correction,
                                max_iter=self.max_iter, tol=self.tol)

    def __repr__(self) -> str:
        return (f"LaplacianUnwrap(method={self.method!r}, "
                f"integer_correction={self.integer_correction}, max_iter={self.max_iter})")
