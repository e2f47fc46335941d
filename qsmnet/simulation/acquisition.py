"""Multi-echo GRE signal of a simulated sample: M0 and R2* from tissue classes, a smooth receiver
phase offset, wrapped phase and complex Gaussian noise at a peak SNR; and the field-noise model
that the dipole-stage samples use.

Signal of echo ``e`` (``m_e`` the noise-free magnitude)::

    S_e = M0 exp(-TE_e R2*) exp(i (phi0 + 2 pi GAMMA_BAR B0 TE_e field_ppm)) + sigma (n1 + i n2)

with ``sigma = max(m_1) / peak_snr`` (the qsm-forward convention: the peak of the first echo);
the stored phase is ``angle(S_e)`` wrapped to [-pi, pi).

Field noise (ppm) of a least-squares fit of the phase over the echoes, for a known phase offset
(Cramer-Rao bound), at a voxel whose echo magnitudes are ``m_e``::

    sigma_field = sigma / (2 pi GAMMA_BAR B0 sqrt(sum_e TE_e^2 m_e^2))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qsmnet.physics.units import GAMMA_BAR_MHZ_PER_T, wrap_phase
from qsmnet.simulation.masks import AIR, BRAIN, CSF, SKULL, SOFT_TISSUE

#: (M0, R2* at 3 T in 1/s) of the non-brain classes.
CLASS_M0_R2STAR = {CSF: (1.0, 4.0), SKULL: (0.05, 300.0), SOFT_TISSUE: (0.8, 30.0), AIR: (0.0, 0.0)}


def field_noise_std_ppm(snr: float, te_s: Sequence[float] | torch.Tensor, b0_t: float,
                        magnitude: torch.Tensor | None = None) -> torch.Tensor | float:
    """Standard deviation (ppm) of the field estimated from multi-echo phase at a peak SNR.

    Parameters
    ----------
    snr : peak magnitude SNR (``peak / sigma`` of the complex noise).
    te_s : (E,) echo times, s.
    b0_t : field strength, T.
    magnitude : (E, X, Y, Z) noise-free echo magnitudes scaled so that the peak is 1, or None for
        magnitude 1 at every echo (no decay): then a float is returned.
    """
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    scale = 2.0 * math.pi * GAMMA_BAR_MHZ_PER_T * float(b0_t)
    if magnitude is None:
        s = math.sqrt(sum(float(t) ** 2 for t in te_s))
        return 1.0 / (float(snr) * scale * s)
    te = torch.as_tensor(te_s, dtype=magnitude.dtype, device=magnitude.device).reshape(-1, 1, 1, 1)
    w = torch.sqrt(((te * magnitude) ** 2).sum(0))
    return 1.0 / (float(snr) * scale * w.clamp_min(1e-12))


def tissue_m0_r2star(labels: torch.Tensor, chi_ppm: torch.Tensor, texture: torch.Tensor,
                     b0_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M0 (a.u., peak about 1) and R2* (1/s) per voxel from tissue classes.

    Brain: M0 0.75 with a smooth texture and less signal where |chi| is large (iron, blood,
    calcium), R2* = 15 + 5 texture + 100 |chi| (1/s at 3 T; iron-rich tissue decays faster).
    Other classes from :data:`CLASS_M0_R2STAR`. R2* scales linearly with B0.
    """
    m0 = torch.zeros_like(chi_ppm)
    r2 = torch.zeros_like(chi_ppm)
    brain = labels == BRAIN
    a = chi_ppm.abs()
    m0_brain = (0.75 + 0.08 * texture - 0.2 * a.clamp(max=1.0)).clamp(0.2, 1.0)
    r2_brain = (15.0 + 5.0 * texture + 100.0 * a).clamp(5.0, 400.0)
    m0 = torch.where(brain, m0_brain, m0)
    r2 = torch.where(brain, r2_brain, r2)
    for cls, (m, r) in CLASS_M0_R2STAR.items():
        sel = labels == cls
        m0 = torch.where(sel, torch.full_like(m0, m), m0)
        r2 = torch.where(sel, torch.full_like(r2, r), r2)
    return m0, r2 * (float(b0_t) / 3.0)


