"""Read multi-echo phase/magnitude given as plain NIfTI files (one 4-D file or one 3-D per echo)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qsmnet.io.acquisition import Acquisition
from qsmnet.io.errors import QSMInputError, display_name
from qsmnet.io.nifti import load_nifti
from qsmnet.io.phase import phase_to_radians
from qsmnet.io.validate import (
    check_b0_dir,
    check_b0_t,
    check_magnitude_decay,
    check_mask,
    check_mask_has_background,
    check_min_extent,
    check_same_grid,
    check_te_s,
    check_volume_echoes,
    voxel_size_from_header,
)
from qsmnet.physics.geometry import b0_dir_from_affine

__all__ = ["EchoSeries", "load_echo_series", "load_mask", "read_nifti_echoes"]

log = logging.getLogger(__name__)

#: Largest difference (mm) between a stated voxel size and the header's that passes unremarked.
VOXEL_MISMATCH_MM = 1e-3
#: Largest angle (degrees) between a stated B0 direction and the affine's that passes unremarked.
B0_DIR_MISMATCH_DEG = 1.0

PathLike = str | os.PathLike
PathOrPaths = PathLike | Sequence[PathLike]


def as_path_list(paths: PathOrPaths | None) -> list[Path]:
    """One path or a sequence of paths as a list of :class:`Path` (empty for None)."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


