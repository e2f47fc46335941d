"""QSM accuracy metrics, computed with ``qsm_ci.qsm_eval`` so figures match the QSM-CI leaderboard.

``qsm_ci.qsm_eval.score_arrays`` is the leaderboard's own entry point: both maps are zeroed outside
the mask, NRMSE is demeaned (and linearly detrended for ``nrmse_detrend``), HFEN uses a LoG with
sigma 1.5 voxels, XSIM 5x5x5 windows, all in percent except XSIM and correlation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Metric keys in reporting order, with the direction that is better.
METRIC_NAMES = {"nrmse": "lower", "nrmse_detrend": "lower", "hfen": "lower", "xsim": "higher",
                "correlation": "higher"}


def _score_arrays():
    try:
        from qsm_ci.qsm_eval import score_arrays
    except ImportError as exc:  # pragma: no cover - qsm-ci is a declared dependency
        raise ImportError("qsmnet metrics need the `qsm-ci` package (pip install qsm-ci)") from exc
    return score_arrays


def eroded_mask(mask: np.ndarray, voxel_size_mm: Sequence[float], radius_mm: float) -> np.ndarray:
    """Binary erosion by a ball of ``radius_mm`` (an ellipsoid in voxels on anisotropic grids)."""
    from scipy import ndimage

    r = [int(np.floor(radius_mm / v)) for v in voxel_size_mm]
    grids = np.meshgrid(*[np.arange(-k, k + 1) * v for k, v in zip(r, voxel_size_mm)],
                        indexing="ij")
    ball = sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9
    return ndimage.binary_erosion(mask > 0, structure=ball)


def score(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray,
          voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
          erode_mm: float | None = 3.0) -> dict[str, dict[str, float]]:
    """Score a susceptibility map against the truth.

    Parameters
    ----------
    pred, truth : (X, Y, Z) arrays, ppm.
    mask : (X, Y, Z) array; non-zero voxels are scored.
    voxel_size_mm : voxel size, for the erosion radius in mm.
    erode_mm : radius of the eroded mask (None or 0: skip it).

    Returns
    -------
    dict
        ``{"mask": {...}, "eroded_mask": {...}}`` each with ``nrmse``, ``nrmse_detrend``, ``hfen``,
        ``xsim``, ``correlation`` and ``coverage`` (fraction of the mask with a finite non-zero
        prediction), plus the voxel count ``n_voxels``.
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    mask = np.asarray(mask) > 0
    if pred.shape != truth.shape or pred.shape != mask.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape}, truth {truth.shape}, "
                         f"mask {mask.shape}")
    if not mask.any():
        raise ValueError("the mask is empty")
    score_arrays = _score_arrays()
    out = {}
    masks = {"mask": mask}
    if erode_mm:
        masks["eroded_mask"] = eroded_mask(mask, voxel_size_mm, erode_mm)
    for name, m in masks.items():
        if not m.any():
            continue
        metrics, _ = score_arrays(pred, truth, m.astype(np.uint8), kind="chi")
        metrics = {k: float(metrics[k]) for k in (*METRIC_NAMES, "coverage")}
        metrics["n_voxels"] = int(m.sum())
        out[name] = metrics
    return out


def score_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A Markdown table of ``{row name: {metric: value}}`` in :data:`METRIC_NAMES` order."""
    head = "| " + " | ".join([title or "method", "NRMSE %", "dNRMSE %", "HFEN %", "XSIM", "CC"]) + " |"
    sep = "|" + "---|" * 6
    lines = [head, sep]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['nrmse']:.1f} | {m['nrmse_detrend']:.1f} | {m['hfen']:.1f} | "
                     f"{m['xsim']:.3f} | {m['correlation']:.3f} |")
    return "\n".join(lines)
