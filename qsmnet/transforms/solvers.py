"""Iterative linear solvers shared by the transforms (background removal, inversion, refinement)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["conjugate_gradient"]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def conjugate_gradient(apply_a: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       x0: torch.Tensor | None = None, max_iter: int = 50,
                       tol: float = 1e-6) -> tuple[torch.Tensor, int, float]:
    """Conjugate gradients for a symmetric positive (semi-)definite operator.

    Parameters
    ----------
    apply_a : callable
        ``x -> A x`` on tensors shaped like ``b``.
    b : tensor
        Right-hand side.
    x0 : tensor, optional
        Start (zeros by default).
    max_iter : int
        Maximum number of iterations.
    tol : float
        Stop when ``||b - A x|| <= tol * ||b||``.

    Returns
    -------
    (x, iterations, relative residual)
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply_a(x) if x0 is not None else b.clone()
    bnorm = math.sqrt(max(_dot(b, b), 0.0))
    if bnorm == 0.0:
        return x, 0, 0.0
    p = r.clone()
    rs = _dot(r, r)
    it = 0
    for it in range(1, max_iter + 1):
        ap = apply_a(p)
        pap = _dot(p, ap)
        if pap <= 0.0:
            break
        alpha = rs / pap
        x.add_(p, alpha=alpha)
        r.add_(ap, alpha=-alpha)
        rs_new = _dot(r, r)
        if math.sqrt(max(rs_new, 0.0)) <= tol * bnorm:
            rs = rs_new
            break
        p.mul_(rs_new / rs).add_(r)
        rs = rs_new
    return x, it, math.sqrt(max(rs, 0.0)) / bnorm


