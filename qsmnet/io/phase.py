"""Raw phase to radians.

Scanners and converters store phase either in radians or as integers: Siemens 12-bit
``0..4095`` or ``-4096..4095``, other vendors other powers of two. Conventions
(``shared/qsm-conventions.md``): integer raw phase is rescaled to [-pi, pi) and a line says so;
phase already in radians is left untouched; anything else is refused rather than guessed.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from qsmnet.io.errors import QSMInputError

__all__ = ["PHASE_RADIAN_TOL", "integer_phase_range", "phase_to_radians"]

log = logging.getLogger(__name__)

#: Slack (rad) around [-pi, pi] still accepted as "already in radians": float32 rounding and
#: converters that scale integers by 2*pi/4095 instead of 2*pi/4096 overshoot pi slightly.
PHASE_RADIAN_TOL = 0.01


def integer_phase_range(vmin: float, vmax: float) -> tuple[int, int]:
    """Nominal integer range ``[lo, hi]`` that integer phase with these extremes was stored in.

    The range is the smallest power-of-two span holding the data: unsigned ``[0, 2**n - 1]`` when
    ``vmin >= 0``, signed ``[-2**n, 2**n - 1]`` otherwise. Real data rarely hits both extremes,
    so the nominal range (not the observed one) fixes the map; e.g. values in 3..4090 give
    ``[0, 4095]`` and values in -4000..4095 give ``[-4096, 4095]``.
    """
    if vmin >= 0:
        bits = max(1, math.ceil(math.log2(vmax + 1.0)))
        return 0, 2**bits - 1
    bits = max(1, math.ceil(math.log2(max(-vmin, vmax + 1.0))))
    return -(2**bits), 2**bits - 1


def phase_to_radians(phase: np.ndarray, name: str = "phase") -> tuple[np.ndarray, str | None]:
    """Return phase in radians, rescaling integer raw phase to [-pi, pi).

    Parameters
    ----------
    phase : ndarray, any shape
        Phase as read from the file (nibabel scaling already applied).
    name : str
        File or argument name used in messages.

    Returns
    -------
    phase_rad : float32 ndarray, same shape
        Unchanged values when already within [-pi - tol, pi + tol]; otherwise integer values in the
        nominal range ``[lo, hi]`` (:func:`integer_phase_range`) mapped linearly as
        ``(v - lo) / (hi - lo + 1) * 2*pi - pi``, so ``lo -> -pi`` and ``hi -> pi - step``
        (for ``[-4096, 4095]`` this is ``v * pi / 4096``).
    message : str or None
        The line that was logged when rescaling happened, e.g.
        ``"sub-01_echo-1_part-phase_MEGRE.nii.gz: phase looks like integers in [0, 4095];
        rescaled to radians"``; None when the phase was already in radians.

    Raises
    ------
    QSMInputError
        Non-integer values outside [-pi - tol, pi + tol] ("not in radians"), or non-finite values.
    """
    arr = np.asarray(phase)
    if arr.size == 0:
        raise QSMInputError(f"{name}: phase image is empty")
    if not np.all(np.isfinite(arr)):
        raise QSMInputError(f"{name}: phase has NaN or infinite values")
    vmin, vmax = float(arr.min()), float(arr.max())
    if vmin >= -math.pi - PHASE_RADIAN_TOL and vmax <= math.pi + PHASE_RADIAN_TOL:
        return arr.astype(np.float32, copy=False), None
    if not np.all(arr == np.round(arr)):
        raise QSMInputError(
            f"{name}: phase values span [{vmin:.4g}, {vmax:.4g}], which is not in radians "
            "([-pi, pi]) and not integer raw phase; rescale it to radians first")
    lo, hi = integer_phase_range(vmin, vmax)
    # float64 for the map so that lo..hi land exactly on the grid of 2*pi/(hi-lo+1) steps.
    rad = (arr.astype(np.float64) - lo) * (2.0 * math.pi / (hi - lo + 1)) - math.pi
    rad = rad.astype(np.float32)
    # Fine ranges can round pi - step up to float32(pi), which is > pi: keep the interval half-open.
    below_pi = np.nextafter(np.float32(math.pi), np.float32(0.0))
    rad = np.minimum(rad, below_pi)
    message = f"{name}: phase looks like integers in [{lo}, {hi}]; rescaled to radians"
    log.info(message)
    return rad, message
