"""Finite-difference operators scaled by voxel size, mutually consistent.

``gradient`` uses periodic forward differences, ``divergence`` periodic backward differences,
so that ``divergence = -gradient^T`` exactly and ``laplacian = divergence(gradient(.))`` is the
7-point stencil whose spectrum is :func:`qsmnet.physics.kernels.laplacian_eigenvalues`.
Periodic boundaries match the FFT-based solvers (closed-form L2, TV-ADMM) that use those spectra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_DIMS = (-3, -2, -1)


def gradient(x: torch.Tensor, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Forward-difference gradient.

    Parameters
    ----------
    x : (..., X, Y, Z) tensor
    voxel_size : (3,) voxel size in mm.

    Returns
    -------
    (..., 3, X, Y, Z) tensor, units of x per mm.
    """
    return torch.stack(
        [(torch.roll(x, -1, dims=d) - x) / float(h) for d, h in zip(_DIMS, voxel_size)], dim=-4)


def divergence(g: torch.Tensor, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Backward-difference divergence of ``g`` (..., 3, X, Y, Z); the negative adjoint of
    :func:`gradient`."""
    out = None
    for i, (d, h) in enumerate(zip(_DIMS, voxel_size)):
        gi = g[..., i, :, :, :]
        term = (gi - torch.roll(gi, 1, dims=d)) / float(h)
        out = term if out is None else out + term
    return out


def laplacian(x: torch.Tensor, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Periodic 7-point Laplacian with ``1/voxel_size^2`` weights, (..., X, Y, Z)."""
    out = None
    for d, h in zip(_DIMS, voxel_size):
        term = (torch.roll(x, -1, dims=d) - 2.0 * x + torch.roll(x, 1, dims=d)) / float(h) ** 2
        out = term if out is None else out + term
    return out


def gradient_into(x: torch.Tensor, out: torch.Tensor, inv_h: Sequence[float]) -> torch.Tensor:
    """Periodic forward differences of 3-D ``x`` into ``out`` (3, X, Y, Z), in place.

    Equal to :func:`gradient` without its temporaries (the iterative solvers call it hundreds
    of times on large grids); ``inv_h`` is ``1 / voxel_size`` (per mm).
    """
    for axis in range(3):
        o = out[axis]
        n = x.shape[axis]
        torch.sub(x.narrow(axis, 1, n - 1), x.narrow(axis, 0, n - 1), out=o.narrow(axis, 0, n - 1))
        torch.sub(x.narrow(axis, 0, 1), x.narrow(axis, n - 1, 1), out=o.narrow(axis, n - 1, 1))
        if inv_h[axis] != 1.0:
            o.mul_(inv_h[axis])
    return out


def gradient_adjoint_into(g: torch.Tensor, out: torch.Tensor, inv_h: Sequence[float],
                       tmp: torch.Tensor) -> torch.Tensor:
    """``grad^T g = -div g`` (periodic) of ``g`` (3, X, Y, Z) into ``out`` (X, Y, Z), in place;
    ``tmp`` is scratch shaped like ``out``."""
    out.zero_()
    for axis in range(3):
        gi = g[axis]
        n = gi.shape[axis]
        # (grad^T g)[i] = (g[i-1] - g[i]) / h
        torch.sub(gi.narrow(axis, 0, n - 1), gi.narrow(axis, 1, n - 1),
                  out=tmp.narrow(axis, 1, n - 1))
        torch.sub(gi.narrow(axis, n - 1, 1), gi.narrow(axis, 0, 1), out=tmp.narrow(axis, 0, 1))
        out.add_(tmp, alpha=inv_h[axis])
    return out