@dataclass(eq=False)
class EchoSeries:
    """Echoes read from one 4-D file or several 3-D files.

    Attributes
    ----------
    data : (E, X, Y, Z) float32 ndarray
    affine : (4, 4) float64 ndarray
        Affine of the first file.
    header : nibabel header of the first file.
    names : list of str
        File name of each echo (repeated for a 4-D file), for messages.
    messages : list of str
        Lines logged while reading (phase unit conversion).
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any
    names: list[str]
    messages: list[str]


def series_name(paths: Sequence[PathLike]) -> str:
    """How a series of echo files is named in messages: the first, and how many more."""
    first = display_name(paths[0])
    return first if len(paths) == 1 else f"{first} (and {len(paths) - 1} more echo files)"


def load_echo_series(paths: PathOrPaths, kind: str = "phase", phase_units: str = "auto",
                     min_extent: int = 2,
                     phase_rescale: Sequence[tuple[float, float]] | None = None,
                     phase_mrad: bool = False) -> EchoSeries:
    """Load echoes of one kind and check that they share a grid.

    Parameters
    ----------
    paths : path or sequence of paths
        One 3-D file (one echo), one 4-D file (echoes last), or several 3-D files (one per echo,
        in echo order).
    kind : {"phase", "magnitude"}
        Phase is converted to radians when stored in degrees or as integers
        (:func:`phase_to_radians`), the units being decided once on all echoes together.
    phase_units : {"auto", "rad", "deg", "int"}
        See :func:`phase_to_radians` (``--phase-units``).
    min_extent : int
        Fewest voxels along each spatial axis (the CLI passes
        :data:`~qsmnet.io.validate.MIN_EXTENT_VOXELS`; 2 only refuses 2-D images).
    phase_rescale : sequence of (float, float), optional
        One ``(scale, offset)`` per file, applied as ``v * scale + offset`` to the phase values
        before their units are recognised (vendor scalings read from sidecars,
        :func:`~qsmnet.io.phase.sidecar_phase_rescale`).
    phase_mrad : bool
        Let ``auto`` units take milliradians (Philips display values; ``mrad`` of
        :func:`~qsmnet.io.phase.phase_to_radians`).

    Raises
    ------
    QSMInputError
        Missing/unreadable files, 2-D or 5-D images, a 4-D file among several, echoes of
        different shapes or affines, a volume thinner than ``min_extent``, phase whose units
        cannot be told, negative magnitude.
    """
    plist = as_path_list(paths)
    if not plist:
        raise QSMInputError(f"no {kind} files given")
    volumes: list[np.ndarray] = []
    names: list[str] = []
    messages: list[str] = []
    affine0 = header0 = shape0 = None
    for i, path in enumerate(plist):
        name = display_name(path)
        data, affine, header = load_nifti(path)
        echoes = check_volume_echoes(data, name)
        if len(plist) > 1 and echoes.shape[0] > 1:
            raise QSMInputError(f"{name}: 4-D image ({echoes.shape[0]} volumes) given as one of "
                                f"{len(plist)} {kind} files; give one 4-D file or one 3-D file "
                                "per echo")
        if affine0 is None:
            affine0, header0, shape0 = affine, header, echoes.shape[1:]
        else:
            check_same_grid(echoes.shape[1:], affine, shape0, affine0, name,
                            f"echo 1 ({display_name(plist[0])})")
        if kind == "phase" and phase_rescale is not None and tuple(phase_rescale[i]) != (1, 0):
            # float64: the result is rounded once, when the radians are stored as float32
            scale, offset = phase_rescale[i]
            echoes = echoes.astype(np.float64) * scale + offset
        if kind != "phase":
            echoes = echoes.astype(np.float32, copy=False)
            peak = float(np.max(np.abs(echoes)))
            if float(echoes.min()) < -0.01 * peak:
                raise QSMInputError(f"{name}: {kind} has negative values "
                                    f"(min {float(echoes.min()):.3g}); is this a phase image?")
        volumes.append(echoes)
        names.extend([name] * echoes.shape[0])
    stacked = volumes[0] if len(volumes) == 1 else np.concatenate(volumes, axis=0)
    check_min_extent(stacked.shape[1:], series_name(plist), min_extent)
    if kind == "phase":
        stacked, message = phase_to_radians(stacked, series_name(plist), phase_units,
                                            mrad=phase_mrad)
        if message:
            messages.append(message)
    return EchoSeries(np.ascontiguousarray(stacked, dtype=np.float32), affine0, header0, names,
                      messages)


#: What to do about a mask without background, for the readers behind ``qsmnet predict``.
NO_BACKGROUND_HINT = "omit --mask for an automatic one"


def load_mask(path: PathLike, ref_shape: Sequence[int], ref_affine: np.ndarray,
              ref_name: str, threshold: float | None = None, require_background: bool = False,
              background_hint: str = NO_BACKGROUND_HINT) -> np.ndarray:
    """Load a mask on the reference grid; (X, Y, Z) bool.

    Refused: another grid, no voxel inside, fractional values without ``threshold`` (see
    :func:`~qsmnet.io.validate.check_mask`), and, with ``require_background`` (where background
    removal will run), a mask covering the whole grid; ``background_hint`` ends that message.
    """
    name = display_name(path)
    data, affine, _ = load_nifti(path)
    check_same_grid(data.shape, affine, ref_shape, ref_affine, name, ref_name)
    mask = check_mask(data, name, threshold)
    if require_background:
        check_mask_has_background(mask, name, background_hint)
    return mask


def resolve_b0_dir(b0_dir, affine: np.ndarray, source: str) -> np.ndarray:
    """The B0 direction: the explicit one when given (validated), else from the affine.

    An explicit direction more than :data:`B0_DIR_MISMATCH_DEG` from the affine's scanner z is
    used, but with a logged warning: a direction given in scanner rather than array axes is a
    likely slip that nothing else would reveal.
    """
    if b0_dir is None:
        return b0_dir_from_affine(affine)
    stated = check_b0_dir(b0_dir, source)
    from_affine = b0_dir_from_affine(affine)
    # the dipole kernel depends on (k . b0)^2 only: b0 and -b0 are the same direction
    angle = math.degrees(math.acos(min(1.0, abs(float(np.dot(stated, from_affine))))))
    if angle > B0_DIR_MISMATCH_DEG:
        log.warning("%s: B0 direction %s (array axes) is %.1f degrees from the affine's scanner "
                    "z %s; using the stated one", source, np.round(stated, 4).tolist(), angle,
                    np.round(from_affine, 4).tolist())
    return stated


def default_name(path: Path) -> str:
    """Acquisition name from a file name: the name without ``.nii[.gz]``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_scan_arguments(te_s, b0_t, phase_sign: int):
    """Checked ``(te_s, b0_t)``; refuses missing ones and a ``phase_sign`` other than +-1."""
    if te_s is None:
        raise QSMInputError("--te: echo times (s) are required for phase input")
    if b0_t is None:
        raise QSMInputError("--b0: field strength (T) is required for phase input")
    if phase_sign not in (1, -1, None):
        raise QSMInputError(f"--phase-sign: must be 1 or -1, got {phase_sign!r}")
    return check_te_s(te_s, "--te"), check_b0_t(b0_t, "--b0")


def _read_magnitude(magnitude_paths: PathOrPaths | None, phase, first: str):
    """The magnitude echoes on the phase grid (same echo count), or None if not given."""
    if magnitude_paths is None or not as_path_list(magnitude_paths):
        return None
    mag = load_echo_series(magnitude_paths, "magnitude")
    mag_first = display_name(as_path_list(magnitude_paths)[0])
    if mag.data.shape[0] != phase.data.shape[0]:
        raise QSMInputError(f"{mag_first}: {mag.data.shape[0]} magnitude echo(es) but "
                            f"{phase.data.shape[0]} phase echo(es)")
    check_same_grid(mag.data.shape[1:], mag.affine, phase.data.shape[1:], phase.affine,
                    mag_first, f"phase ({first})")
    return mag.data


