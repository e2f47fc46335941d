"""NIfTI reading and (atomic) writing with input checks.

:func:`load_nifti` returns the array as nibabel indexes it ``(x, y, z[, t])``, the voxel-to-scanner
affine and the header; every failure (missing, unreadable, not NIfTI, NaN/inf) is a
:class:`~qsmnet.io.errors.QSMInputError` that names the file. :func:`save_nifti` writes a gzipped
float32 map atomically, keeping the input's affine and header orientation (qform/sform codes,
spatial/temporal units) so that viewers overlay the output exactly on the input, and states what
the map holds and its unit in the header description (``descrip``).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmnet.io.atomic import atomic_path, atomic_write_json, atomic_write_text
from qsmnet.io.errors import QSMInputError, display_name

__all__ = ["atomic_write_json", "atomic_write_text", "load_nifti", "save_nifti"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _check_nifti_name(path: Path) -> None:
    if not path.name.endswith(_NIFTI_SUFFIXES):
        raise QSMInputError(f"{display_name(path)}: not a NIfTI file name "
                            "(expected .nii or .nii.gz)")


def load_nifti(path: str | os.PathLike, dtype: type = np.float32, check_finite: bool = True
               ) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI image with checks.

    Parameters
    ----------
    path : path-like
        A ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2).
    dtype : numpy float type
        dtype of the returned array; scaling (``scl_slope``/``scl_inter``) is applied by nibabel.
        float32 holds integer raw phase (|v| < 2**24) exactly.
    check_finite : bool
        Refuse NaN or inf voxels (they poison FFT-based processing).

    Returns
    -------
    data : ndarray, shape as stored ``(X, Y, Z[, T])``
    affine : (4, 4) float64 ndarray
        Voxel-to-scanner (mm) affine: the sform if its code is set, else the qform, else a
        diagonal of the voxel sizes (nibabel's rule).
    header : nibabel header
        A copy of the file's header.

    Raises
    ------
    QSMInputError
        Missing, unreadable or non-NIfTI file, or non-finite voxels; the message names the file.
    """
    p = Path(path)
    name = display_name(p)
    if not p.exists():
        raise QSMInputError(f"{os.fspath(path)}: file not found")
    if not p.is_file():
        raise QSMInputError(f"{os.fspath(path)}: not a file")
    _check_nifti_name(p)
    try:
        img = nib.load(os.fspath(p))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise QSMInputError(f"{name}: not a NIfTI image ({type(img).__name__})")
        data = np.asarray(img.get_fdata(dtype=dtype))
    except QSMInputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        # Truncated gzip, bad magic, wrong size: the user needs to know which file, not a traceback.
        raise QSMInputError(f"{name}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    if check_finite and not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise QSMInputError(f"{name}: {bad} voxel(s) are NaN or infinite")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise QSMInputError(f"{name}: affine is not a finite, invertible matrix")
    return data, affine, img.header.copy()


def _orientation_codes(header) -> tuple[int, int]:
    """(qform_code, sform_code) of ``header``; codes 0 for headers that have none."""
    try:
        return int(header["qform_code"]), int(header["sform_code"])
    except (KeyError, TypeError, ValueError):
        return 0, 0


#: Size of the NIfTI-1 header's ``descrip`` field, bytes.
DESCRIP_MAX_BYTES = 80


def _check_description(description: str | None) -> bytes:
    """``description`` as the bytes stored in ``descrip``; ValueError when it cannot fit."""
    if description is None:
        return b""
    try:
        raw = str(description).encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError(f"NIfTI description must be ASCII, got {description!r}") from exc
    if len(raw) > DESCRIP_MAX_BYTES:
        raise ValueError(f"NIfTI description is {len(raw)} bytes, at most {DESCRIP_MAX_BYTES} fit: "
                         f"{description!r}")
    return raw


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
               header=None, dtype: type = np.float32, description: str | None = None) -> Path:
    """Write ``data`` as a NIfTI-1 file atomically; return the path.

    Parameters
    ----------
    path : path-like
        ``.nii.gz`` (gzipped, the default everywhere in qsmnet) or ``.nii``. Parent folders are
        created. The file appears complete or not at all (temporary file + ``os.replace``).
    data : ndarray ``(X, Y, Z[, T])``
        Values to store (ppm for field and chi maps). Bool masks are stored as 0/1.
    affine : (4, 4) array
        Voxel-to-scanner affine, normally the input's; written to the sform (and qform).
    header : nibabel header, optional
        The input's header: its qform/sform codes and xyzt units are kept, so the output carries
        the same orientation labels. When both its codes are 0 (no orientation), the sform code
        is set to 2 (aligned) so that ``affine`` is not lost.
    dtype : numpy type
        On-disk data type (float32 by default; ``np.uint8`` for masks).
    description : str, optional
        The header's ``descrip`` field (NIfTI-1: at most 80 ASCII characters), shown by viewers
        and ``fslhd``; qsmnet states what the map is and its unit there (``"chi ppm"``,
        ``"local field ppm"``, ``"mask"``). None leaves it empty: the input header's own
        description is never copied, since it describes the input, not this map.

    Raises
    ------
    ValueError
        A description longer than 80 bytes or not ASCII (nibabel would truncate it silently),
        or an affine that is not 4x4.
    """
    p = Path(path)
    _check_nifti_name(p)
    descrip = _check_description(description)
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    arr = arr.astype(dtype, copy=False)
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {aff.shape}")
    img = nib.Nifti1Image(arr, aff)
    if header is not None:
        qcode, scode = _orientation_codes(header)
        if qcode == 0 and scode == 0:
            scode = 2
        img.set_sform(aff, code=scode)
        # The qform cannot hold shears; nibabel stores the nearest rigid+zoom transform. The sform
        # (code > 0 here whenever the input had one) stays exact and wins on reading.
        img.set_qform(aff, code=qcode)
        try:
            xyz_unit, t_unit = header.get_xyzt_units()
            img.header.set_xyzt_units(xyz_unit, t_unit)
        except (AttributeError, KeyError, ValueError):
            img.header.set_xyzt_units("mm", "sec")
    else:
        img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(dtype)
    if descrip:
        img.header["descrip"] = descrip
    with atomic_path(p) as tmp:
        nib.save(img, os.fspath(tmp))
    return p
