"""Checks shared by the readers; each raises QSMInputError naming the file or argument.

Kept apart from the readers so that every entry point (plain NIfTI, BIDS, QSM-CI, CLI) refuses
the same inputs with the same words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qsmnet.io.errors import QSMInputError
from qsmnet.physics.geometry import normalize_b0_dir

__all__ = [
    "AFFINE_ATOL_MM",
    "B0_MAX_T",
    "TE_MAX_S",
    "check_b0_dir",
    "check_b0_t",
    "check_mask",
    "check_same_grid",
    "check_te_s",
    "check_volume_3d",
    "check_volume_echoes",
    "voxel_size_from_header",
]

#: Largest plausible echo time in seconds; a larger number is almost surely milliseconds.
TE_MAX_S = 1.0
#: Largest accepted field strength in tesla (human and preclinical scanners stay below).
B0_MAX_T = 20.0
#: Tolerance when comparing affines of files that should share a grid: converters write each echo
#: separately and float32 rounding differs in the last digits.
AFFINE_ATOL_MM = 1e-3
AFFINE_RTOL = 1e-5


def check_te_s(te_s: float | Sequence[float], source: str) -> tuple[float, ...]:
    """Validate echo times in seconds: finite, positive, strictly increasing, not milliseconds.

    Parameters
    ----------
    te_s : float or sequence of float
        Echo time(s), s.
    source : str
        Where they came from (file or argument), used in messages.

    Returns
    -------
    tuple of float
    """
    try:
        values = tuple(float(t) for t in np.atleast_1d(np.asarray(te_s, dtype=np.float64)))
    except (TypeError, ValueError) as exc:
        raise QSMInputError(f"{source}: EchoTime {te_s!r} is not a number or list of numbers") \
            from exc
    if not values:
        raise QSMInputError(f"{source}: no EchoTime given")
    for t in values:
        if not math.isfinite(t) or t <= 0:
            raise QSMInputError(f"{source}: EchoTime {t!r} must be positive (seconds)")
        if t > TE_MAX_S:
            raise QSMInputError(f"{source}: EchoTime {t:g} looks like milliseconds; "
                                "BIDS EchoTime is in seconds")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise QSMInputError(f"{source}: echo times {list(values)} must be strictly increasing")
    return values


def check_b0_t(b0_t: float, source: str) -> float:
    """Validate the field strength: a number in (0, 20] tesla."""
    try:
        value = float(b0_t)
    except (TypeError, ValueError) as exc:
        raise QSMInputError(f"{source}: field strength {b0_t!r} is not a number (tesla)") from exc
    if not math.isfinite(value) or not 0.0 < value <= B0_MAX_T:
        raise QSMInputError(f"{source}: field strength {b0_t!r} T is outside (0, {B0_MAX_T:g}] T")
    return value


def check_b0_dir(b0_dir, source: str) -> np.ndarray:
    """Validate a B0 direction (3 finite numbers, non-zero); return it as a float64 unit vector."""
    try:
        return normalize_b0_dir(b0_dir)
    except (TypeError, ValueError) as exc:
        raise QSMInputError(f"{source}: B0 direction {b0_dir!r} is not 3 finite numbers "
                            "with non-zero length") from exc


def check_volume_3d(data: np.ndarray, name: str) -> np.ndarray:
    """Return ``data`` as a 3-D volume; a trailing singleton 4th axis is dropped.

    Raises QSMInputError for 2-D images (``ndim < 3`` or a spatial axis of length 1) and for
    images with more dimensions.
    """
    arr = np.asarray(data)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim < 3 or (arr.ndim == 3 and min(arr.shape) < 2):
        raise QSMInputError(f"{name}: image is 2-D (shape {arr.shape}); QSM needs a 3-D volume")
    if arr.ndim != 3:
        raise QSMInputError(f"{name}: image is {arr.ndim}-D (shape {arr.shape}); "
                            "expected a 3-D volume")
    return arr


def check_volume_echoes(data: np.ndarray, name: str) -> np.ndarray:
    """Return ``data`` as ``(E, X, Y, Z)``: 3-D is one echo, 4-D stores echoes last.

    Raises QSMInputError for 2-D images and for 5-D or higher images.
    """
    arr = np.asarray(data)
    if arr.ndim == 3:
        return check_volume_3d(arr, name)[None]
    if arr.ndim == 4:
        check_volume_3d(arr[..., 0], name)
        return np.moveaxis(arr, -1, 0)
    if arr.ndim < 3:
        return check_volume_3d(arr, name)[None]  # raises: 2-D
    raise QSMInputError(f"{name}: image is {arr.ndim}-D (shape {arr.shape}); expected 3-D, "
                        "or 4-D with echoes along the last axis")


def check_same_grid(shape: Sequence[int], affine: np.ndarray, ref_shape: Sequence[int],
                    ref_affine: np.ndarray, name: str, ref_name: str) -> None:
    """Refuse an image whose spatial grid (shape or affine) differs from the reference's."""
    shape, ref_shape = tuple(shape[:3]), tuple(ref_shape[:3])
    if shape != ref_shape:
        raise QSMInputError(f"{name}: shape {shape} differs from {ref_name} {ref_shape}")
    if not np.allclose(affine, ref_affine, atol=AFFINE_ATOL_MM, rtol=AFFINE_RTOL):
        diff = float(np.max(np.abs(np.asarray(affine) - np.asarray(ref_affine))))
        raise QSMInputError(f"{name}: affine differs from {ref_name} (max difference {diff:.3g}); "
                            "the images are not on the same grid")


def check_mask(data: np.ndarray, name: str) -> np.ndarray:
    """Return a 3-D boolean mask (voxels > 0.5); refuse an empty mask."""
    mask = check_volume_3d(data, name) > 0.5
    if not mask.any():
        raise QSMInputError(f"{name}: mask is empty (no voxel > 0.5)")
    return mask


_UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001}


def voxel_size_from_header(header, name: str) -> np.ndarray:
    """Voxel size in mm, (3,) float64, from the header zooms (converted from m or um if so)."""
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    try:
        unit = header.get_xyzt_units()[0]
    except (AttributeError, KeyError, ValueError):
        unit = "unknown"
    zooms = zooms * _UNIT_TO_MM.get(unit, 1.0)
    if zooms.shape != (3,) or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise QSMInputError(f"{name}: voxel size {zooms.tolist()} from the header is not positive")
    return zooms