def resolve_voxel_size(voxel_size_mm: Sequence[float] | None, header, first: str) -> np.ndarray:
    """The stated voxel size (params.json ``voxel_size``; checked, and warned about if it differs
    from the header's) or the header's."""
    if voxel_size_mm is None:
        return voxel_size_from_header(header, first)
    voxel = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
    if voxel.shape != (3,) or not np.all(np.isfinite(voxel)) or np.any(voxel <= 0):
        raise QSMInputError(f"voxel size {list(voxel_size_mm)} must be 3 positive numbers (mm)")
    try:
        header_voxel = voxel_size_from_header(header, first)
    except QSMInputError:  # the header has none worth comparing with
        header_voxel = voxel
    if np.max(np.abs(voxel - header_voxel)) > VOXEL_MISMATCH_MM:
        # as the QSM-CI reader does: the stated size wins, but not silently
        log.warning("voxel size %s (params.json voxel_size) differs from the header of %s "
                    "(%s); using the stated one", voxel.tolist(), first,
                    header_voxel.tolist())
    return voxel


def read_nifti_echoes(phase_paths: PathOrPaths, magnitude_paths: PathOrPaths | None = None,
                      te_s: float | Sequence[float] | None = None, b0_t: float | None = None,
                      b0_dir: Sequence[float] | None = None, mask_path: PathLike | None = None,
                      phase_sign: int = 1, name: str | None = None,
                      voxel_size_mm: Sequence[float] | None = None, phase_units: str = "auto",
                      mask_threshold: float | None = None, decay_check: bool = True,
                      min_extent: int = 2, require_background: bool = False) -> Acquisition:
    """Read a multi-echo GRE acquisition from plain NIfTI files.

    Parameters
    ----------
    phase_paths : path or sequence of paths
        One 4-D NIfTI (echoes last) or one 3-D NIfTI per echo, in echo order. Radians, degrees or
        integer raw phase (converted, with a logged line; see ``phase_units``).
    magnitude_paths : path or sequence of paths, optional
        Same layout as the phase; same shape and affine.
    te_s : float or sequence of float
        Echo times, s, one per echo (required).
    b0_t : float
        Field strength, T (required).
    b0_dir : (3,) sequence, optional
        B0 direction in array axes; default: from the phase affine
        (:func:`qsmnet.physics.geometry.b0_dir_from_affine`).
    mask_path : path, optional
        Brain mask on the phase grid.
    phase_sign : {1, -1} or None
        Vendor polarity (see :class:`Acquisition`); None (``--phase-sign`` not given) is +1,
        as plain NIfTI files carry no vendor.
    name : str, optional
        Acquisition name; default: the first phase file's name without extension.
    voxel_size_mm : (3,) sequence, optional
        Overrides the header zooms (e.g. from a params.json); mm.
    phase_units : {"auto", "rad", "deg", "int"}
        Units of the phase (:func:`~qsmnet.io.phase.phase_to_radians`; ``--phase-units``).
    mask_threshold : float, optional
        Binarise the mask at this value (inside: > T); without it a mask with fractional values
        is refused (``--mask-threshold``).
    decay_check : bool
        Refuse magnitude that grows from the first to the last echo (echoes in reverse order;
        :func:`~qsmnet.io.validate.check_magnitude_decay`); False is ``--no-decay-check``.
    min_extent : int
        Fewest voxels along each axis (the CLI passes
        :data:`~qsmnet.io.validate.MIN_EXTENT_VOXELS`).
    require_background : bool
        Refuse a mask covering the whole grid (the CLI passes True: ``predict`` always removes
        the background).

    Returns
    -------
    Acquisition

    Raises
    ------
    QSMInputError
        For every bad input, naming the file or argument.
    """
    plist = as_path_list(phase_paths)
    te, b0 = _check_scan_arguments(te_s, b0_t, phase_sign)
    phase = load_echo_series(plist, "phase", phase_units, min_extent)
    first = display_name(plist[0])
    if phase.data.shape[0] != len(te):
        raise QSMInputError(f"{first}: {phase.data.shape[0]} phase echo(es) but {len(te)} echo "
                            f"time(s) given ({list(te)})")
    magnitude = _read_magnitude(magnitude_paths, phase, first)
    mask = None
    if mask_path is not None:
        mask = load_mask(mask_path, phase.data.shape[1:], phase.affine, f"phase ({first})",
                         mask_threshold, require_background)
    if magnitude is not None and decay_check:
        check_magnitude_decay(magnitude, te, series_name(as_path_list(magnitude_paths)), mask)
    voxel = resolve_voxel_size(voxel_size_mm, phase.header, first)
    return Acquisition(
        phase=phase.data, magnitude=magnitude, mask=mask, te_s=te, b0_t=b0,
        b0_dir=resolve_b0_dir(b0_dir, phase.affine, "--b0-dir"), voxel_size_mm=voxel,
        affine=phase.affine, header=phase.header, source=os.fspath(plist[0]),
        name=name or default_name(plist[0]),
        phase_sign=1 if phase_sign is None else int(phase_sign))