def phase_offset(axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor], constant: float,
                 amplitude: float, coefficients: Sequence[float]) -> torch.Tensor:
    """Smooth receiver phase offset phi0 (rad): a constant plus a random 1st/2nd-order polynomial.

    ``coefficients`` (9 numbers, normalised here) weigh x, y, z, x^2, y^2, z^2, xy, yz, xz in
    coordinates scaled to [-1, 1] over the patch; ``amplitude`` is the norm of that weight vector.
    """
    c = [float(v) for v in coefficients]
    n = math.sqrt(sum(v * v for v in c)) or 1.0
    c = [amplitude * v / n for v in c]
    h = [float(a.abs().max().clamp_min(1e-6)) for a in axes]
    x = (axes[0] / h[0]).reshape(-1, 1, 1)
    y = (axes[1] / h[1]).reshape(1, -1, 1)
    z = (axes[2] / h[2]).reshape(1, 1, -1)
    xy = c[0] * x + c[1] * y + c[3] * x * x + c[4] * y * y + c[6] * x * y
    zz = c[2] * z + c[5] * z * z
    return (xy + zz) + z * (c[7] * y + c[8] * x) + constant


def multi_echo_signal(field_ppm: torch.Tensor, m0: torch.Tensor, r2star: torch.Tensor,
                      phi0: torch.Tensor, te_s: Sequence[float], b0_t: float,
                      peak_snr: float | None, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Magnitude and wrapped phase ``(E, X, Y, Z)`` of a multi-echo GRE acquisition.

    Parameters
    ----------
    field_ppm : (X, Y, Z) total field (ppm), everywhere (not only in the mask).
    m0, r2star, phi0 : (X, Y, Z) proton density, R2* (1/s), receiver phase (rad).
    te_s : echo times, s.   b0_t : tesla.
    peak_snr : ``max(m_1) / sigma``; None or inf for no noise.
    generator : for the noise (on the volumes' device).

    Returns
    -------
    magnitude, phase (wrapped to [-pi, pi)), the noise-free magnitudes ``m_e`` and sigma.
    """
    te = torch.as_tensor([float(t) for t in te_s], dtype=torch.float64,
                         device=field_ppm.device).reshape(-1, 1, 1, 1)
    scale = 2.0 * math.pi * GAMMA_BAR_MHZ_PER_T * float(b0_t)
    accrued = (phi0.to(torch.float64) + scale * te * field_ppm.to(torch.float64))
    clean_mag = (m0.to(torch.float64) * torch.exp(-te * r2star.to(torch.float64))).to(torch.float32)
    sig = torch.polar(clean_mag, wrap_phase(accrued).to(torch.float32))
    sigma = 0.0
    if peak_snr is not None and math.isfinite(float(peak_snr)):
        peak = float(clean_mag[0].max())
        sigma = peak / float(peak_snr)
        noise = torch.randn((2,) + tuple(sig.shape), generator=generator, device=sig.device)
        sig = sig + torch.complex(noise[0], noise[1]) * sigma
    magnitude = sig.abs()
    return magnitude, wrap_phase_float32(torch.angle(sig)), clean_mag, sigma


#: The largest float32 below pi, and float32(-pi) (which is just below -pi).
_F32_BELOW_PI = float(torch.nextafter(torch.tensor(math.pi, dtype=torch.float32),
                                      torch.tensor(0.0, dtype=torch.float32)))
_F32_MINUS_PI = float(torch.tensor(-math.pi, dtype=torch.float32))


def wrap_phase_float32(phase: torch.Tensor) -> torch.Tensor:
    """Wrap to [-pi, pi) as float32: values that round to +pi become float32(-pi)."""
    p = wrap_phase(phase.to(torch.float64)).to(torch.float32)
    return torch.where(p > _F32_BELOW_PI, torch.full_like(p, _F32_MINUS_PI), p)
