"""Echo-axis helpers of the multi-echo transforms (package-private module).

Multi-echo volumes are ``(..., E, X, Y, Z)`` (echo axis -4, any leading batch dims); ``te_s`` is
``(E,)`` or ``(B, E)`` in seconds; ``b0_t`` in tesla (float or ``(B,)``). :func:`check_te_s` is
public API (re-exported by :mod:`qsmnet.transforms`); the other names are shared by
:mod:`~qsmnet.transforms.phase_offsets`, :mod:`~qsmnet.transforms.temporal_unwrapping`,
:mod:`~qsmnet.transforms.echo_fit` and :mod:`~qsmnet.transforms.field_mapping`.
"""

from __future__ import annotations

import torch

from qsmnet.physics.units import echo_time_problem
from qsmnet.transforms._grid import as_float

__all__ = ["check_te_s"]


def check_te_s(te_s, n_echoes: int | None = None) -> torch.Tensor:
    """Validate echo times in seconds and return them as a float64 tensor ``(E,)`` or ``(B, E)``.

    Each row must pass :func:`qsmnet.physics.units.echo_time_problem` (the readers' rule).

    Raises
    ------
    ValueError
        If a row of echo times breaks that rule, or their number does not match ``n_echoes``.
    """
    te = torch.as_tensor(te_s, dtype=torch.float64).detach().cpu()
    if te.ndim == 0:
        te = te.reshape(1)
    if te.ndim > 2:
        raise ValueError(f"te_s must be (E,) or (B, E), got shape {tuple(te.shape)}")
    if n_echoes is not None and te.shape[-1] != n_echoes:
        raise ValueError(f"te_s has {te.shape[-1]} echo times but the data has {n_echoes} echoes")
    for row in te.reshape(-1, te.shape[-1]).tolist():
        problem = echo_time_problem(row)
        if problem is not None:
            raise ValueError(f"te_s: {problem}")
    return te


def te_view(te: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(E,)`` -> ``(E, 1, 1, 1)``; ``(B, E)`` -> ``(B, [1...], E, 1, 1, 1)`` on ``like``."""
    te = te.to(dtype=like.dtype, device=like.device)
    if te.ndim == 1:
        return te.reshape(-1, 1, 1, 1)
    extra = like.ndim - 4 - 1
    return te.reshape(te.shape[0], *([1] * max(extra, 0)), te.shape[1], 1, 1, 1)


def echo(x: torch.Tensor, idx: int) -> torch.Tensor:
    return x[..., idx, :, :, :]


def echo_te(te: torch.Tensor, idx: int, like: torch.Tensor) -> torch.Tensor | float:
    """TE of echo ``idx`` broadcastable against a single-echo volume ``like`` (..., X, Y, Z)."""
    if te.ndim == 1:
        return float(te[idx])
    t = te[:, idx].to(dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def b0_view(b0_t, like: torch.Tensor):
    b0 = torch.as_tensor(b0_t, dtype=torch.float64)
    if b0.ndim == 0:
        return float(b0)
    return b0.to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))


def echo_weights(magnitude: torch.Tensor | None, like: torch.Tensor,
                 weighting: str) -> torch.Tensor:
    """Fit weights per echo: ``magnitude^2``, ``|magnitude|`` or ones, shaped like ``like``."""
    if weighting not in ("magnitude2", "magnitude", "uniform"):
        raise ValueError(f"weighting must be 'magnitude2', 'magnitude' or 'uniform', "
                         f"got {weighting!r}")
    if magnitude is None or weighting == "uniform":
        return torch.ones_like(like)
    m = as_float(magnitude).to(device=like.device, dtype=like.dtype)
    if m.shape != like.shape:
        m = m.expand_as(like)
    return m * m if weighting == "magnitude2" else m.abs()
