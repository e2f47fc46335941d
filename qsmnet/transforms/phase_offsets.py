"""Phase-offset removal for multi-echo phase (MCPC-3D-S, single-coil form).

Phase model (``docs/conventions.md``)::

    phase_e = phi0 + phase_sign * 2 pi GAMMA_BAR B0 TE_e field_ppm        (+ 2 pi k_e, + noise)

:class:`PhaseOffsetRemoval` (MCPC-3D-S, single-coil form, Eckstein et al. 2018): the phase
accrued between echoes i and j is read from their Hermitian inner product
``m_i m_j exp(i (phase_j - phase_i))`` (phi0 cancels), unwrapped spatially (Laplacian,
integer-2pi), scaled by ``TE_i / (TE_j - TE_i)`` to the phase accrued from 0 to TE_i;
``phi0 = phase_i - that`` is smoothed on the unit circle (:func:`smooth_phase_offset`: a
robust low-order polynomial trend, then a magnitude-weighted Gaussian of ``sigma_mm`` on the
residual with outliers rejected, which avoids the Gaussian's bias at the mask boundary) and
removed from every echo.

Why this rather than an echo-difference approach (field from ``phase_2 - phase_1`` over
``dTE``, or a per-voxel fit with a free intercept): phi0 is estimated once and smoothly
(coil and transmit phase vary slowly), so the per-voxel fit can go through the origin and
keeps its full precision; with a free intercept per voxel the slope variance grows by
``sum w TE^2 / sum w (TE - mean TE)^2`` (4.2x, i.e. 2x the std, for TE = 4/12/20/28 ms). It
also makes every echo's phase proportional to TE, which temporal unwrapping needs, and needs
no assumption such as ``TE_1 = dTE``.

The rest of the multi-echo chain: :mod:`qsmnet.transforms.temporal_unwrapping` (temporal
unwrapping) and :mod:`qsmnet.transforms.echo_fit` (weighted field fit). Shapes: multi-echo
volumes ``(..., E, X, Y, Z)`` (echo axis -4, any leading batch dims); ``te_s`` is ``(E,)`` or
``(B, E)`` in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qsmnet.physics.geometry import as_voxel_size_mm
from qsmnet.physics.units import wrap_phase
from qsmnet.transforms._echoes import check_te_s, echo, echo_te
from qsmnet.transforms._grid import as_float
from qsmnet.transforms.base import OptionalKeysTransform
from qsmnet.transforms.smoothing import gaussian_smooth_mm
from qsmnet.transforms.unwrap import unwrap_laplacian

__all__ = ["PhaseOffsetRemoval", "fit_phase_polynomial", "mcpc3ds_phase_offset",
           "remove_phase_offset", "smooth_phase_offset"]


# --------------------------------------------------------------------------------------------
# Smoothing on the unit circle and the robust polynomial trend
# --------------------------------------------------------------------------------------------

def _smooth_phase(phase_rad: torch.Tensor, weight: torch.Tensor, sigma_mm: float,
                  voxel_size_mm) -> torch.Tensor:
    """``angle(G * (weight exp(i phase)))``: weighted Gaussian smoothing on the unit circle."""
    c = torch.stack([weight * torch.cos(phase_rad), weight * torch.sin(phase_rad)], dim=0)
    c = gaussian_smooth_mm(c, sigma_mm, voxel_size_mm)
    return torch.atan2(c[1], c[0])


def _monomials(order: int) -> list[tuple[int, int, int]]:
    return [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i)
            for k in range(order + 1 - i - j) if 0 < i + j + k]


def _powers(x: torch.Tensor, order: int) -> list:
    """``[1, x, x^2, ..., x^order]`` by repeated multiplication (``1`` as a float)."""
    out = [1.0, x]
    for _ in range(order - 1):
        out.append(out[-1] * x)
    return out[:order + 1]


def _norm_coords(shape, vs, device, dtype=torch.float64):
    """Centred physical coordinates (mm) divided by the largest half-extent: about [-1, 1]."""
    ax = [(torch.arange(int(n), dtype=dtype, device=device) - (int(n) - 1) / 2.0) * h
          for n, h in zip(shape, vs)]
    scale = max(float(a.abs().max()) for a in ax) or 1.0
    return [a / scale for a in ax], scale


def _robust_wls(A: torch.Tensor, y: torch.Tensor, w: torch.Tensor, n_irls: int) -> torch.Tensor:
    """Weighted least squares ``A c ~ y`` (float64) with ``n_irls`` re-weightings that drop rows
    beyond 5 robust (MAD) standard deviations."""
    keep = torch.ones_like(w)
    n = A.shape[1]
    coef = torch.zeros(n, dtype=A.dtype, device=A.device)
    for _ in range(n_irls + 1):
        wk = w * keep
        ata = A.T @ (A * wk[:, None])
        atb = A.T @ (wk * y)
        ata = ata + 1e-12 * (torch.trace(ata) + 1e-30) * torch.eye(n, dtype=A.dtype,
                                                                  device=A.device)
        coef = torch.linalg.solve(ata, atb)
        res = (y - A @ coef).abs()
        sel = keep > 0
        scale = 1.4826 * float(res[sel].median()) if bool(sel.any()) else 0.0
        keep = (res <= max(5.0 * scale, 1e-9)).to(w.dtype)
    return coef


def _basis(coords: list[torch.Tensor], terms, order: int) -> torch.Tensor:
    """Columns ``x^i y^j z^k`` (one per term) at points ``coords`` (3 tensors of equal length)."""
    pw = [_powers(c, order) for c in coords]
    ones = torch.ones_like(coords[0])
    return torch.stack([(pw[0][i] if i else ones) * (pw[1][j] if j else ones)
                        * (pw[2][k] if k else ones) for (i, j, k) in terms], dim=1)


def _gradient_fit(ph64, w64, cxyz, terms, order, shape, stride, sub, n_irls, dev):
    """Step 1 of :func:`fit_phase_polynomial`: the coefficients (no constant) from the basis
    differences against the wrapped neighbour differences of the phase, on the sub-grid."""
    f64 = torch.float64
    coef = torch.zeros(len(terms), dtype=f64, device=dev)
    rows, rhs, wts = [], [], []
    for axis in range(3):
        n = shape[axis]
        if n < 2 or not terms:
            continue
        a0 = [slice(None)] * 3
        a1 = [slice(None)] * 3
        a0[axis] = slice(0, n - 1)
        a1[axis] = slice(1, n)
        ew = torch.sqrt(w64[tuple(a0)][sub] * w64[tuple(a1)][sub])
        sel = ew > 0
        if not bool(sel.any()):
            continue
        g = wrap_phase(ph64[tuple(a1)][sub] - ph64[tuple(a0)][sub])[sel]
        idx = torch.nonzero(sel)
        x0 = [c[:-1][::stride] if d == axis else c[::stride] for d, c in enumerate(cxyz)]
        x0 = [x0[d][idx[:, d]] for d in range(3)]
        x1 = list(x0)
        x1[axis] = x0[axis] + (cxyz[axis][1] - cxyz[axis][0])
        rows.append(_basis(x1, terms, order) - _basis(x0, terms, order))
        rhs.append(g)
        wts.append(ew[sel])
    if rows:
        coef = _robust_wls(torch.cat(rows), torch.cat(rhs), torch.cat(wts), n_irls)
    return coef


def _refine_on_values(ph64, w64, cxyz, terms, order, stride, sub, coef, n_irls, n_refine, dev):
    """Step 2 of :func:`fit_phase_polynomial`: Gauss-Newton steps on the wrapped residual of the
    values (constant included); returns ``(c0, coef)``."""
    f64 = torch.float64
    ws = w64[sub]
    sel = ws > 0
    c0 = 0.0
    if bool(sel.any()):
        idx = torch.nonzero(sel)
        pts = [cxyz[d][::stride][idx[:, d]] for d in range(3)]
        basis = _basis(pts, terms, order) if terms else torch.zeros(idx.shape[0], 0,
                                                                      dtype=f64, device=dev)
        design = torch.cat([torch.ones_like(pts[0])[:, None], basis], dim=1)
        vals = ph64[sub][sel]
        wv = ws[sel]
        model = basis @ coef
        d = vals - model
        c0 = float(torch.atan2((wv * torch.sin(d)).sum(), (wv * torch.cos(d)).sum()))
        for _ in range(n_refine):
            resid = wrap_phase(vals - model - c0)
            step = _robust_wls(design, resid, wv, n_irls)
            c0 += float(step[0])
            coef = coef + step[1:]
            model = basis @ coef
    return c0, coef


def _evaluate_polynomial(coef, c0, cxyz, terms, order, shape, dev) -> torch.Tensor:
    """The fitted polynomial on the full grid (float64)."""
    f64 = torch.float64
    poly = torch.full(shape, c0, dtype=f64, device=dev)
    px, py, pz = (_powers(c, order) for c in cxyz)
    for c, (i, j, k) in zip(coef.tolist(), terms):
        # Separable monomial: one full-volume pass per term.
        fx = px[i] if i else torch.ones_like(cxyz[0])
        fy = py[j] if j else torch.ones_like(cxyz[1])
        fz = pz[k] if k else torch.ones_like(cxyz[2])
        poly.add_((c * fx).reshape(-1, 1, 1) * fy.reshape(1, -1, 1) * fz.reshape(1, 1, -1))
    return poly


def fit_phase_polynomial(phase_rad: torch.Tensor, weight: torch.Tensor,
                         voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0), order: int = 2,
                         max_samples: int = 50_000, n_irls: int = 3,
                         n_refine: int = 2) -> torch.Tensor:
    """Robust weighted fit of a smooth polynomial phase to a wrapped phase map.

    The polynomial has all monomials of the centred, normalised physical coordinates up to
    ``order``. It is first fitted to the *wrapped neighbour differences* (no unwrapping needed;
    wraps cancel), then refined by ``n_refine`` Gauss-Newton steps on the wrapped residual
    ``wrap(phase - P)`` of the values themselves (statistically efficient for the low-order
    terms; the constant is fitted there). Samples: voxels with positive weight on a regular
    sub-grid of at most about ``max_samples`` voxels; every least-squares solve drops samples
    beyond 5 robust standard deviations (``n_irls`` times; wrap errors, outliers).

    Parameters
    ----------
    phase_rad : (..., X, Y, Z)
        Wrapped phase, rad.
    weight : (..., X, Y, Z)
        Non-negative weights (e.g. magnitude times mask).

    Returns
    -------
    (..., X, Y, Z): the (unwrapped) polynomial phase, rad.
    """
    vs = as_voxel_size_mm(voxel_size_mm)
    shape = phase_rad.shape[-3:]
    lead = phase_rad.shape[:-3]
    flat_p = phase_rad.reshape(-1, *shape)
    flat_w = weight.expand_as(phase_rad).reshape(-1, *shape)
    dev = phase_rad.device
    cxyz, _ = _norm_coords(shape, vs, dev)
    terms = _monomials(order)
    f64 = torch.float64
    out = []
    for ph, w in zip(flat_p, flat_w):
        ph64 = ph.to(f64)
        w64 = w.to(f64).clamp_min(0)
        n_pos = int((w64 > 0).sum())
        stride = max(1, math.ceil((n_pos / max(max_samples, 1)) ** (1.0 / 3.0)))
        sub = (slice(None, None, stride),) * 3
        # 1. Gradient fit (differences of the basis against wrapped phase differences).
        coef = _gradient_fit(ph64, w64, cxyz, terms, order, shape, stride, sub, n_irls, dev)
        # 2. Gauss-Newton refinement on the values (constant included).
        c0, coef = _refine_on_values(ph64, w64, cxyz, terms, order, stride, sub, coef, n_irls,
                                     n_refine, dev)
        out.append(_evaluate_polynomial(coef, c0, cxyz, terms, order, shape, dev)
                   .to(phase_rad.dtype))
    return torch.stack(out).reshape(*lead, *shape)


def smooth_phase_offset(raw_rad: torch.Tensor, weight: torch.Tensor, sigma_mm: float,
                        voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                        poly_order: int = 3) -> torch.Tensor:
    """Robust smoothing of a noisy, wrapped phase offset map (..., X, Y, Z).

    1. ``P``: robust polynomial trend of order ``poly_order`` (:func:`fit_phase_polynomial`;
       0 skips it). Removing it first keeps the Gaussian from biasing the offset near the mask
       boundary, where a truncated kernel shifts towards the interior (bias ``~ sigma *
       grad(phi0)``).
    2. The residual ``wrap(raw - P)`` is smoothed on the unit circle (Gaussian ``sigma_mm``,
       weights ``weight``); voxels deviating from that by more than
       ``max(5 robust std, 0.2 rad)`` (capped at pi/2; wrong 2pi counts of the inter-echo
       phase, noise spikes) get zero weight and the residual is smoothed again.

    Returns ``wrap(P + smoothed residual)``, rad.
    """
    trend = (fit_phase_polynomial(raw_rad, weight, voxel_size_mm, poly_order)
             if poly_order > 0 else torch.zeros_like(raw_rad))
    resid = wrap_phase(raw_rad - trend)
    if sigma_mm <= 0:
        return wrap_phase(trend + resid)
    first = _smooth_phase(resid, weight, sigma_mm, voxel_size_mm)
    dev = wrap_phase(resid - first).abs()
    sel = weight > 0
    lead = dev.shape[:-3]
    taus = []
    spatial = dev.shape[-3:]
    for d, m in zip(dev.reshape(-1, *spatial), sel.expand_as(dev).reshape(-1, *spatial)):
        v = d[m]
        med = float(v.median()) if v.numel() else 0.0
        taus.append(min(max(5.0 * 1.4826 * med, 0.2), math.pi / 2))
    tau = torch.tensor(taus, dtype=dev.dtype, device=dev.device).reshape(*lead, 1, 1, 1)
    robust_w = weight * (dev <= tau).to(weight.dtype)
    second = _smooth_phase(resid, robust_w, sigma_mm, voxel_size_mm)
    return wrap_phase(trend + second)


# --------------------------------------------------------------------------------------------
# Phase offset removal (MCPC-3D-S, single coil)
# --------------------------------------------------------------------------------------------

def mcpc3ds_phase_offset(phase_rad: torch.Tensor, magnitude: torch.Tensor | None, te_s,
                         mask: torch.Tensor | None = None,
                         voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                         sigma_mm: float = 4.0, echoes: tuple[int, int] = (0, 1),
                         unwrap_max_iter: int = 10, poly_order: int = 3
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate the echo-independent phase offset phi0 (MCPC-3D-S, single-coil form).

    Parameters
    ----------
    phase_rad : (..., E, X, Y, Z)
        Wrapped phase, rad, E >= 2.
    magnitude : (..., E, X, Y, Z), optional
        Magnitude (weights); ones if None.
    te_s : (E,) or (B, E)
        Echo times, s.
    mask : (..., X, Y, Z) bool, optional
        Region in which the inter-echo phase is unwrapped and phi0 is estimated.
    voxel_size_mm : (3,)
    sigma_mm : float
        Gaussian smoothing (mm) of phi0 on the unit circle; 0 disables it.
    echoes : (i, j)
        The echo pair whose Hermitian inner product gives the phase evolution.
    unwrap_max_iter : int
        CG iterations of the masked Laplacian unwrap of the inter-echo phase.
    poly_order : int
        Order of the robust polynomial trend removed before smoothing
        (:func:`smooth_phase_offset`); 0: plain Gaussian smoothing.

    Returns
    -------
    offset_rad : (..., X, Y, Z)
        Smoothed phi0 in [-pi, pi].
    evolution_rad : (..., X, Y, Z)
        Unwrapped phase accrued from 0 to ``TE_i`` (field phase of echo i), inside the mask;
        its mask mean is in ``[-pi, pi) TE_i / dTE`` (the inter-echo phase is referenced to the
        2pi multiple whose mean is closest to 0; the absolute field level is ambiguous by
        ``1 / (GAMMA_BAR B0 dTE)`` anyway).
    """
    phase_rad = as_float(phase_rad)
    te = check_te_s(te_s, phase_rad.shape[-4])
    i, j = echoes
    if i == j:
        raise ValueError(f"echoes must be two different echo indices, got {echoes}")
    first = phase_rad[..., 0, :, :, :]
    ti, tj = echo_te(te, i, first), echo_te(te, j, first)
    pi_, pj = echo(phase_rad, i), echo(phase_rad, j)
    if magnitude is None:
        mi = torch.ones_like(pi_)
    else:
        mi = as_float(magnitude).to(pi_.dtype)[..., i, :, :, :]
    dphi = wrap_phase(pj - pi_)
    dphi_u = unwrap_laplacian(dphi, mask, voxel_size_mm, max_iter=unwrap_max_iter)
    evolution = dphi_u * (ti / (tj - ti))
    raw = pi_ - evolution
    weight = mi if mask is None else mi * mask.to(mi.dtype)
    offset = smooth_phase_offset(wrap_phase(raw), weight, sigma_mm, voxel_size_mm, poly_order)
    return offset, evolution


