"""Checks shared by the readers; each raises QSMInputError naming the file or argument.

Kept apart from the readers so that every entry point (plain NIfTI, BIDS, QSM-CI, CLI) refuses
the same inputs with the same words.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from qsmnet.io.errors import QSMInputError
from qsmnet.physics.geometry import normalize_b0_dir
from qsmnet.physics.units import TE_MAX_S, echo_time_problem

__all__ = [
    "AFFINE_ATOL_MM",
    "B0_MAX_T",
    "DECAY_TOLERANCE",
    "MIN_EXTENT_VOXELS",
    "TE_MAX_S",
    "TE_UNUSED_MAX_S",
    "check_b0_dir",
    "check_b0_t",
    "check_magnitude_decay",
    "check_mask",
    "check_mask_has_background",
    "check_min_extent",
    "check_same_grid",
    "check_te_s",
    "check_volume_3d",
    "check_volume_echoes",
    "voxel_size_from_header",
]

log = logging.getLogger(__name__)

#: Bound on the ``TE`` of a params.json for stages that do not use it (bfr, dipole): qsm-ci
#: writes the placeholder ``[1.0]`` there; above 1 it is still refused as milliseconds.
TE_UNUSED_MAX_S = 1.0
#: Fewest voxels accepted along each spatial axis of a volume to reconstruct. The dipole kernel
#: is 3-D: its k-space cone needs several samples along every axis (with 2-4 the inversion is
#: mostly the D(0) = 0 hole and the magic-angle cone), and background removal needs room
#: along every axis too (V-SHARP's and RESHARP's spheres are 2-6 voxels in radius; PDF needs
#: background voxels beyond the brain on every side). A volume thinner than this along one
#: axis (a 2-slice slab, a 2-D image padded to 3-D) has no such extent, and would give a map
#: that looks like chi but is not.
MIN_EXTENT_VOXELS = 8
#: The magnitude of a gradient echo decays with TE (T2*); the median over bright voxels may
#: rise from the first to the last echo by at most this fraction (noise, drift) before the echo
#: order is called into question. Reversed echoes rise by exp(dTE / T2*) - 1: 8 % for
#: 4 ms of echo spacing at T2* = 50 ms, 60-100 % for usual multi-echo protocols.
DECAY_TOLERANCE = 0.05
#: Values within this of an integer count as integers in a mask (scaled 0/255 masks round-trip
#: through float32 with errors near 1e-7).
_MASK_INTEGER_ATOL = 1e-3
#: Largest accepted field strength in tesla (human and preclinical scanners stay below).
B0_MAX_T = 20.0
#: Tolerance when comparing affines of files that should share a grid: converters write each echo
#: separately and float32 rounding differs in the last digits.
AFFINE_ATOL_MM = 1e-3
AFFINE_RTOL = 1e-5


def check_te_s(te_s: float | Sequence[float], source: str,
               max_s: float = TE_MAX_S) -> tuple[float, ...]:
    """Validate echo times in seconds by :func:`qsmnet.physics.units.echo_time_problem`.

    Parameters
    ----------
    te_s : float or sequence of float
        Echo time(s), s.
    source : str
        Where they came from (file or argument), used in messages.
    max_s : float
        Longest accepted echo time (:data:`TE_MAX_S`; :data:`TE_UNUSED_MAX_S` where TE is a
        placeholder). Values of 1 and above are reported as milliseconds.

    Returns
    -------
    tuple of float
    """
    try:
        values = tuple(float(t) for t in np.atleast_1d(np.asarray(te_s, dtype=np.float64)))
    except (TypeError, ValueError) as exc:
        raise QSMInputError(f"{source}: EchoTime {te_s!r} is not a number or list of numbers") \
            from exc
    problem = echo_time_problem(values, max_s)
    if problem is not None:
        raise QSMInputError(f"{source}: {problem}")
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


def check_min_extent(shape: Sequence[int], name: str,
                     min_extent: int = MIN_EXTENT_VOXELS) -> None:
    """Refuse a volume with fewer than ``min_extent`` voxels along a spatial axis."""
    spatial = tuple(int(n) for n in shape[:3])
    thin = [axis for axis, n in enumerate(spatial) if n < min_extent]
    if thin:
        axis = thin[0]
        raise QSMInputError(f"{name}: volume is only {spatial[axis]} voxel(s) along axis {axis} "
                            f"(shape {spatial}); QSM needs at least {min_extent} along every "
                            "axis (the dipole kernel and background removal are 3-D)")


def check_mask(data: np.ndarray, name: str, threshold: float | None = None) -> np.ndarray:
    """Return a 3-D boolean mask; refuse an empty one and, without a threshold, a fractional one.

    Parameters
    ----------
    data : ndarray
        Mask image as read (3-D, or 4-D with one volume).
    name : str
        File name for messages.
    threshold : float, optional
        Binarise explicitly: inside = value > threshold (``--mask-threshold``). Without it the
        values must be integers (0/1, 0/255, a label image): inside = nonzero. Fractional values
        (a probability map, a resampled mask) are refused rather than cut at an arbitrary level,
        and so are negative values.
    """
    arr = check_volume_3d(data, name)
    if threshold is not None:
        if not math.isfinite(float(threshold)):
            raise QSMInputError(f"--mask-threshold: {threshold!r} is not a finite number")
        mask = arr > threshold
        if not mask.any():
            raise QSMInputError(f"{name}: mask is empty (no voxel > {threshold:g}, "
                                "--mask-threshold)")
        log.info("%s: mask binarised at %g (--mask-threshold): %d of %d voxels inside", name,
                 threshold, int(mask.sum()), mask.size)
        return mask
    fractional = np.abs(arr - np.round(arr)) > _MASK_INTEGER_ATOL
    if fractional.any():
        values = arr[fractional]
        raise QSMInputError(
            f"{name}: mask has {int(fractional.sum())} voxel(s) with fractional values in "
            f"[{float(values.min()):.3g}, {float(values.max()):.3g}] (a probability map or a "
            "resampled mask?); pass --mask-threshold T to binarise it (inside: value > T)")
    if float(arr.min()) < 0:
        raise QSMInputError(f"{name}: mask has negative values (min {float(arr.min()):g}); a "
                            "mask is 0 outside and positive inside; pass --mask-threshold T "
                            "to binarise it (inside: value > T)")
    mask = arr != 0
    if not mask.any():
        raise QSMInputError(f"{name}: mask is empty (no nonzero voxel)")
    top = float(arr.max())
    if top != 1.0:
        labels = np.unique(np.round(arr[mask]))
        log.info("%s: mask values %s; every nonzero voxel taken as inside", name,
                 ", ".join(f"{v:g}" for v in labels[:5]) + (", ..." if labels.size > 5 else ""))
    return mask


def check_finite_in_mask(field: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    """A field map with NaN or infinite voxels outside the brain mask (as many tools write
    them) gets 0 there, where nothing reads it; one inside the mask is refused."""
    finite = np.isfinite(field)
    if finite.all():
        return field
    bad_inside = int(np.count_nonzero(~finite & mask))
    if bad_inside:
        raise QSMInputError(f"{name}: {bad_inside} voxel(s) inside the mask are NaN or infinite")
    log.info("%s: %d NaN or infinite voxel(s) outside the mask set to 0", name,
             int(np.count_nonzero(~finite)))
    return np.where(finite, field, 0).astype(field.dtype, copy=False)


def check_mask_has_background(mask: np.ndarray, name: str, hint: str) -> None:
    """Refuse a mask with no background voxel: background-field removal needs some outside."""
    if bool(np.all(mask)):
        raise QSMInputError(f"{name}: mask covers the whole grid ({mask.size} voxels, no "
                            "background), so background-field removal has nothing outside the "
                            f"brain to work with; {hint}")


def check_magnitude_decay(magnitude: np.ndarray, te_s: Sequence[float], name: str,
                          mask: np.ndarray | None = None,
                          tolerance: float = DECAY_TOLERANCE) -> list[float]:
    """Refuse multi-echo magnitude that grows from the first to the last echo.

    T2* decay makes every voxel's magnitude fall with TE; echoes stored in reverse order (TE
    ascending, images descending) make it grow. The statistic is the median over the mask, or
    without one over bright voxels (mean over echoes above 30 % of its 99th percentile), of each
    echo; it is refused when the last echo's exceeds the first's by more than ``tolerance``.

    Returns
    -------
    list of float
        The per-echo medians (empty when there is one echo or nothing bright).
    """
    mag = np.asarray(magnitude)
    if mag.ndim != 4 or mag.shape[0] < 2:
        return []
    if mask is not None:
        region = np.asarray(mask, dtype=bool)
    else:
        ref = mag.mean(axis=0)
        region = ref > 0.3 * float(np.percentile(ref, 99))
    n = int(region.sum())
    if n == 0:
        return []
    medians = [float(np.median(echo[region])) for echo in mag]
    if medians[0] > 0 and medians[-1] > medians[0] * (1.0 + tolerance):
        figures = ", ".join(f"{m:.4g}" for m in medians)
        times = ", ".join(f"{1e3 * t:g}" for t in te_s)
        raise QSMInputError(
            f"{name}: magnitude grows with echo time (median over {n} "
            f"{'mask' if mask is not None else 'bright'} voxels per echo: {figures} at TE "
            f"{times} ms), which T2* decay never does; are the echoes stored in reverse order? "
            "If the order is right, pass --no-decay-check")
    return medians


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
