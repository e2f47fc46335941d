"""QSM-CI stage folders: canonical inputs in, canonical output name out.

A QSM-CI stage (PyPI ``qsm-ci``) reads an input folder and writes one output file:

=================  ===========================================================  ==================
stage              reads                                                        writes
=================  ===========================================================  ==================
``field-mapping``  phase.nii.gz (4-D, echoes last, rad), magnitude.nii.gz,      totalfield.nii.gz
                   mask.nii.gz, params.json
``bfr``            totalfield.nii.gz (ppm), mask.nii.gz, params.json            localfield.nii.gz
``dipole``         localfield.nii.gz (ppm), mask.nii.gz, params.json            chimap.nii.gz
``end-to-end``     as field-mapping                                             chimap.nii.gz
=================  ===========================================================  ==================

The magnitude is optional (qsm-ci treats it so when phase is also given); everything else is
required. ``params.json`` voxel_size and B0_dir win over the header (they are what the caller
stated); a voxel size that disagrees with the header is logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsmnet.io.acquisition import Acquisition, geometry_sample
from qsmnet.physics.geometry import Geometry
from qsmnet.io.echoes import load_echo_series, load_mask, resolve_b0_dir, resolve_voxel_size
from qsmnet.io.errors import QSMInputError
from qsmnet.io.nifti import load_nifti
from qsmnet.io.params import read_params_json
from qsmnet.io.validate import (
    check_finite_in_mask,
    check_magnitude_decay,
    check_min_extent,
    check_same_grid,
    check_volume_3d,
    voxel_size_from_header,
)

__all__ = ["QSMCI_INPUTS", "QSMCI_OUTPUT", "QSMCI_STAGES", "QSMCIInputs", "read_qsmci_inputs"]


#: Output file each stage writes into its output folder.
QSMCI_OUTPUT = {
    "field-mapping": "totalfield.nii.gz",
    "bfr": "localfield.nii.gz",
    "dipole": "chimap.nii.gz",
    "end-to-end": "chimap.nii.gz",
}
#: Stages qsmnet runs.
QSMCI_STAGES = tuple(QSMCI_OUTPUT)
#: Image inputs of each stage (besides params.json): (file name, required).
QSMCI_INPUTS = {
    "field-mapping": (("phase.nii.gz", True), ("magnitude.nii.gz", False), ("mask.nii.gz", True)),
    "bfr": (("totalfield.nii.gz", True), ("mask.nii.gz", True)),
    "dipole": (("localfield.nii.gz", True), ("mask.nii.gz", True)),
    "end-to-end": (("phase.nii.gz", True), ("magnitude.nii.gz", False), ("mask.nii.gz", True)),
}
#: Stages that run background-field removal (and so need background outside the mask).
_BFR_STAGES = ("bfr", "end-to-end")


@dataclass(eq=False)
class QSMCIInputs:
    """What a QSM-CI input folder holds, validated.

    Attributes
    ----------
    stage : str
    in_dir : Path
    mask : (X, Y, Z) bool ndarray
    affine : (4, 4) float64 ndarray
        Affine of the primary image (phase, totalfield or localfield); outputs use it.
    header : nibabel header of the primary image.
    te_s : tuple of float or None
        Echo times, s (None for bfr/dipole when params.json omits them).
    b0_t : float or None
        Field strength, T.
    b0_dir : (3,) float64 unit ndarray
        params.json ``B0_dir``, else from the affine.
    voxel_size_mm : (3,) float64 ndarray
        params.json ``voxel_size``, else the header zooms.
    phase : (E, X, Y, Z) float32 ndarray or None
        Radians (field-mapping, end-to-end).
    magnitude : (E, X, Y, Z) float32 ndarray or None
    totalfield_ppm : (X, Y, Z) float32 ndarray or None (bfr)
    localfield_ppm : (X, Y, Z) float32 ndarray or None (dipole)
    phase_sign : int
    """

    stage: str
    in_dir: Path
    mask: np.ndarray
    affine: np.ndarray
    header: Any
    te_s: tuple[float, ...] | None
    b0_t: float | None
    b0_dir: np.ndarray
    voxel_size_mm: np.ndarray
    phase: np.ndarray | None = None
    magnitude: np.ndarray | None = None
    totalfield_ppm: np.ndarray | None = None
    localfield_ppm: np.ndarray | None = None
    phase_sign: int = 1

    @property
    def geometry(self) -> Geometry:
        """Voxel size and B0 direction as a validated :class:`~qsmnet.physics.geometry.Geometry`."""
        return Geometry(self.voxel_size_mm, self.b0_dir)

    @property
    def output_name(self) -> str:
        """Canonical output file name of this stage (:data:`QSMCI_OUTPUT`)."""
        return QSMCI_OUTPUT[self.stage]

    @property
    def name(self) -> str:
        """A name for logs: the input folder's name."""
        return self.in_dir.name or os.fspath(self.in_dir)

    def to_acquisition(self) -> Acquisition:
        """The phase inputs as an :class:`Acquisition` (field-mapping and end-to-end only)."""
        if self.phase is None or self.te_s is None or self.b0_t is None:
            raise ValueError(f"stage {self.stage!r} has no phase to make an Acquisition from")
        return Acquisition(
            phase=self.phase, magnitude=self.magnitude, mask=self.mask, te_s=self.te_s,
            b0_t=self.b0_t, b0_dir=self.b0_dir, voxel_size_mm=self.voxel_size_mm,
            affine=self.affine, header=self.header, source=os.fspath(self.in_dir),
            name=self.name, phase_sign=self.phase_sign)

    def to_sample(self, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Sample dict (keys of :mod:`qsmnet.transforms.base`) of what the folder holds.

        Phase stages give the :meth:`Acquisition.to_sample` keys; bfr adds ``total_field_ppm``, dipole
        ``local_field_ppm``; ``mask``, ``voxel_size_mm``, ``b0_dir``, ``affine`` always, and
        ``b0_t`` / ``te_s`` when known.
        """
        if self.phase is not None:
            return self.to_acquisition().to_sample(device, dtype)

        def tensor(a) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        sample = geometry_sample(self.mask, self.voxel_size_mm, self.b0_dir, self.affine,
                                 self.b0_t, device, dtype)
        if self.te_s is not None:
            sample["te_s"] = tensor(np.asarray(self.te_s, dtype=np.float64))
        if self.totalfield_ppm is not None:
            sample["total_field_ppm"] = tensor(self.totalfield_ppm)
        if self.localfield_ppm is not None:
            sample["local_field_ppm"] = tensor(self.localfield_ppm)
        return sample


def _require(in_dir: Path, filename: str, stage: str) -> Path:
    path = in_dir / filename
    if not path.is_file():
        raise QSMInputError(f"{path}: file not found (the {stage} stage needs {filename})")
    return path


def _load_field(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    # NaN outside the brain is allowed (check_finite_in_mask, once the mask is read)
    data, affine, header = load_nifti(path, check_finite=False)
    return check_volume_3d(data, path.name).astype(np.float32, copy=False), affine, header


def _voxel_size(params, header, primary: str):
    """params.json's voxel size (warned about if it differs from the header's) or the header's;
    a header without a valid voxel size is refused either way."""
    header_voxel = voxel_size_from_header(header, primary)
    return header_voxel if params.voxel_size_mm is None else \
        resolve_voxel_size(params.voxel_size_mm, header, primary)


def read_qsmci_inputs(in_dir: str | os.PathLike, stage: str, phase_sign: int = 1,
                      phase_units: str = "auto", mask_threshold: float | None = None,
                      decay_check: bool = True, min_extent: int = 2,
                      require_background: bool = False) -> QSMCIInputs:
    """Read and validate a QSM-CI stage input folder.

    Parameters
    ----------
    in_dir : path-like
        Folder with the canonical files of ``stage`` (see the module docstring).
    stage : {"field-mapping", "bfr", "dipole", "end-to-end"}
    phase_sign : {1, -1}
        Vendor polarity of the phase (phase stages).
    phase_units, mask_threshold, decay_check, min_extent
        As for :func:`~qsmnet.io.echoes.read_nifti_echoes` (``--phase-units``,
        ``--mask-threshold``, ``--no-decay-check``; the CLI passes the minimum extent).
    require_background : bool
        In the stages that remove the background (bfr, end-to-end), refuse a mask covering the
        whole grid (the CLI passes True).

    Returns
    -------
    QSMCIInputs

    Raises
    ------
    QSMInputError
        Unknown stage, missing folder or files, bad params.json, images on different grids,
        empty mask, echo count differing from TE count; the message names the file.
    """
    if stage not in QSMCI_OUTPUT:
        raise QSMInputError(f"stage {stage!r}: unknown; choose one of {', '.join(QSMCI_STAGES)}")
    if phase_sign not in (1, -1):
        raise QSMInputError(f"--phase-sign: must be 1 or -1, got {phase_sign!r}")
    d = Path(in_dir)
    if not d.is_dir():
        raise QSMInputError(f"{os.fspath(in_dir)}: input folder not found")
    uses_phase = stage in ("field-mapping", "end-to-end")
    params = read_params_json(_require(d, "params.json", stage), require_te=uses_phase,
                              require_b0=uses_phase)
    found: dict[str, Any] = {}
    if uses_phase:
        phase_path = _require(d, "phase.nii.gz", stage)
        phase = load_echo_series(phase_path, "phase", phase_units, min_extent)
        if phase.data.shape[0] != len(params.te_s):
            raise QSMInputError(f"phase.nii.gz: {phase.data.shape[0]} echo(es) but params.json "
                                f"TE has {len(params.te_s)} ({list(params.te_s)})")
        found["phase"] = phase.data
        shape, affine, header, primary = phase.data.shape[1:], phase.affine, phase.header, \
            phase_path.name
        mag_path = d / "magnitude.nii.gz"
        if mag_path.is_file():
            mag = load_echo_series(mag_path, "magnitude")
            if mag.data.shape[0] != phase.data.shape[0]:
                raise QSMInputError(f"magnitude.nii.gz: {mag.data.shape[0]} echo(es) but "
                                    f"phase.nii.gz has {phase.data.shape[0]}")
            check_same_grid(mag.data.shape[1:], mag.affine, shape, affine, mag_path.name,
                            primary)
            found["magnitude"] = mag.data
    else:
        key, filename = ("totalfield_ppm", "totalfield.nii.gz") if stage == "bfr" \
            else ("localfield_ppm", "localfield.nii.gz")
        field_path = _require(d, filename, stage)
        found[key], affine, header = _load_field(field_path)
        shape, primary = found[key].shape, filename
        check_min_extent(shape, filename, min_extent)
    mask = load_mask(_require(d, "mask.nii.gz", stage), shape, affine, primary, mask_threshold,
                     require_background and stage in _BFR_STAGES,
                     "give a brain mask (0 outside the brain)")
    if not uses_phase:
        found[key] = check_finite_in_mask(found[key], mask, primary)
    if found.get("magnitude") is not None and decay_check:
        check_magnitude_decay(found["magnitude"], params.te_s, "magnitude.nii.gz", mask)
    voxel = _voxel_size(params, header, primary)
    b0_dir = resolve_b0_dir(params.b0_dir, affine, "params.json B0_dir")
    return QSMCIInputs(stage=stage, in_dir=d, mask=mask, affine=affine, header=header,
                       te_s=params.te_s, b0_t=params.b0_t, b0_dir=b0_dir, voxel_size_mm=voxel,
                       phase_sign=phase_sign, **found)