def remove_phase_offset(phase_rad: torch.Tensor, offset_rad: torch.Tensor) -> torch.Tensor:
    """``wrap(phase_e - phi0)`` for every echo: (..., E, X, Y, Z) minus (..., X, Y, Z)."""
    return wrap_phase(phase_rad - offset_rad.unsqueeze(-4))


class PhaseOffsetRemoval(OptionalKeysTransform):
    """Remove the echo-independent phase offset phi0 (MCPC-3D-S single coil).

    Parameters
    ----------
    sigma_mm : float
        Gaussian smoothing of phi0 on the unit circle, mm.
    echoes : (i, j)
        Echo pair for the Hermitian inner product (default the first two).
    poly_order : int
        Robust polynomial trend removed before smoothing (0: plain Gaussian smoothing).
    unwrap_max_iter : int
        CG iterations of the masked Laplacian unwrap of the inter-echo phase.

    Call
    ----
    ``(phase_rad (..., E, X, Y, Z), magnitude, te_s, mask=None, voxel_size_mm)`` ->
    ``(phase_rad, offset_rad)``: the wrapped phase with phi0 removed, and phi0 (..., X, Y, Z).
    With one echo phi0 cannot be separated from the field: it is taken as 0.
    Sample dict: ``phase, te_s, voxel_size_mm``, ``magnitude, mask`` (optional) ->
    ``phase, phase_offset_rad``.
    """

    input_keys = {"phase_rad": "phase", "te_s": "te_s", "voxel_size_mm": "voxel_size_mm"}
    optional_input_keys = {"magnitude": "magnitude", "mask": "mask"}
    output_keys = ("phase", "phase_offset_rad")

    def __init__(self, sigma_mm: float = 4.0, echoes: Sequence[int] = (0, 1),
                 poly_order: int = 3, unwrap_max_iter: int = 10) -> None:
        if sigma_mm < 0:
            raise ValueError(f"sigma_mm must be >= 0, got {sigma_mm}")
        if poly_order < 0:
            raise ValueError(f"poly_order must be >= 0, got {poly_order}")
        self.sigma_mm = float(sigma_mm)
        self.echoes = tuple(int(e) for e in echoes)
        self.poly_order = int(poly_order)
        self.unwrap_max_iter = int(unwrap_max_iter)

    def __call__(self, phase_rad: torch.Tensor, magnitude: torch.Tensor | None = None,
                 te_s=None, mask: torch.Tensor | None = None,
                 voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0)
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        phase_rad = as_float(phase_rad)
        if phase_rad.ndim < 4:
            raise ValueError(f"phase_rad must be (..., E, X, Y, Z), got {tuple(phase_rad.shape)}")
        if te_s is None:
            raise ValueError("te_s (echo times in seconds) is required")
        check_te_s(te_s, phase_rad.shape[-4])
        if phase_rad.shape[-4] < 2:
            return wrap_phase(phase_rad), torch.zeros_like(phase_rad[..., 0, :, :, :])
        offset, _ = mcpc3ds_phase_offset(phase_rad, magnitude, te_s, mask, voxel_size_mm,
                                         self.sigma_mm, self.echoes, self.unwrap_max_iter,
                                         self.poly_order)
        return remove_phase_offset(phase_rad, offset), offset

    def __repr__(self) -> str:
        return (f"PhaseOffsetRemoval(sigma_mm={self.sigma_mm}, echoes={self.echoes}, "
                f"poly_order={self.poly_order})")
