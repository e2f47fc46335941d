"""Multi-echo phase processing: phase-offset removal, temporal unwrapping, weighted field fit.

Phase model (``shared/qsm-conventions.md``)::

    phase_e = phi0 + phase_sign * 2 pi GAMMA_BAR B0 TE_e field_ppm        (+ 2 pi k_e, + noise)

Steps, each a function and a transform:

* :class:`PhaseOffsetRemoval` (MCPC-3D-S, single-coil form, Eckstein et al. 2018): the phase
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
* :func:`temporal_unwrap` / :class:`TemporalUnwrap`: every other echo is unwrapped against a
  prediction from the spatially unwrapped reference echo,
  ``phase_e - 2 pi round((phase_e - pred_e) / 2 pi)``, with ``pred_e = phase_ref TE_e / TE_ref``
  (``progressive=False``, ROMEO's rule) or, by default, ``pred_e = slope TE_e`` from the
  weighted fit of the echoes unwrapped so far (walking outwards from the reference), which
  averages the reference's noise down before it is multiplied by ``TE_e / TE_ref``.
* :func:`fit_field_wls` / :class:`MultiEchoFit`: weighted least squares of the unwrapped phase
  against TE through the origin (offset already removed), per voxel:
  ``slope = sum w TE phase / sum w TE^2`` (rad/s), converted with
  :func:`qsmnet.physics.units.phase_to_ppm`. Default weights ``w = magnitude^2``: the phase
  noise of echo e is ``sigma / magnitude_e`` (high SNR), so ``magnitude^2`` are the inverse
  variances and the fit is the minimum-variance linear estimator; it equals the "phase_var"
  weighted average of ``phase_e / TE_e`` with weights ``m^2 TE^2`` (MriResearchTools,
  QSM.rs). The noise map is the propagated standard deviation of the field,
  ``sigma_n sqrt(sum w^2 TE^2 / m^2) / sum w TE^2`` (for ``w = m^2``:
  ``sigma_n / sqrt(sum m^2 TE^2)``), in ppm, with the complex noise ``sigma_n`` given or
  estimated robustly from the fit residuals (median of ``sum m^2 r^2`` over the mask against
  the chi-square median with E-1 degrees of freedom), or, for one echo, from the Rayleigh
  background outside the mask.

Shapes: multi-echo volumes ``(..., E, X, Y, Z)`` (echo axis -4, any leading batch dims);
``te_s`` is ``(E,)`` or ``(B, E)`` in seconds; ``b0_t`` in tesla (float or ``(B,)``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import scipy.fft
import scipy.stats
import torch
import torch.nn.functional as F

from qsmnet.physics.units import phase_to_ppm, wrap_phase
from qsmnet.transforms.unwrap import _OptionalKeysTransform, unwrap_laplacian

log = logging.getLogger(__name__)

_DIMS = (-3, -2, -1)
TWO_PI = 2.0 * math.pi

__all__ = [
    "MultiEchoFit", "PhaseOffsetRemoval", "TemporalUnwrap", "check_te_s", "estimate_noise_std",
    "fit_field_wls", "fit_phase_polynomial", "gaussian_smooth_mm", "mcpc3ds_phase_offset",
    "remove_phase_offset", "smooth_phase_offset", "temporal_unwrap",
]


# --------------------------------------------------------------------------------------------
# Argument helpers
# --------------------------------------------------------------------------------------------

def check_te_s(te_s, n_echoes: int | None = None) -> torch.Tensor:
    """Validate echo times in seconds and return them as a float64 tensor ``(E,)`` or ``(B, E)``.

    Raises
    ------
    ValueError
        If a TE is not positive and finite, looks like milliseconds (>= 1 s: no gradient-echo
        TE is that long), the echo times are not distinct, or their number does not match
        ``n_echoes``.
    """
    te = torch.as_tensor(te_s, dtype=torch.float64).detach().cpu()
    if te.ndim == 0:
        te = te.reshape(1)
    if te.ndim > 2:
        raise ValueError(f"te_s must be (E,) or (B, E), got shape {tuple(te.shape)}")
    if not bool(torch.all(torch.isfinite(te))) or bool(torch.any(te <= 0)):
        raise ValueError(f"te_s must be positive and finite (seconds), got {te.tolist()}")
    if bool(torch.any(te >= 1.0)):
        raise ValueError(f"te_s must be in seconds, got {te.tolist()}: echo times of 1 s or more "
                         "look like milliseconds (divide by 1000)")
    if n_echoes is not None and te.shape[-1] != n_echoes:
        raise ValueError(f"te_s has {te.shape[-1]} echo times but the data has {n_echoes} echoes")
    srt = torch.sort(te, dim=-1).values
    if te.shape[-1] > 1 and bool(torch.any(srt[..., 1:] - srt[..., :-1] <= 0)):
        raise ValueError(f"echo times must be distinct, got {te.tolist()}")
    return te


def _te_view(te: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(E,)`` -> ``(E, 1, 1, 1)``; ``(B, E)`` -> ``(B, [1...], E, 1, 1, 1)`` on ``like``."""
    te = te.to(dtype=like.dtype, device=like.device)
    if te.ndim == 1:
        return te.reshape(-1, 1, 1, 1)
    extra = like.ndim - 4 - 1
    return te.reshape(te.shape[0], *([1] * max(extra, 0)), te.shape[1], 1, 1, 1)


