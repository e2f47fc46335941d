"""Raw phase to radians.

Scanners and converters store phase in radians, in degrees, or as integers: Siemens 12-bit
``0..4095`` or ``-4096..4095``, other vendors other powers of two. Conventions
(``docs/conventions.md``): phase already in radians is left untouched; other units are
converted and a line says so; anything ambiguous is refused rather than guessed.

The units are recognised by how the data fill a nominal range: wrapped phase of a head (and its
noisy background) fills nearly all of it. Integers spanning about 360 inside [-180, 180] are
degrees, not 9-bit raw phase (which would span about 512); integers spanning about 4096 are
12-bit raw phase. Milliradians (values spanning about 2000*pi inside [-1000*pi, 1000*pi]) are
recognised only where a vendor is known to store them (Philips display values): elsewhere such
integers are as likely raw phase of another range, and are refused. ``units``
(``--phase-units``) overrides the guess.

Vendor conventions read from the JSON sidecars that dcm2niix writes
(:func:`sidecar_phase_rescale`, :func:`phase_sign_from_sidecar`): Philips phase, whatever
intensity scaling dcm2niix gave it, is taken back to the display values, in milliradians;
GE phase decreases with the field, so its sign is flipped unless ``--phase-sign`` is given.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from qsmnet.io.errors import QSMInputError

__all__ = ["PHASE_FILL_MIN", "PHASE_RADIAN_TOL", "PHASE_UNITS", "integer_phase_range",
           "nifti_stored_scaling", "phase_sign_from_sidecar", "phase_to_radians",
           "sidecar_phase_rescale"]

log = logging.getLogger(__name__)

#: Slack (rad) around [-pi, pi] still accepted as "already in radians": float32 rounding and
#: converters that scale integers by 2*pi/4095 instead of 2*pi/4096 overshoot pi slightly.
PHASE_RADIAN_TOL = 0.01
#: Slack (degrees) around [-180, 180] and [0, 360].
PHASE_DEGREE_TOL = 0.5
#: Slack (mrad) around [-1000*pi, 1000*pi]: Philips display values reach +-3142 (rounded pi).
PHASE_MRAD_TOL = 2.0
#: Units ``phase_to_radians`` (and ``--phase-units``) accept; ``auto`` recognises them.
PHASE_UNITS = ("auto", "rad", "deg", "int", "mrad")
#: Fraction of a nominal range (360 degrees, 2*pi, or an integer power-of-two range) that the
#: phase values must span for ``auto`` to take them for that unit. Wrapped phase spans ~100 %;
#: degrees seen as 9-bit integers span 360/512 = 70 %, so the two never both pass.
PHASE_FILL_MIN = 0.8
#: Fewest levels (hi - lo + 1) of an integer range ``auto`` takes for raw phase: a handful of
#: integer values is not a phase image.
_INT_MIN_LEVELS = 256
_UNIT_NAMES = {"rad": "radians", "deg": "degrees", "int": "integers", "mrad": "milliradians"}
_OVERRIDE = "pass --phase-units rad, deg, int or mrad to say which"
#: Pre-unwrapped phase (float radians past [-pi, pi]) cannot be told from scaled phase by its
#: values, so ``auto`` refuses it; ``rad`` wraps it, which qsmnet's own unwrapping then undoes.
_UNWRAPPED_HINT = ("for phase already unwrapped, in radians (e.g. by ROMEO), pass --phase-units "
                   "rad, which wraps it to [-pi, pi) before qsmnet unwraps it")


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


def _in_mrad_range(vmin: float, vmax: float) -> bool:
    bound = 1000.0 * math.pi + PHASE_MRAD_TOL
    return vmin >= -bound and vmax <= bound


def _guess_units(name: str, vmin: float, vmax: float, is_int: bool, values: str,
                 mrad: bool = False) -> tuple[str, str | None]:
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
        elif mrad and _in_mrad_range(vmin, vmax) and span >= PHASE_FILL_MIN * 2000 * math.pi:
            units = "mrad"
            why = (f"phase values {values} fill [-1000*pi, 1000*pi] "
                   f"({100 * span / (2000 * math.pi):.0f} %): taken as milliradians")
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
                "nor degrees filling [-180, 180] or [0, 360], nor integer raw phase, nor "
                "milliradians filling [-1000*pi, 1000*pi]; "
                f"rescale it to radians first, or {_OVERRIDE}; {_UNWRAPPED_HINT}")
    return units, why


def phase_to_radians(phase: np.ndarray, name: str = "phase", units: str = "auto",
                     mrad: bool = False) -> tuple[np.ndarray, str | None]:
    """Return phase in radians, converting degrees and integer raw phase.

    Parameters
    ----------
    phase : ndarray, any shape
        Phase as read from the file(s) (nibabel scaling already applied); all echoes of one
        series together, so that the units are decided once, on every echo.
    name : str
        File or argument name used in messages.
    units : {"auto", "rad", "deg", "int", "mrad"}
        ``auto``: radians when within [-pi - tol, pi + tol]; otherwise the unit whose nominal
        range the values fill (at least :data:`PHASE_FILL_MIN` of it): radians in [0, 2*pi]
        (wrapped), degrees in [-180, 180] or [0, 360], integers in the power-of-two range of
        :func:`integer_phase_range`, or (with ``mrad``) milliradians in [-1000*pi, 1000*pi];
        refused when none fits. ``rad``: radians, wrapped into [-pi, pi) where outside (phase
        unwrapped elsewhere, which the field mapping unwraps again). ``deg``:
        ``v * pi / 180``, ``mrad``: ``v / 1000``, wrapped. ``int``: integer raw phase
        (refused if not integer-valued).
    mrad : bool
        ``auto`` may take milliradians (the caller knows the vendor stores them: Philips).

    Returns
    -------
    phase_rad : float32 ndarray, same shape
        Radians unchanged when already within [-pi - tol, pi + tol]; integer values in the
        nominal range ``[lo, hi]`` mapped linearly as ``(v - lo) / (hi - lo + 1) * 2*pi - pi``,
        so ``lo -> -pi`` and ``hi -> pi - step`` (for ``[-4096, 4095]`` this is
        ``v * pi / 4096``); degrees as ``v * pi / 180`` (values above 180 less 2*pi).
    message : str or None
        The line logged when a conversion happened (e.g. ``"ph.nii.gz: phase looks like
        integers in [0, 4095]; rescaled to radians"``); None for phase already in radians.

    Raises
    ------
    QSMInputError
        Values fitting no unit under ``auto`` (naming ``--phase-units``), non-integers with
        ``units="int"``, an unknown ``units``, non-finite values.
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
        units, why = _guess_units(name, vmin, vmax, is_int, values, mrad)
    else:
        why = f"phase taken as {_UNIT_NAMES[units]} (--phase-units)"

    if units == "rad":
        if in_radians:
            return arr.astype(np.float32, copy=False), None
        rad = _wrap(arr.astype(np.float64)).astype(np.float32)
        message = f"{name}: {why}, wrapped to [-pi, pi)"
    elif units in ("deg", "mrad"):
        factor, how = (math.pi / 180.0, "v * pi / 180") if units == "deg" else (1e-3, "v / 1000")
        rad = _wrap(arr.astype(np.float64) * factor).astype(np.float32)
        message = f"{name}: {why}; converted to radians ({how})"
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


def _number(meta: dict, key: str, sidecar: str) -> float:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise QSMInputError(f"{sidecar}: {key} is {value!r}, not a finite number")
    return float(value)


def _is_philips(meta: dict) -> bool:
    return "philips" in str(meta.get("Manufacturer", "")).lower() \
        or "PhilipsScaleSlope" in meta


def nifti_stored_scaling(path) -> tuple[float, float] | None:
    """``(scl_slope, scl_inter)`` of a NIfTI that stores integers, else None (floats stored).

    Read from the header only; a missing scaling is ``(1, 0)``.
    """
    import nibabel as nib  # the readers import it anyway; kept out of this module's import

    try:
        img = nib.load(path)
    except Exception as exc:  # noqa: BLE001 - any nibabel failure is an unreadable file
        raise QSMInputError(f"{getattr(path, 'name', path)}: cannot read as NIfTI ({exc})") \
            from exc
    if not np.issubdtype(img.get_data_dtype(), np.integer):
        return None
    slope, inter = img.dataobj.slope, img.dataobj.inter
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope, inter


def sidecar_phase_rescale(meta: dict, sidecar: str,
                          stored_scaling: tuple[float, float] | None = None
                          ) -> tuple[tuple[float, float], str | None]:
    """Affine map ``D = scale * v + offset`` from a phase image's NIfTI values ``v`` to the
    vendor's display values ``D``.

    Philips images carry three intensity scalings, and dcm2niix records them in the sidecar
    (``R`` the stored integer, ``RS``/``RI`` the DICOM rescale slope/intercept
    ``PhilipsRescaleSlope``/``PhilipsRescaleIntercept``, ``SS`` the private scale slope
    ``PhilipsScaleSlope``): display ``D = R * RS + RI``, precise ``P = D / (RS * SS)``, and
    real-world values (``PhilipsRWVSlope``). Philips phase display values are milliradians
    (``RescaleType`` "mrad", ``+-3142``); the precise values dcm2niix writes by default
    (``UsePhilipsFloatNotDisplayScaling`` 1) are close to radians but not equal to them
    (``RS * SS / 1000`` is e.g. ``1.53455 * 651.74 / 1000 = 1.00013``), so they are taken back:

    * the NIfTI stores integers (``stored_scaling`` = its ``(scl_slope, scl_inter)``): these are
      ``R``, whatever scaling dcm2niix put in the header, so ``D = (v - scl_inter) / scl_slope *
      RS + RI`` exactly (dcm2niix rounds its precise ``scl_slope`` in float32, which would
      otherwise leave up to ~4e-4 rad at the top of the range);
    * floats with precise scaling: ``D = v * RS * SS``;
    * floats with display scaling (flag 0), and real-world values (which dcm2niix prefers when
      present): kept.

    The units of ``D`` are then recognised from its range by :func:`phase_to_radians`.

    Parameters
    ----------
    meta : dict
        The image's JSON sidecar (BIDS inheritance applied).
    sidecar : str
        Its name, for messages.
    stored_scaling : (float, float) or None
        :func:`nifti_stored_scaling` of the image.

    Returns
    -------
    (scale, offset) : (float, float)
        ``(1, 0)`` for non-Philips images, real-world values and float display values.
    message : str or None
        What was done (logged), None when nothing.

    Raises
    ------
    QSMInputError
        A Philips sidecar whose slopes are needed but missing, not numbers or zero.
    """
    if not _is_philips(meta) or "PhilipsRWVSlope" in meta:
        return (1.0, 0.0), None
    flag = meta.get("UsePhilipsFloatNotDisplayScaling")
    if flag is None and stored_scaling is None:
        return (1.0, 0.0), None
    if flag is not None and flag not in (0, 1):
        raise QSMInputError(f"{sidecar}: UsePhilipsFloatNotDisplayScaling is {flag!r}, not 0 or 1")
    slope = _number(meta, "PhilipsRescaleSlope", sidecar)
    if stored_scaling is not None:
        intercept = _number(meta, "PhilipsRescaleIntercept", sidecar)
        scl_slope, scl_inter = stored_scaling
        scale, offset = slope / scl_slope, intercept - scl_inter * slope / scl_slope
        how = (f"stored integers times PhilipsRescaleSlope {slope:g} plus "
               f"PhilipsRescaleIntercept {intercept:g}")
    elif flag == 1:
        scale_slope = _number(meta, "PhilipsScaleSlope", sidecar)
        scale, offset = slope * scale_slope, 0.0
        how = f"precise values times PhilipsRescaleSlope * PhilipsScaleSlope = {scale:.6g}"
    else:
        return (1.0, 0.0), None
    if scale == 0:
        raise QSMInputError(f"{sidecar}: a Philips slope is zero; the phase scaling cannot be "
                            "undone")
    message = f"{sidecar}: Philips phase: {how} give the display values"
    log.info(message)
    return (scale, offset), message


def phase_sign_from_sidecar(meta: dict, sidecar: str, phase_sign: int | None = None
                            ) -> tuple[int, str | None]:
    """The phase polarity of an acquisition: the stated one, else the vendor's.

    GE scanners store phase that decreases with the field (the opposite of qsmnet's
    convention, ``docs/conventions.md``), so a sidecar whose ``Manufacturer`` starts with "GE"
    gives -1; every other vendor +1. ``phase_sign`` (``--phase-sign``) given explicitly wins.

    Returns
    -------
    phase_sign : {1, -1}
    message : str or None
        The logged line when the sign was flipped for GE; None otherwise.
    """
    if phase_sign is not None:
        if phase_sign not in (1, -1):
            raise QSMInputError(f"--phase-sign: must be 1 or -1, got {phase_sign!r}")
        return int(phase_sign), None
    manufacturer = str(meta.get("Manufacturer", "")).strip()
    if manufacturer.upper().startswith("GE"):
        message = (f"{sidecar}: Manufacturer {manufacturer!r}: GE phase decreases with the "
                   "field, so its sign is flipped (phase_sign -1; --phase-sign 1 overrides)")
        log.info(message)
        return -1, message
    return 1, None
