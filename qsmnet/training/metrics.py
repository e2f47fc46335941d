"""Validation metrics: the QSM-CI leaderboard functions on numpy volumes.

Uses ``qsm_ci.qsm_eval`` (``nrmse_challenge`` - demeaned NRMSE and linearly detrended NRMSE, %,
``hfen`` - %, ``xsim``) so validation numbers are comparable with the public QSM-CI leaderboard.
``qsm-ci`` is a development dependency: without it only the demeaned NRMSE is computed, by
:func:`nrmse_demeaned` (the same formula as ``nrmse_challenge``'s first value).
All metrics are taken inside the given mask (not eroded).
"""

from __future__ import annotations

import math

import numpy as np

try:  # pragma: no cover - exercised by whichever branch the environment provides
    from qsm_ci import qsm_eval as _qsm_eval
except ImportError:  # pragma: no cover
    _qsm_eval = None

HAVE_QSM_CI = _qsm_eval is not None


def nrmse_demeaned(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """``100 * ||(r - mean r) - (t - mean t)|| / ||t - mean t||`` inside ``mask`` (%)."""
    m = np.asarray(mask) > 0
    if not m.any():
        return math.nan
    r = np.asarray(recon, dtype=np.float64)[m]
    t = np.asarray(truth, dtype=np.float64)[m]
    r = r - r.mean()
    t = t - t.mean()
    norm = math.sqrt(float((t * t).sum()))
    if norm < 1e-30:
        return math.nan
    return 100.0 * math.sqrt(float(((r - t) ** 2).sum())) / norm


def volume_metrics(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray,
                   full: bool = True) -> dict[str, float]:
    """Metrics of one ``(X, Y, Z)`` reconstruction against the truth inside ``mask``.

    Returns ``nrmse`` always, and with ``full`` and qsm-ci available also ``nrmse_detrended``,
    ``hfen`` and ``xsim``.
    """
    recon = np.asarray(recon, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    mask = np.asarray(mask) > 0
    if _qsm_eval is None:
        return {"nrmse": nrmse_demeaned(recon, truth, mask)}
    nrmse, nrmse_dt = _qsm_eval.nrmse_challenge(recon, truth, mask)
    out = {"nrmse": float(nrmse)}
    if full:
        out["nrmse_detrended"] = float(nrmse_dt)
        out["hfen"] = float(_qsm_eval.hfen(recon, truth, mask))
        out["xsim"] = float(_qsm_eval.xsim(recon, truth, mask))
    return out
