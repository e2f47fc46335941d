"""Raw phase to radians.

Scanners and converters store phase in radians, in degrees, or as integers: Siemens 12-bit
``0..4095`` or ``-4096..4095``, other vendors other powers of two. Conventions
(``docs/conventions.md``): phase already in radians is left untouched; other units are
converted and a line says so; anything ambiguous is refused rather than guessed.

The units are recognised by how the data fill a nominal range: wrapped phase of a head (and its
noisy background) fills nearly all of it. Integers spanning about 360 inside [-180, 180] are
degrees, not 9-bit raw phase (which would span about 512); integers spanning about 4096 are
12-bit raw phase. ``units`` (``--phase-units``) overrides the guess.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from qsmnet.io.errors import QSMInputError

__all__ = ["PHASE_FILL_MIN", "PHASE_RADIAN_TOL", "PHASE_UNITS", "integer_phase_range",
           "phase_to_radians"]

log = logging.getLogger(__name__)

#: Slack (rad) around [-pi, pi] still accepted as "already in radians": float32 rounding and
#: converters that scale integers by 2*pi/4095 instead of 2*pi/4096 overshoot pi slightly.
PHASE_RADIAN_TOL = 0.01
#: Slack (degrees) around [-180, 180] and [0, 360].
PHASE_DEGREE_TOL = 0.5
#: Units ``phase_to_radians`` (and ``--phase-units``) accept; ``auto`` recognises them.
PHASE_UNITS = ("auto", "rad", "deg", "int")
#: Fraction of a nominal range (360 degrees, 2*pi, or an integer power-of-two range) that the
#: phase values must span for ``auto`` to take them for that unit. Wrapped phase spans ~100 %;
#: degrees seen as 9-bit integers span 360/512 = 70 %, so the two never both pass.
PHASE_FILL_MIN = 0.8
#: Fewest levels (hi - lo + 1) of an integer range ``auto`` takes for raw phase: a handful of
#: integer values is not a phase image.
_INT_MIN_LEVELS = 256
_OVERRIDE = "pass --phase-units rad, deg or int to say which"


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


def _wrap(rad: np.ndarray) -> np.ndarray:
    """float64 radians outside [-pi, pi] wrapped into [-pi, pi); values inside left as they are."""
    out = (rad < -math.pi) | (rad > math.pi)
    if out.any():
        rad = rad.copy()
        rad[out] = np.mod(rad[out] + math.pi, 2.0 * math.pi) - math.pi
    return rad


def _integer_to_radians(arr: np.ndarray, lo: int, hi: int) -> np.ndarray:
    # float64 for the map so that lo..hi land exactly on the grid of 2*pi/(hi-lo+1) steps.
    rad = (arr.astype(np.float64) - lo) * (2.0 * math.pi / (hi - lo + 1)) - math.pi
    rad = rad.astype(np.float32)
    # Fine ranges can round pi - step up to float32(pi), which is > pi: keep the interval half-open.
    below_pi = np.nextafter(np.float32(math.pi), np.float32(0.0))
    return np.minimum(rad, below_pi)


def _degree_range(vmin: float, vmax: float) -> tuple[int, int] | None:
    """The degree range ([-180, 180] or [0, 360]) holding ``vmin..vmax``, or None."""
    tol = PHASE_DEGREE_TOL
    if vmin >= -180.0 - tol and vmax <= 180.0 + tol:
        return -180, 180
    if vmin >= -tol and vmax <= 360.0 + tol:
        return 0, 360
    return None


def _guess_units(name: str, vmin: float, vmax: float, is_int: bool, values: str
                 ) -> tuple[str, str | None]:
    """``(units, why)`` for phase not in [-pi, pi] under ``units="auto"``; refuses unclear ones."""
    span = vmax - vmin
    if not is_int and vmin >= -PHASE_RADIAN_TOL and vmax <= 2 * math.pi + PHASE_RADIAN_TOL \
            and span >= PHASE_FILL_MIN * 2 * math.pi:
        units, why = "rad", f"phase values {values} fill [0, 2*pi]: taken as radians"
    else:
        degrees = _degree_range(vmin, vmax)
        lo, hi = integer_phase_range(vmin, vmax) if is_int else (0, 0)
        deg_fill = span / 360.0
        int_fill = span / (hi - lo) if hi > lo else 0.0
        if degrees is not None and deg_fill >= PHASE_FILL_MIN:
            units = "deg"
            why = (f"phase values {values} fill the degree range [{degrees[0]}, "
                   f"{degrees[1]}] ({100 * deg_fill:.0f} % of 360): taken as degrees")
        elif is_int and hi - lo + 1 >= _INT_MIN_LEVELS and int_fill >= PHASE_FILL_MIN:
            units, why = "int", None
        elif is_int:
            levels = hi - lo + 1
            fills = [f"integer raw phase [{lo}, {hi}] ({100 * int_fill:.0f} %)"
                     if levels >= _INT_MIN_LEVELS else
                     f"integer raw phase (only {levels} levels in [{lo}, {hi}])"]
            if degrees is not None:
                fills.insert(0, f"degrees [{degrees[0]}, {degrees[1]}] "
                                f"({100 * deg_fill:.0f} %)")
            raise QSMInputError(
                f"{name}: integer phase values span {values}, which is not in radians and "
                f"fills no nominal range well ({' nor '.join(fills)}; wrapped phase fills "
                f"over {100 * PHASE_FILL_MIN:.0f} %), so its units are unclear; "
                f"{_OVERRIDE}")
        else:
            raise QSMInputError(
                f"{name}: phase values span {values}, which is not in radians ([-pi, pi]), "
                "nor degrees filling [-180, 180] or [0, 360], nor integer raw phase; "
                f"rescale it to radians first, or {_OVERRIDE}")
    return units, why


def phase_to_radians(phase: np.ndarray, name: str = "phase", units: str = "auto"
                     ) -> tuple[np.ndarray, str | None]:
    """Return phase in radians, converting degrees and integer raw phase.

    Parameters
    ----------
    phase : ndarray, any shape
        Phase as read from the file(s) (nibabel scaling already applied); all echoes of one
        series together, so that the units are decided once, on every echo.
    name : str
        File or argument name used in messages.
    units : {"auto", "rad", "deg", "int"}
        ``auto``: radians when within [-pi - tol, pi + tol]; otherwise the unit whose nominal
        range the values fill (at least :data:`PHASE_FILL_MIN` of it): radians in [0, 2*pi]
        (wrapped), degrees in [-180, 180] or [0, 360] (``v * pi / 180``, wrapped), or integers
        in the power-of-two range of :func:`integer_phase_range`; refused when none fits.
        ``rad``: radians, wrapped into [-pi, pi) where outside. ``deg``: ``v * pi / 180``,
        wrapped. ``int``: integer raw phase (refused if not integer-valued).

    Returns
    -------
    phase_rad : float32 ndarray, same shape
        Radians unchanged when already within [-pi - tol, pi + tol]; integer values in the
        nominal range ``[lo, hi]`` mapped linearly as ``(v - lo) / (hi - lo + 1) * 2*pi - pi``,
        so ``lo -> -pi`` and ``hi -> pi - step`` (for ``[-4096, 4095]`` this is
        ``v * pi / 4096``); degrees as ``v * pi / 180`` (values above 180 less 2*pi).
    message : str or None
        The line that was logged when a conversion happened, e.g.
        ``"sub-01_echo-1_part-phase_MEGRE.nii.gz: phase looks like integers in [0, 4095];
        rescaled to radians"``; None when the phase was already in radians.

    Raises
    ------
    QSMInputError
        Values that fit no unit under ``auto`` ("not in radians", naming ``--phase-units``),
        non-integer values with ``units="int"``, an unknown ``units``, or non-finite values.
    """
    if units not in PHASE_UNITS:
        raise QSMInputError(f"--phase-units: {units!r} is not one of {', '.join(PHASE_UNITS)}")
    arr = np.asarray(phase)
    if arr.size == 0:
        raise QSMInputError(f"{name}: phase image is empty")
    if not np.all(np.isfinite(arr)):
        raise QSMInputError(f"{name}: phase has NaN or infinite values")
    vmin, vmax = float(arr.min()), float(arr.max())
    in_radians = vmin >= -math.pi - PHASE_RADIAN_TOL and vmax <= math.pi + PHASE_RADIAN_TOL
    is_int = bool(np.all(arr == np.round(arr)))
    values = f"[{vmin:.4g}, {vmax:.4g}]"
    guessed = units == "auto"

    if units == "auto":
        if in_radians:
            return arr.astype(np.float32, copy=False), None
        units, why = _guess_units(name, vmin, vmax, is_int, values)
    else:
        why = f"phase taken as {dict(rad='radians', deg='degrees', int='integers')[units]} " \
              "(--phase-units)"

    if units == "rad":
        if in_radians:
            return arr.astype(np.float32, copy=False), None
        rad = _wrap(arr.astype(np.float64)).astype(np.float32)
        message = f"{name}: {why}, wrapped to [-pi, pi)"
    elif units == "deg":
        rad = _wrap(arr.astype(np.float64) * (math.pi / 180.0)).astype(np.float32)
        message = f"{name}: {why}; converted to radians (v * pi / 180)"
    else:
        if not is_int:
            raise QSMInputError(f"{name}: --phase-units int, but the phase has non-integer "
                                f"values (span {values})")
        lo, hi = integer_phase_range(vmin, vmax)
        rad = _integer_to_radians(arr, lo, hi)
        message = f"{name}: phase looks like integers in [{lo}, {hi}]; rescaled to radians"
        if why is not None:
            message = f"{name}: {why} in [{lo}, {hi}]; rescaled to radians"
    if guessed and units != "int":
        message += "; --phase-units overrides"
    log.info(message)
    return rad, message
