"""Read multi-echo phase/magnitude given as plain NIfTI files (one 4-D file or one 3-D per echo)."""

from __future__ import annotations

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
    check_mask,
    check_same_grid,
    check_te_s,
    check_volume_echoes,
    voxel_size_from_header,
)
from qsmnet.physics.geometry import b0_dir_from_affine

__all__ = ["EchoSeries", "load_echo_series", "load_mask", "read_nifti_echoes"]

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
        Lines logged while reading (integer phase rescaling).
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any
    names: list[str]
    messages: list[str]


def load_echo_series(paths: PathOrPaths, kind: str = "phase") -> EchoSeries:
    """Load echoes of one kind and check that they share a grid.

    Parameters
    ----------
    paths : path or sequence of paths
        One 3-D file (one echo), one 4-D file (echoes last), or several 3-D files (one per echo,
        in echo order).
    kind : {"phase", "magnitude"}
        Phase is rescaled to radians when stored as integers (:func:`phase_to_radians`).

    Raises
    ------
    QSMInputError
        Missing/unreadable files, 2-D or 5-D images, a 4-D file among several, echoes of
        different shapes or affines, phase not in radians, negative magnitude.
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
        if kind == "phase":
            echoes, message = phase_to_radians(echoes, name)
            if message:
                messages.append(message)
        else:
            echoes = echoes.astype(np.float32, copy=False)
            peak = float(np.max(np.abs(echoes)))
            if float(echoes.min()) < -0.01 * peak:
                raise QSMInputError(f"{name}: {kind} has negative values "
                                    f"(min {float(echoes.min()):.3g}); is this a phase image?")
        volumes.append(echoes)
        names.extend([name] * echoes.shape[0])
    stacked = volumes[0] if len(volumes) == 1 else np.concatenate(volumes, axis=0)
    return EchoSeries(np.ascontiguousarray(stacked, dtype=np.float32), affine0, header0, names,
                      messages)


def load_mask(path: PathLike, ref_shape: Sequence[int], ref_affine: np.ndarray,
              ref_name: str) -> np.ndarray:
    """Load a mask and check it lies on the reference grid and is not empty; (X, Y, Z) bool."""
    name = display_name(path)
    data, affine, _ = load_nifti(path)
    mask = check_mask(data, name)
    check_same_grid(mask.shape, affine, ref_shape, ref_affine, name, ref_name)
    return mask


def resolve_b0_dir(b0_dir, affine: np.ndarray, source: str) -> np.ndarray:
    """The B0 direction: the explicit one when given (validated), else from the affine."""
    if b0_dir is not None:
        return check_b0_dir(b0_dir, source)
    return b0_dir_from_affine(affine)


def default_name(path: Path) -> str:
    """Acquisition name from a file name: the name without ``.nii[.gz]``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_nifti_echoes(phase_paths: PathOrPaths, magnitude_paths: PathOrPaths | None = None,
                      te_s: float | Sequence[float] | None = None, b0_t: float | None = None,
                      b0_dir: Sequence[float] | None = None, mask_path: PathLike | None = None,
                      phase_sign: int = 1, name: str | None = None,
                      voxel_size_mm: Sequence[float] | None = None) -> Acquisition:
    """Read a multi-echo GRE acquisition from plain NIfTI files.

    Parameters
    ----------
    phase_paths : path or sequence of paths
        One 4-D NIfTI (echoes last) or one 3-D NIfTI per echo, in echo order. Radians, or integer
        raw phase (rescaled, with a logged line).
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
    phase_sign : {1, -1}
        Vendor polarity (see :class:`Acquisition`).
    name : str, optional
        Acquisition name; default: the first phase file's name without extension.
    voxel_size_mm : (3,) sequence, optional
        Overrides the header zooms (e.g. from a params.json); mm.

    Returns
    -------
    Acquisition

    Raises
    ------
    QSMInputError
        For every bad input, naming the file or argument.
    """
    plist = as_path_list(phase_paths)
    if te_s is None:
        raise QSMInputError("--te: echo times (s) are required for phase input")
    if b0_t is None:
        raise QSMInputError("--b0: field strength (T) is required for phase input")
    if phase_sign not in (1, -1):
        raise QSMInputError(f"--phase-sign: must be 1 or -1, got {phase_sign!r}")
    te = check_te_s(te_s, "--te")
    b0 = check_b0_t(b0_t, "--b0")
    phase = load_echo_series(plist, "phase")
    first = display_name(plist[0])
    if phase.data.shape[0] != len(te):
        raise QSMInputError(f"{first}: {phase.data.shape[0]} phase echo(es) but {len(te)} echo "
                            f"time(s) given ({list(te)})")
    magnitude = None
    if magnitude_paths is not None and as_path_list(magnitude_paths):
        mag = load_echo_series(magnitude_paths, "magnitude")
        mag_first = display_name(as_path_list(magnitude_paths)[0])
        if mag.data.shape[0] != phase.data.shape[0]:
            raise QSMInputError(f"{mag_first}: {mag.data.shape[0]} magnitude echo(es) but "
                                f"{phase.data.shape[0]} phase echo(es)")
        check_same_grid(mag.data.shape[1:], mag.affine, phase.data.shape[1:], phase.affine,
                        mag_first, f"phase ({first})")
        magnitude = mag.data
    mask = None
    if mask_path is not None:
        mask = load_mask(mask_path, phase.data.shape[1:], phase.affine, f"phase ({first})")
    if voxel_size_mm is None:
        voxel = voxel_size_from_header(phase.header, first)
    else:
        voxel = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
        if voxel.shape != (3,) or not np.all(np.isfinite(voxel)) or np.any(voxel <= 0):
            raise QSMInputError(f"voxel size {list(voxel_size_mm)} must be 3 positive numbers (mm)")
    return Acquisition(
        phase=phase.data, magnitude=magnitude, mask=mask, te_s=te, b0_t=b0,
        b0_dir=resolve_b0_dir(b0_dir, phase.affine, "--b0-dir"), voxel_size_mm=voxel,
        affine=phase.affine, header=phase.header, source=os.fspath(plist[0]),
        name=name or default_name(plist[0]), phase_sign=int(phase_sign))
