"""How chi is referenced: the constant that the dipole inversion leaves undetermined.

The dipole kernel has ``D(0) = 0``, so a field fixes chi only up to a constant; a QSM map is
therefore always reported relative to some region (``--reference``):

``mask-mean`` (the default)
    chi minus its mean over the voxels where it is reported (``Reconstruction.chi_mask``: the
    brain mask, less any rim that background removal eroded). A mean over the *whole* brain
    mask would be the same number wherever chi is defined, and undefined on an eroded rim, so
    qsmnet has no separate ``whole-brain`` reference.
``csf``
    chi minus its mean over cerebrospinal fluid in the lateral ventricles, the reference most
    QSM studies use (free water, chi of CSF close to that of water). The region is found as
    MEDI's ``extract_CSF`` does (and SEPIA and QSMxT after it), from R2*: the voxels with
    R2* below :data:`CSF_R2STAR_MAX_PER_S` (1/s) inside the brain mask eroded by
    :data:`CSF_EROSION_MM` (which keeps out the sulcal CSF and the brain's edge), grouped
    into 6-connected regions; those that reach the central box of the mask (the middle third
    of its bounding box along every axis) and hold at least :data:`CSF_MIN_REGION_ML` are
    the ventricles. R2* is the log-linear least-squares fit of the multi-echo magnitude
    (:func:`r2star_per_s`), so this reference needs the magnitude of at least two echoes.
``none``
    no constant subtracted: chi as the inversion returned it (its mean is then whatever the
    inversion left, which depends on the method), zero outside the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from qsmnet.io.errors import QSMInputError
from qsmnet.transforms.inversion import reference_to_mask_mean

__all__ = ["CSF_EROSION_MM", "CSF_MIN_REGION_ML", "CSF_R2STAR_MAX_PER_S", "DEFAULT_REFERENCE",
           "REFERENCES", "apply_reference", "csf_mask", "r2star_per_s"]

#: The ``--reference`` choices (module docstring).
REFERENCES = ("mask-mean", "csf", "none")
DEFAULT_REFERENCE = "mask-mean"
#: R2* (1/s) below which a voxel counts as CSF (MEDI ``extract_CSF``'s default threshold).
CSF_R2STAR_MAX_PER_S = 5.0
#: Erosion (mm) of the brain mask before CSF is looked for: keeps out sulci and the brain edge.
CSF_EROSION_MM = 5.0
#: Smallest connected CSF region kept (mL): isolated low-R2* noise voxels are not ventricles.
CSF_MIN_REGION_ML = 0.05

#: What each reference subtracts, for the record and the NIfTI header description.
REFERENCE_DESCRIPTIONS = {
    "mask-mean": "mean of chi inside the mask",
    "csf": "mean of chi over ventricular CSF (R2* threshold in the eroded brain mask)",
    "none": "no reference (chi as the inversion returned it)",
}


def check_reference(reference: str) -> str:
    """``reference`` if it is one of :data:`REFERENCES`; QSMInputError naming them otherwise."""
    if reference not in REFERENCES:
        raise QSMInputError(f"--reference: unknown reference {reference!r}; use "
                            f"{', '.join(REFERENCES)}")
    return reference


def r2star_per_s(magnitude: np.ndarray, te_s: Sequence[float], mask: np.ndarray) -> np.ndarray:
    """R2* (1/s) by a log-linear least-squares fit of ``|S(TE)| = S0 exp(-R2* TE)``.

    Parameters
    ----------
    magnitude : (E, X, Y, Z) array
        Multi-echo magnitude (any scale), E >= 2.
    te_s : (E,) echo times, s.
    mask : (X, Y, Z) bool
        Where to fit.

    Returns
    -------
    (X, Y, Z) float64 ndarray
        R2* in 1/s inside ``mask`` where every echo is positive; ``+inf`` elsewhere (never CSF).
    """
    te = np.asarray(te_s, dtype=np.float64).reshape(-1)
    mag = np.asarray(magnitude, dtype=np.float64)
    if te.size < 2 or mag.shape[0] != te.size:
        raise QSMInputError(f"--reference csf: R2* needs the magnitude of at least 2 echoes, got "
                            f"{mag.shape[0]} magnitude volume(s) for {te.size} echo time(s)")
    out = np.full(mag.shape[1:], np.inf)
    m = np.asarray(mask, dtype=bool) & np.all(mag > 0, axis=0)
    y = np.log(mag[:, m])                                   # (E, N)
    tc = te - te.mean()
    slope = (tc[:, None] * (y - y.mean(axis=0))).sum(axis=0) / float((tc ** 2).sum())
    out[m] = -slope
    return out


def _eroded(mask: np.ndarray, voxel_size_mm: Sequence[float], radius_mm: float) -> np.ndarray:
    """Voxels of ``mask`` farther than ``radius_mm`` from any voxel outside it (or the edge)."""
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    dist = ndimage.distance_transform_edt(padded, sampling=[float(v) for v in voxel_size_mm])
    return (dist > radius_mm)[1:-1, 1:-1, 1:-1]


def _central_box(mask: np.ndarray) -> np.ndarray:
    """The middle third of the bounding box of ``mask`` along every axis."""
    box = np.zeros(mask.shape, dtype=bool)
    where = np.nonzero(mask)
    sl = []
    for idx in where:
        lo, hi = int(idx.min()), int(idx.max()) + 1
        third = (hi - lo) / 3.0
        a, b = lo + int(np.floor(third)), lo + int(np.ceil(2 * third))
        sl.append(slice(a, max(b, a + 1)))
    box[tuple(sl)] = True
    return box


def csf_mask(magnitude: np.ndarray, te_s: Sequence[float], brain_mask: np.ndarray,
             voxel_size_mm: Sequence[float], r2star_max_per_s: float = CSF_R2STAR_MAX_PER_S,
             erosion_mm: float = CSF_EROSION_MM,
             min_region_ml: float = CSF_MIN_REGION_ML) -> np.ndarray:
    """Ventricular CSF from the multi-echo magnitude (module docstring).

    Parameters
    ----------
    magnitude : (E, X, Y, Z) array; te_s : (E,) s; brain_mask : (X, Y, Z) bool;
    voxel_size_mm : (3,) mm.

    Returns
    -------
    (X, Y, Z) bool ndarray, not empty.

    Raises
    ------
    QSMInputError
        When no region qualifies (the message says what was looked for).
    """
    brain = np.asarray(brain_mask, dtype=bool)
    inner = _eroded(brain, voxel_size_mm, erosion_mm)
    low = (r2star_per_s(magnitude, te_s, inner) < r2star_max_per_s) & inner
    labels, n = ndimage.label(low)  # 6-connectivity (the default structure)
    voxel_ml = float(np.prod([float(v) for v in voxel_size_mm])) / 1000.0
    centre = _central_box(brain)
    keep = np.zeros(n + 1, dtype=bool)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        central = np.unique(labels[centre & low])
        keep[central] = True
        keep &= sizes * voxel_ml >= min_region_ml
        keep[0] = False
    region = keep[labels]
    if not region.any():
        raise QSMInputError(
            f"--reference csf: no CSF found (no region of R2* < {r2star_max_per_s:g} 1/s of at "
            f"least {min_region_ml:g} mL reaching the centre of the brain mask eroded by "
            f"{erosion_mm:g} mm); use --reference mask-mean")
    return region


def apply_reference(chi_ppm: torch.Tensor, chi_mask: torch.Tensor, reference: str,
                    region: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Reference ``chi_ppm`` as ``reference`` says; zero outside ``chi_mask``.

    Parameters
    ----------
    chi_ppm : (X, Y, Z) tensor, ppm, as the inversion returned it.
    chi_mask : (X, Y, Z) bool tensor, where chi is reported.
    reference : one of :data:`REFERENCES`.
    region : (X, Y, Z) bool tensor
        The CSF region (``csf`` only); its part inside ``chi_mask`` is used.

    Returns
    -------
    chi_ppm : (X, Y, Z) tensor, referenced.
    info : dict
        ``reference`` (the name), ``description``, ``value_ppm`` (the constant subtracted,
        float64 mean over the region) and ``voxels`` (the region's voxel count; 0 for ``none``).
    """
    check_reference(reference)
    info: dict[str, Any] = {"reference": reference,
                            "description": REFERENCE_DESCRIPTIONS[reference]}
    m = chi_mask.to(torch.bool)
    if reference == "none":
        return chi_ppm * m.to(chi_ppm.dtype), {**info, "value_ppm": 0.0, "voxels": 0}
    if reference == "mask-mean":
        where = m
    else:
        if region is None:
            raise ValueError("the csf reference needs its region")
        where = region.to(device=m.device, dtype=torch.bool) & m
        if not bool(where.any()):
            raise QSMInputError("--reference csf: the CSF region lies outside the voxels chi is "
                                "reported on; use --reference mask-mean")
    value = float(chi_ppm.detach().to(torch.float64)[where].mean())
    info.update(value_ppm=value, voxels=int(where.sum()))
    if reference == "mask-mean":
        # the very function every earlier output was referenced with (same numbers)
        return reference_to_mask_mean(chi_ppm, m), info
    return (chi_ppm - torch.as_tensor(value, dtype=chi_ppm.dtype)) * m.to(chi_ppm.dtype), info