def _echo(x: torch.Tensor, idx: int) -> torch.Tensor:
    return x[..., idx, :, :, :]


def _echo_te(te: torch.Tensor, idx: int, like: torch.Tensor) -> torch.Tensor | float:
    """TE of echo ``idx`` broadcastable against a single-echo volume ``like`` (..., X, Y, Z)."""
    if te.ndim == 1:
        return float(te[idx])
    t = te[:, idx].to(dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _b0_view(b0_t, like: torch.Tensor):
    b0 = torch.as_tensor(b0_t, dtype=torch.float64)
    if b0.ndim == 0:
        return float(b0)
    return b0.to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))


def _voxel_size(voxel_size_mm) -> tuple[float, float, float]:
    vs = torch.as_tensor(voxel_size_mm, dtype=torch.float64).reshape(-1)
    if vs.numel() != 3 or bool(torch.any(vs <= 0)):
        raise ValueError(f"voxel_size_mm must be 3 positive values, got {voxel_size_mm!r}")
    return tuple(float(v) for v in vs)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


# --------------------------------------------------------------------------------------------
# Smoothing on the unit circle
# --------------------------------------------------------------------------------------------

def gaussian_smooth_mm(x: torch.Tensor, sigma_mm: float,
                       voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Gaussian smoothing of ``x`` (..., X, Y, Z) with ``sigma_mm`` (mm) on an anisotropic grid.

    Computed by FFT (the Gaussian's exact spectrum) on a grid zero-padded by at least
    ``3 sigma`` per side (no wrap-around; outside the array counts as 0, so divide by the
    smoothed support for a normalised convolution). Real or
    complex input; the result has the input's shape, dtype and device.
    """
    if sigma_mm <= 0:
        return x
    vs = _voxel_size(voxel_size_mm)
    sig_vox = [sigma_mm / h for h in vs]
    pads = [int(math.ceil(3.0 * s)) for s in sig_vox]
    # Before: 3 sigma; after: 3 sigma plus whatever reaches an FFT-friendly (5-smooth) length.
    after = [scipy.fft.next_fast_len(int(n) + 2 * p, real=True) - int(n) - p
             for n, p in zip(x.shape[-3:], pads)]
    spec = [pads[2], after[2], pads[1], after[1], pads[0], after[0]]
    xp = F.pad(x, spec) if not x.is_complex() \
        else torch.complex(F.pad(x.real, spec), F.pad(x.imag, spec))
    shape = xp.shape[-3:]
    real_dtype = x.real.dtype if x.is_complex() else x.dtype
    g = None
    for axis, (n, s) in enumerate(zip(shape, sig_vox)):
        last = axis == 2 and not x.is_complex()
        f = (torch.fft.rfftfreq if last else torch.fft.fftfreq)(
            int(n), dtype=torch.float64, device=x.device)
        v = [1, 1, 1]
        v[axis] = -1
        gi = torch.exp(-2.0 * (math.pi * s * f) ** 2).reshape(v)
        g = gi if g is None else g * gi
    g = g.to(real_dtype)
    if x.is_complex():
        out = torch.fft.ifftn(torch.fft.fftn(xp, dim=_DIMS) * g, dim=_DIMS)
    else:
        out = torch.fft.irfftn(torch.fft.rfftn(xp, dim=_DIMS) * g, s=shape, dim=_DIMS)
    return out[..., pads[0]:pads[0] + x.shape[-3], pads[1]:pads[1] + x.shape[-2],
               pads[2]:pads[2] + x.shape[-1]]


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
    vs = _voxel_size(voxel_size_mm)
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
        coef = torch.zeros(len(terms), dtype=f64, device=dev)
        # 1. Gradient fit (differences of the basis against wrapped phase differences).
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
        # 2. Gauss-Newton refinement on the values (constant included).
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
        poly = torch.full(shape, c0, dtype=f64, device=dev)
        px, py, pz = (_powers(c, order) for c in cxyz)
        for c, (i, j, k) in zip(coef.tolist(), terms):
            # Separable monomial: one full-volume pass per term.
            fx = px[i] if i else torch.ones_like(cxyz[0])
            fy = py[j] if j else torch.ones_like(cxyz[1])
            fz = pz[k] if k else torch.ones_like(cxyz[2])
            poly.add_((c * fx).reshape(-1, 1, 1) * fy.reshape(1, -1, 1) * fz.reshape(1, 1, -1))
        out.append(poly.to(phase_rad.dtype))
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
    phase_rad = _float(phase_rad)
    te = check_te_s(te_s, phase_rad.shape[-4])
    i, j = echoes
    if i == j:
        raise ValueError(f"echoes must be two different echo indices, got {echoes}")
    first = phase_rad[..., 0, :, :, :]
    ti, tj = _echo_te(te, i, first), _echo_te(te, j, first)
    pi_, pj = _echo(phase_rad, i), _echo(phase_rad, j)
    if magnitude is None:
        mi = torch.ones_like(pi_)
    else:
        mi = _float(magnitude).to(pi_.dtype)[..., i, :, :, :]
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


class PhaseOffsetRemoval(_OptionalKeysTransform):
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
        phase_rad = _float(phase_rad)
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


# --------------------------------------------------------------------------------------------
# Temporal unwrapping
# --------------------------------------------------------------------------------------------

def _weights(magnitude: torch.Tensor | None, like: torch.Tensor, weighting: str) -> torch.Tensor:
    if weighting not in ("magnitude2", "magnitude", "uniform"):
        raise ValueError(f"weighting must be 'magnitude2', 'magnitude' or 'uniform', "
                         f"got {weighting!r}")
    if magnitude is None or weighting == "uniform":
        return torch.ones_like(like)
    m = _float(magnitude).to(device=like.device, dtype=like.dtype)
    if m.shape != like.shape:
        m = m.expand_as(like)
    return m * m if weighting == "magnitude2" else m.abs()


def temporal_unwrap(phase_rad: torch.Tensor, te_s, reference_rad: torch.Tensor,
                    ref_index: int = 0, magnitude: torch.Tensor | None = None,
                    progressive: bool = True, weighting: str = "magnitude2") -> torch.Tensor:
    """Unwrap echoes in time against a spatially unwrapped reference echo.

    Parameters
    ----------
    phase_rad : (..., E, X, Y, Z)
        Wrapped phase (offset removed, so that phase is proportional to TE), rad.
    te_s : (E,) or (B, E)
        Echo times, s.
    reference_rad : (..., X, Y, Z)
        The unwrapped phase of echo ``ref_index``.
    ref_index : int
        Reference echo.
    magnitude : (..., E, X, Y, Z), optional
        Weights for the running fit (``progressive``).
    progressive : bool
        Predict echo e from the weighted fit (through the origin) of all echoes unwrapped so
        far, walking outwards from the reference in order of ``|TE_e - TE_ref|``. Otherwise
        ``pred_e = reference TE_e / TE_ref``.

    Returns
    -------
    (..., E, X, Y, Z): ``phase_e - 2 pi round((phase_e - pred_e) / 2 pi)``; echo ``ref_index``
    is ``reference_rad``.
    """
    phase_rad = _float(phase_rad)
    n_echo = phase_rad.shape[-4]
    te = check_te_s(te_s, n_echo)
    te_v = _te_view(te, phase_rad)
    ref = reference_rad.to(phase_rad.dtype)
    w_all = _weights(magnitude, phase_rad, weighting)
    te_ref = _echo(te_v, ref_index) if te.ndim == 2 else float(te[ref_index])
    out = [None] * n_echo
    out[ref_index] = ref
    te0 = te if te.ndim == 1 else te[0]
    order = sorted(range(n_echo), key=lambda e: abs(float(te0[e]) - float(te0[ref_index])))
    te_c = lambda e: _echo(te_v, e)  # noqa: E731 - (..., 1, 1, 1) or float-like tensor
    num = _echo(w_all, ref_index) * te_c(ref_index) * ref
    den = _echo(w_all, ref_index) * te_c(ref_index) ** 2
    for e in order:
        if e == ref_index:
            continue
        if progressive:
            slope = num / den.clamp_min(torch.finfo(den.dtype).tiny)
            # Where all weights so far vanish, fall back to the reference's slope.
            slope = torch.where(den > 0, slope, ref / te_ref)
            pred = slope * te_c(e)
        else:
            pred = ref * (te_c(e) / te_ref)
        pe = _echo(phase_rad, e)
        ue = pe - TWO_PI * torch.round((pe - pred) / TWO_PI)
        out[e] = ue
        we = _echo(w_all, e)
        num = num + we * te_c(e) * ue
        den = den + we * te_c(e) ** 2
    return torch.stack(out, dim=-4)


class TemporalUnwrap(_OptionalKeysTransform):
    """Temporal unwrapping against a spatially unwrapped reference echo (see
    :func:`temporal_unwrap`).

    Call
    ----
    ``(phase_rad (..., E, X, Y, Z), te_s, reference_rad (..., X, Y, Z), magnitude=None)`` ->
    unwrapped phase (..., E, X, Y, Z). Sample dict: ``phase, te_s, phase_ref_unwrapped``,
    ``magnitude`` (optional) -> ``phase``.
    """

    input_keys = {"phase_rad": "phase", "te_s": "te_s", "reference_rad": "phase_ref_unwrapped"}
    optional_input_keys = {"magnitude": "magnitude"}
    output_keys = ("phase",)

    def __init__(self, ref_index: int = 0, progressive: bool = True,
                 weighting: str = "magnitude2") -> None:
        _weights(None, torch.zeros(1), weighting)
        self.ref_index = int(ref_index)
        self.progressive = bool(progressive)
        self.weighting = weighting

    def __call__(self, phase_rad: torch.Tensor, te_s, reference_rad: torch.Tensor,
                 magnitude: torch.Tensor | None = None) -> torch.Tensor:
        return temporal_unwrap(phase_rad, te_s, reference_rad, self.ref_index, magnitude,
                               self.progressive, self.weighting)


# --------------------------------------------------------------------------------------------
# Weighted least-squares field fit
# --------------------------------------------------------------------------------------------

def _masked_median(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Median of ``x`` (..., X, Y, Z) over the mask (per leading index), shape (..., 1, 1, 1)."""
    lead = x.shape[:-3]
    flat = x.reshape(-1, x.shape[-3] * x.shape[-2] * x.shape[-1])
    if mask is None:
        med = flat.median(dim=-1).values
    else:
        mf = mask.expand_as(x).reshape(flat.shape)
        vals = []
        for row, m in zip(flat, mf):
            sel = row[m]
            vals.append(sel.median() if sel.numel() else row.new_tensor(float("nan")))
        med = torch.stack(vals)
    return med.reshape(*lead, 1, 1, 1)


def estimate_noise_std(magnitude: torch.Tensor, residual_rad: torch.Tensor | None,
                       mask: torch.Tensor | None = None, min_background: int = 1000
                       ) -> torch.Tensor:
    """Standard deviation of the complex noise (per real channel, magnitude units).

    With residuals of a fit with E >= 2 echoes: ``sigma^2 = median_mask(sum_e m_e^2 r_e^2) /
    median(chi2(E - 1))`` (``m r`` is the noise projected on the phase direction, N(0, sigma^2),
    and the fit removes one degree of freedom). With one echo: the Rayleigh background outside
    the mask, ``sigma = median(m) / sqrt(2 ln 2)``. Returns ``(..., 1, 1, 1)``; NaN where no
    estimate is possible.
    """
    m = _float(magnitude)
    if residual_rad is not None and m.shape[-4] >= 2:
        s = (m * m * residual_rad * residual_rad).sum(dim=-4)
        dof = m.shape[-4] - 1
        return torch.sqrt(_masked_median(s, mask) / float(scipy.stats.chi2.ppf(0.5, dof)))
    m0 = m[..., 0, :, :, :]
    if mask is None:
        return torch.full((*m0.shape[:-3], 1, 1, 1), float("nan"), dtype=m.dtype,
                          device=m.device)
    bg = ~mask.to(torch.bool).expand_as(m0)
    nan = torch.full((*m0.shape[:-3], 1, 1, 1), float("nan"), dtype=m.dtype, device=m.device)
    if int(bg.reshape(-1, bg.shape[-3] * bg.shape[-2] * bg.shape[-1]).sum(-1).min()) \
            < min_background:
        return nan
    med = _masked_median(m0, bg)
    return torch.where(med > 0, med / math.sqrt(2.0 * math.log(2.0)), nan)


def fit_field_wls(phase_rad: torch.Tensor, te_s, b0_t, magnitude: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None, weighting: str = "magnitude2",
                  phase_sign: int = 1, noise_std: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares field fit through the origin.

    Parameters
    ----------
    phase_rad : (..., E, X, Y, Z)
        Unwrapped phase with the offset removed, rad.
    te_s : (E,) or (B, E)
        Echo times, s.
    b0_t : float or (B,)
        Field strength, T.
    magnitude : (..., E, X, Y, Z), optional
        Magnitude: weights and noise propagation (ones if None).
    mask : (..., X, Y, Z) bool, optional
        Where the noise level is estimated (and the background for one echo).
    weighting : {"magnitude2", "magnitude", "uniform"}
        Fit weights ``w_e``: ``m^2`` (inverse phase variance, default), ``m`` or 1.
    phase_sign : {+1, -1}
        Vendor phase polarity (+1: phase grows with positive field).
    noise_std : float or (..., 1, 1, 1) tensor, optional
        Standard deviation of the complex noise per channel, magnitude units. Estimated if
        None (see :func:`estimate_noise_std`); if that is impossible (one echo, no
        background), 1 is used and the noise map is relative.

    Returns
    -------
    field_ppm : (..., X, Y, Z)
        ``phase_sign * slope / (2 pi GAMMA_BAR B0)``, slope = ``sum w TE phase / sum w TE^2``.
    field_noise_ppm : (..., X, Y, Z)
        Propagated standard deviation of ``field_ppm``,
        ``sigma_n sqrt(sum w^2 TE^2 / m^2) / sum w TE^2 / (2 pi GAMMA_BAR B0)``.
    """
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign}")
    phase_rad = _float(phase_rad)
    if phase_rad.ndim < 4:
        raise ValueError(f"phase_rad must be (..., E, X, Y, Z), got {tuple(phase_rad.shape)}")
    te = check_te_s(te_s, phase_rad.shape[-4])
    te_v = _te_view(te, phase_rad)
    w = _weights(magnitude, phase_rad, weighting)
    wt = w * te_v
    den = (wt * te_v).sum(dim=-4)
    tiny = torch.finfo(phase_rad.dtype).tiny
    den_safe = den.clamp_min(tiny)
    slope = (wt * phase_rad).sum(dim=-4).div_(den_safe)  # rad/s
    del wt
    b0 = _b0_view(b0_t, slope)
    field_ppm = phase_to_ppm(slope, 1.0, b0, phase_sign)
    mag = (torch.ones_like(phase_rad) if magnitude is None
           else _float(magnitude).to(phase_rad.dtype).expand_as(phase_rad))
    if noise_std is None:
        resid = phase_rad - slope.unsqueeze(-4) * te_v
        sigma = estimate_noise_std(mag, resid, mask)
        del resid
        if bool(torch.any(~torch.isfinite(sigma))):
            log.warning("noise level could not be estimated (one echo and no background outside "
                        "the mask): field_noise_ppm is relative (sigma_n = 1)")
            sigma = torch.where(torch.isfinite(sigma), sigma, torch.ones_like(sigma))
    else:
        sigma = torch.as_tensor(noise_std, dtype=phase_rad.dtype, device=phase_rad.device)
        if bool(torch.any(sigma < 0)) or not bool(torch.all(torch.isfinite(sigma))):
            raise ValueError(f"noise_std must be finite and >= 0, got {noise_std}")
    if weighting == "magnitude2" and magnitude is not None:
        # sum w^2 TE^2 / m^2 = sum m^2 TE^2 = den.
        slope_std = sigma * torch.rsqrt(den_safe)
    else:
        var_num = (w * w * te_v * te_v / (mag * mag).clamp_min(tiny)).sum(dim=-4)
        slope_std = sigma * torch.sqrt(var_num) / den_safe
    field_noise_ppm = phase_to_ppm(slope_std, 1.0, b0, 1)
    return field_ppm, field_noise_ppm


class MultiEchoFit(_OptionalKeysTransform):
    """Weighted least-squares field fit of unwrapped multi-echo phase (see :func:`fit_field_wls`).

    Parameters
    ----------
    weighting : {"magnitude2", "magnitude", "uniform"}
    phase_sign : {+1, -1}
    noise_std : float, optional
        Complex noise standard deviation (magnitude units); estimated when None.

    Call
    ----
    ``(phase_rad (..., E, X, Y, Z), te_s, b0_t, magnitude=None, mask=None)`` ->
    ``(field_ppm, field_noise_ppm)``, each (..., X, Y, Z).
    Sample dict: ``phase, te_s, b0_t``, ``magnitude, mask`` (optional) ->
    ``field_ppm, field_noise_ppm``.
    """

    input_keys = {"phase_rad": "phase", "te_s": "te_s", "b0_t": "b0_t"}
    optional_input_keys = {"magnitude": "magnitude", "mask": "mask"}
    output_keys = ("field_ppm", "field_noise_ppm")

    def __init__(self, weighting: str = "magnitude2", phase_sign: int = 1,
                 noise_std: float | None = None) -> None:
        _weights(None, torch.zeros(1), weighting)
        if phase_sign not in (1, -1):
            raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign}")
        self.weighting = weighting
        self.phase_sign = int(phase_sign)
        self.noise_std = noise_std

    def __call__(self, phase_rad: torch.Tensor, te_s, b0_t, magnitude: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return fit_field_wls(phase_rad, te_s, b0_t, magnitude, mask, self.weighting,
                             self.phase_sign, self.noise_std)

    def __repr__(self) -> str:
        return (f"MultiEchoFit(weighting={self.weighting!r}, phase_sign={self.phase_sign}, "
                f"noise_std={self.noise_std})")
