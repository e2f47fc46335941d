"""Classical dipole inversions: local field (ppm) -> susceptibility (ppm).

All share one interface, the one the network has: a callable on ``local_field_ppm``
``(..., X, Y, Z)`` with ``mask``, ``voxel_size_mm`` and ``b0_dir`` (``(3,)`` or ``(B, 3)``),
returning chi referenced to its mean inside the mask (the dipole kernel has ``D(0) = 0``, so the
mean of chi is not determined by the field).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qsmnet.physics.forward import _crop, _pad, pad_amount
from qsmnet.physics.kernels import dipole_kernel, laplacian_eigenvalues
from qsmnet.transforms.base import Transform


def reference_to_mask_mean(chi: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Subtract the mean of chi inside ``mask`` (per sample) and zero chi outside the mask."""
    if mask is None:
        return chi - chi.mean(dim=(-3, -2, -1), keepdim=True)
    m = mask.to(chi.dtype)
    n = m.sum(dim=(-3, -2, -1), keepdim=True).clamp_min(1.0)
    mean = (chi * m).sum(dim=(-3, -2, -1), keepdim=True) / n
    return (chi - mean) * m


def _spectral_solve(field: torch.Tensor, filt_fn, voxel_size, b0_dir, pad) -> torch.Tensor:
    shape = tuple(field.shape[-3:])
    pads = pad_amount(shape, pad)
    padded = [n + a + b for n, (a, b) in zip(shape, pads)]
    d = dipole_kernel(padded, voxel_size, b0_dir, half=True, dtype=field.dtype, device=field.device)
    filt = filt_fn(d, padded)
    if filt.ndim == 4 and field.ndim > 4:
        filt = filt.reshape(filt.shape[0], *([1] * (field.ndim - 4)), *filt.shape[1:])
    spec = torch.fft.rfftn(_pad(field, pads), dim=(-3, -2, -1))
    out = torch.fft.irfftn(spec * filt, s=padded, dim=(-3, -2, -1))
    return _crop(out, pads, shape)


def tkd(local_field_ppm: torch.Tensor, mask: torch.Tensor | None = None,
        voxel_size_mm: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
        b0_dir: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0), threshold: float = 0.15,
        pad: int | str | None = "auto") -> torch.Tensor:
    """Truncated k-space division.

    ``chi = IFFT(F * Dinv)`` with ``Dinv = 1/D`` where ``|D| > threshold`` and
    ``sign(D)/threshold`` elsewhere (``sign(0) = +1``, as in QSM.jl). The field is masked before
    the transform and chi referenced to its mean in the mask.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    field = local_field_ppm if mask is None else local_field_ppm * mask.to(local_field_ppm.dtype)

    def filt(d, _shape):
        sign = torch.where(d >= 0, torch.ones_like(d), -torch.ones_like(d))
        safe = torch.where(d.abs() > threshold, d, sign * threshold)
        return 1.0 / safe

    return reference_to_mask_mean(_spectral_solve(field, filt, voxel_size_mm, b0_dir, pad), mask)


def closed_form_l2(local_field_ppm: torch.Tensor, mask: torch.Tensor | None = None,
                   voxel_size_mm: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
                   b0_dir: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0),
                   alpha: float = 0.05, pad: int | str | None = "auto") -> torch.Tensor:
    """Closed-form L2 inversion with gradient regularisation (Bilgic 2014).

    ``chi = IFFT( D F / (D^2 + alpha |E|^2) )`` where ``|E|^2`` is the spectrum of
    ``grad^T grad`` for the periodic forward-difference gradient *scaled by voxel size* (so
    ``alpha`` has units of mm^2 and means the same on anisotropic grids).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be non-negative, got {alpha}")
    field = local_field_ppm if mask is None else local_field_ppm * mask.to(local_field_ppm.dtype)
    vs = torch.as_tensor(voxel_size_mm, dtype=torch.float64)

    def filt(d, shape):
        if vs.ndim == 2:
            e2 = torch.stack([-laplacian_eigenvalues(shape, v, half=True, dtype=d.dtype,
                                                     device=d.device) for v in vs])
        else:
            e2 = -laplacian_eigenvalues(shape, vs, half=True, dtype=d.dtype, device=d.device)
        den = d * d + alpha * e2
        return torch.where(den > 0, d / torch.where(den > 0, den, torch.ones_like(den)),
                           torch.zeros_like(den))

    return reference_to_mask_mean(_spectral_solve(field, filt, voxel_size_mm, b0_dir, pad), mask)


class TKD(Transform):
    """Transform wrapper of :func:`tkd` (dict keys: local_field_ppm, mask, voxel_size_mm,
    b0_dir -> chi_ppm)."""

    input_keys = {"local_field_ppm": "local_field_ppm", "mask": "mask",
                  "voxel_size_mm": "voxel_size_mm", "b0_dir": "b0_dir"}
    output_keys = ("chi_ppm",)

    def __init__(self, threshold: float = 0.15, pad: int | str | None = "auto") -> None:
        self.threshold = threshold
        self.pad = pad

    def __call__(self, local_field_ppm, mask=None, voxel_size_mm=(1.0, 1.0, 1.0),
                 b0_dir=(0.0, 0.0, 1.0)):
        return tkd(local_field_ppm, mask, voxel_size_mm, b0_dir, self.threshold, self.pad)

    def __repr__(self) -> str:
        return f"TKD(threshold={self.threshold})"


class ClosedFormL2(Transform):
    """Transform wrapper of :func:`closed_form_l2`."""

    input_keys = TKD.input_keys
    output_keys = ("chi_ppm",)

    def __init__(self, alpha: float = 0.05, pad: int | str | None = "auto") -> None:
        self.alpha = alpha
        self.pad = pad

    def __call__(self, local_field_ppm, mask=None, voxel_size_mm=(1.0, 1.0, 1.0),
                 b0_dir=(0.0, 0.0, 1.0)):
        return closed_form_l2(local_field_ppm, mask, voxel_size_mm, b0_dir, self.alpha, self.pad)

    def __repr__(self) -> str:
        return f"ClosedFormL2(alpha={self.alpha})"
