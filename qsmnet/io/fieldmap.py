"""Read a total field map (Hz or ppm) given as one 3-D NIfTI: ``qsmnet predict --fieldmap``.

A field map already unwrapped and combined over echoes (a scanner B0 map, ROMEO's B0 output)
skips field mapping: the reconstruction starts at background removal
(``reconstruct(..., start="totalfield")``), which needs a brain mask. Hz are converted to ppm
with :func:`qsmnet.physics.units.hz_to_ppm` (``f_ppm = f_Hz / (GAMMA_BAR * B0)``), so a map in
Hz needs the field strength; echo times are not used. Positive values mean a higher field
(qsmnet's polarity; no vendor sign is applied).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsmnet.io.acquisition import geometry_sample
from qsmnet.io.echoes import (
    PathLike,
    default_name,
    load_mask,
    resolve_b0_dir,
    resolve_voxel_size,
)
from qsmnet.io.errors import QSMInputError, display_name
from qsmnet.io.nifti import load_nifti
from qsmnet.io.validate import (
    check_b0_t,
    check_finite_in_mask,
    check_min_extent,
    check_volume_3d,
)
from qsmnet.physics.geometry import Geometry
from qsmnet.physics.units import GAMMA_BAR_MHZ_PER_T, hz_to_ppm

__all__ = ["FIELDMAP_UNITS", "FIELD_PPM_MAX", "FieldMapInput", "read_fieldmap"]

#: Units a field map may be given in (``--fieldmap-units``).
FIELDMAP_UNITS = ("hz", "ppm")
#: Largest plausible 99th percentile of |total field| inside the brain mask, ppm. Tissue and air
#: differ by about 9.4 ppm in susceptibility and the dipole field of a susceptibility contrast
#: stays of the order of that contrast, so head total fields (a centre-frequency offset
#: included) are a few ppm; a map in Hz read as ppm gives hundreds at 3 T (127.7 Hz per ppm).
#: The check is one-sided: ppm read as Hz shrinks by the same factor and is not caught.
FIELD_PPM_MAX = 50.0
#: Percentile of |field| in the mask that the plausibility check uses (a few outlying voxels
#: at the brain edge, where field maps are noisiest, do not trigger it).
_FIELD_PERCENTILE = 99.0


@dataclass(eq=False)
class FieldMapInput:
    """A total field map with its mask and geometry, validated and in ppm.

    Attributes
    ----------
    total_field_ppm : (X, Y, Z) float32 ndarray
        Total field, ppm (converted from Hz when ``units`` is ``"hz"``).
    mask : (X, Y, Z) bool ndarray
        Brain mask.
    b0_t : float or None
        Field strength, T (None only for a map in ppm given without one).
    b0_dir : (3,) float64 ndarray
        Unit B0 direction in array axes.
    voxel_size_mm : (3,) float64 ndarray
    affine : (4, 4) float64 ndarray
        Affine of the field map (outputs are written with it).
    header : nibabel header of the field map.
    source : str
        The field map's path.
    name : str
        Acquisition name for outputs and logs.
    units : {"hz", "ppm"}
        Units the file was given in.
    entities : dict of str to str
        Empty (not a BIDS input); present so that ``predict`` treats it like an
        :class:`~qsmnet.io.acquisition.Acquisition`.
    """

    total_field_ppm: np.ndarray
    mask: np.ndarray
    b0_t: float | None
    b0_dir: np.ndarray
    voxel_size_mm: np.ndarray
    affine: np.ndarray
    header: Any
    source: str
    name: str
    units: str
    entities: dict[str, str] = field(default_factory=dict)

    #: Where :func:`~qsmnet.inference.pipeline.reconstruct` starts from this input.
    start = "totalfield"

    @property
    def geometry(self) -> Geometry:
        """Voxel size and B0 direction as a validated :class:`~qsmnet.physics.geometry.Geometry`."""
        return Geometry(self.voxel_size_mm, self.b0_dir)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(n) for n in self.total_field_ppm.shape)

    @property
    def n_echoes(self) -> int:
        """1: one field volume (what the memory estimate of ``predict`` counts)."""
        return 1

    def to_sample(self, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Sample dict for ``reconstruct(..., start="totalfield")``: ``total_field_ppm``
        (X, Y, Z) ppm, ``mask`` bool, ``voxel_size_mm`` (3,), ``b0_dir`` (3,), ``affine``
        (4, 4) numpy, and ``b0_t`` (T) when known."""
        sample = geometry_sample(self.mask, self.voxel_size_mm, self.b0_dir, self.affine,
                                 self.b0_t, device, dtype)
        sample["total_field_ppm"] = torch.as_tensor(
            np.ascontiguousarray(self.total_field_ppm)).to(device=device, dtype=dtype)
        return sample

    def inputs_record(self) -> dict[str, Any]:
        """The ``inputs`` entry of the provenance record, with the units the map was given in."""
        return {"source": self.source, "name": self.name, "shape": list(self.shape),
                "fieldmap_units": self.units,
                "hz_per_ppm": None if self.b0_t is None else GAMMA_BAR_MHZ_PER_T * self.b0_t,
                "b0_t": self.b0_t, "b0_dir": [float(v) for v in self.b0_dir],
                "voxel_size_mm": [float(v) for v in self.voxel_size_mm], "mask": "given"}


