"""Weighted least-squares field fit of unwrapped multi-echo phase, and its noise map.

:func:`fit_field_wls` / :class:`MultiEchoFit`: weighted least squares of the unwrapped phase
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

The phase is expected unwrapped (:mod:`qsmnet.transforms.temporal_unwrapping`) with its offset
removed (:mod:`qsmnet.transforms.phase_offsets`). Shapes: multi-echo volumes ``(..., E, X, Y, Z)``
(echo axis -4, any leading batch dims); ``te_s`` is ``(E,)`` or ``(B, E)`` in seconds; ``b0_t``
in tesla (float or ``(B,)``).
"""

from __future__ import annotations

import logging
import math

import scipy.stats
import torch

from qsmnet.physics.units import phase_to_ppm
from qsmnet.transforms._echoes import b0_view, check_te_s, echo_weights, te_view
from qsmnet.transforms._grid import as_float
from qsmnet.transforms.base import OptionalKeysTransform

log = logging.getLogger(__name__)

__all__ = ["MultiEchoFit", "estimate_noise_std", "fit_field_wls"]


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
    m = as_float(magnitude)
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
    phase_rad = as_float(phase_rad)
    if phase_rad.ndim < 4:
        raise ValueError(f"phase_rad must be (..., E, X, Y, Z), got {tuple(phase_rad.shape)}")
    te = check_te_s(te_s, phase_rad.shape[-4])
    te_v = te_view(te, phase_rad)
    w = echo_weights(magnitude, phase_rad, weighting)
    wt = w * te_v
    den = (wt * te_v).sum(dim=-4)
    tiny = torch.finfo(phase_rad.dtype).tiny
    den_safe = den.clamp_min(tiny)
    slope = (wt * phase_rad).sum(dim=-4).div_(den_safe)  # rad/s
    del wt
    b0 = b0_view(b0_t, slope)
    field_ppm = phase_to_ppm(slope, 1.0, b0, phase_sign)
    mag = (torch.ones_like(phase_rad) if magnitude is None
           else as_float(magnitude).to(phase_rad.dtype).expand_as(phase_rad))
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


class MultiEchoFit(OptionalKeysTransform):
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
    output_keys = ("total_field_ppm", "field_noise_ppm")

    def __init__(self, weighting: str = "magnitude2", phase_sign: int = 1,
                 noise_std: float | None = None) -> None:
        echo_weights(None, torch.zeros(1), weighting)
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
