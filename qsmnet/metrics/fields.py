"""Errors of intermediate fields (total field after field mapping, local field after background
removal) against a known truth, for the per-stage error attribution of the benchmarks.

A field from phase is known only up to a constant inside the region it is compared on (the
reference of the phase, the mean removed by background removal), so both fields are demeaned
over the region before they are compared. The error is given in ppb (RMS) and relative to the
norm of a reference field (the true local field by default): the local field is what the
inversion needs, so a total-field error of 50 % of it matters as much as a local-field error of
50 %, whatever the size of the background field.
"""

from __future__ import annotations

import numpy as np

__all__ = ["field_error"]


def field_error(field_ppm, truth_ppm, region, reference_ppm=None) -> dict[str, float]:
    """Error of ``field_ppm`` against ``truth_ppm`` on ``region``.

    Parameters
    ----------
    field_ppm, truth_ppm : (X, Y, Z) array-like, ppm
        Estimated and true field.
    region : (X, Y, Z) array-like of bool
        Voxels compared (non-zero = compared); must not be empty.
    reference_ppm : (X, Y, Z) array-like, ppm, optional
        Field whose norm on ``region`` (after removing its mean there) the error is relative
        to; default ``truth_ppm``.

    Returns
    -------
    dict
        ``nrmse`` (%, ``100 * ||e|| / ||r||`` with ``e`` the demeaned difference and ``r`` the
        demeaned reference), ``rms_ppb`` (RMS of ``e``, parts per billion), ``voxels`` (size of
        ``region``).

    Raises
    ------
    ValueError
        Shapes that differ, an empty region, non-finite values in it, or a reference that is
        constant on it.
    """
    est = np.asarray(field_ppm, dtype=np.float64)
    truth = np.asarray(truth_ppm, dtype=np.float64)
    region = np.asarray(region) != 0
    ref = truth if reference_ppm is None else np.asarray(reference_ppm, dtype=np.float64)
    if not est.shape == truth.shape == region.shape == ref.shape:
        raise ValueError(f"shapes differ: field {est.shape}, truth {truth.shape}, region "
                         f"{region.shape}, reference {ref.shape}")
    n = int(region.sum())
    if n == 0:
        raise ValueError("the region is empty")
    e, r = est[region] - truth[region], ref[region]
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(r))):
        raise ValueError("non-finite values in the region")
    e = e - e.mean()
    r = r - r.mean()
    r_norm = float(np.linalg.norm(r))
    if r_norm == 0.0:
        raise ValueError("the reference field is constant on the region")
    return {"nrmse": 100.0 * float(np.linalg.norm(e)) / r_norm,
            "rms_ppb": 1e3 * float(np.sqrt(np.mean(e ** 2))), "voxels": n}