def _load_field_volume(path: PathLike, min_extent: int) -> tuple[np.ndarray, np.ndarray, Any]:
    name = display_name(path)
    # NaN outside the brain is allowed (check_finite_in_mask, once the mask is read)
    data, affine, header = load_nifti(path, check_finite=False)
    if data.ndim == 4 and data.shape[3] > 1:
        raise QSMInputError(f"{name}: 4-D image ({data.shape[3]} volumes); a field map is one "
                            "3-D volume, already combined over echoes (multi-echo phase goes "
                            "to --phase)")
    volume = check_volume_3d(data, name)
    check_min_extent(volume.shape, name, min_extent)
    return volume, affine, header


def _check_plausible(field_ppm: np.ndarray, mask: np.ndarray, name: str, units: str) -> None:
    """Refuse a field far beyond what a head produces (:data:`FIELD_PPM_MAX`)."""
    typical = float(np.percentile(np.abs(field_ppm[mask]), _FIELD_PERCENTILE))
    if typical > FIELD_PPM_MAX:
        hint = ("is it in Hz? pass --fieldmap-units hz" if units == "ppm"
                else "is B0 right, and the map in Hz (not rad/s)?")
        raise QSMInputError(
            f"{name}: {_FIELD_PERCENTILE:g} % of the field in the mask is within "
            f"{typical:.4g} ppm, beyond the {FIELD_PPM_MAX:g} ppm a head's total field stays "
            f"under; {hint}")


def read_fieldmap(fieldmap_path: PathLike, mask_path: PathLike, units: str = "hz",
                  b0_t: float | None = None, b0_dir: Sequence[float] | None = None,
                  voxel_size_mm: Sequence[float] | None = None, name: str | None = None,
                  mask_threshold: float | None = None, min_extent: int = 2,
                  require_background: bool = False) -> FieldMapInput:
    """Read a total field map and its brain mask.

    Parameters
    ----------
    fieldmap_path : path
        One 3-D NIfTI (a trailing axis of length 1 is dropped): the total field, unwrapped and
        combined over echoes, in ``units``.
    mask_path : path
        Brain mask on the field map's grid (required: background removal needs it).
    units : {"hz", "ppm"}
        ``hz``: converted with :func:`~qsmnet.physics.units.hz_to_ppm`, which needs ``b0_t``.
    b0_t : float, optional
        Field strength, T; required for ``units="hz"``.
    b0_dir : (3,) sequence, optional
        B0 direction in array axes; default: from the affine.
    voxel_size_mm : (3,) sequence, optional
        Overrides the header zooms; mm.
    name : str, optional
        Acquisition name; default: the file name without extension.
    mask_threshold, min_extent, require_background
        As for :func:`~qsmnet.io.echoes.read_nifti_echoes`.

    Returns
    -------
    FieldMapInput

    Raises
    ------
    QSMInputError
        Naming the file: missing B0 for Hz, NaN or infinite voxels, a 4-D image, a mask on
        another grid (shape or affine), a field whose 99th percentile of |f| in the mask exceeds
        :data:`FIELD_PPM_MAX` ppm, and the reader's usual checks.
    """
    if units not in FIELDMAP_UNITS:
        raise QSMInputError(f"--fieldmap-units: {units!r} is not one of "
                            f"{', '.join(FIELDMAP_UNITS)}")
    name_in_messages = display_name(fieldmap_path)
    if b0_t is None and units == "hz":
        raise QSMInputError(f"{name_in_messages}: a field map in Hz needs the field strength to "
                            "be converted to ppm; give --params with B0, or --b0 (tesla)")
    b0 = None if b0_t is None else check_b0_t(b0_t, "--b0")
    volume, affine, header = _load_field_volume(fieldmap_path, min_extent)
    mask = load_mask(mask_path, volume.shape, affine, f"field map ({name_in_messages})",
                     mask_threshold, require_background)
    field_ppm = check_finite_in_mask(volume, mask, name_in_messages).astype(np.float64)
    if units == "hz":
        field_ppm = hz_to_ppm(torch.from_numpy(field_ppm), b0).numpy()
    _check_plausible(field_ppm, mask, name_in_messages, units)
    return FieldMapInput(
        total_field_ppm=field_ppm.astype(np.float32), mask=mask, b0_t=b0,
        b0_dir=resolve_b0_dir(b0_dir, affine, "--b0-dir"),
        voxel_size_mm=resolve_voxel_size(voxel_size_mm, header, name_in_messages),
        affine=affine, header=header, source=os.fspath(fieldmap_path),
        name=name or default_name(Path(fieldmap_path)), units=units)
