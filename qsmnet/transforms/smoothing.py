"""Gaussian smoothing in mm on anisotropic grids (FFT, zero padded, real or complex input)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import scipy.fft
import torch
import torch.nn.functional as F

from qsmnet.physics.geometry import as_voxel_size_mm


__all__ = ["gaussian_smooth_mm"]

_DIMS = (-3, -2, -1)


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
    vs = as_voxel_size_mm(voxel_size_mm)
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
