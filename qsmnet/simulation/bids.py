"""Write a simulated subject as a BIDS multi-echo GRE dataset, with its truths as derivatives.

Layout (``<id>`` the subject label)::

    OUT/dataset_description.json
    OUT/sub-<id>/anat/sub-<id>_echo-<n>_part-mag_MEGRE.nii.gz   (+ .json)
    OUT/sub-<id>/anat/sub-<id>_echo-<n>_part-phase_MEGRE.nii.gz (+ .json; radians, wrapped)
    OUT/derivatives/qsmnet-simulation/dataset_description.json
    OUT/derivatives/qsmnet-simulation/sub-<id>/anat/sub-<id>_Chimap.nii.gz      chi, ppm
                                                    sub-<id>_mask.nii.gz        brain mask
                                                    sub-<id>_localfield.nii.gz  ppm, noise-free
                                                    sub-<id>_totalfield.nii.gz  ppm, noise-free
                                                    sub-<id>_simulation.json    parameters

Sidecars hold ``EchoTime`` (s), ``EchoNumber``, ``MagneticFieldStrength`` (T) and ``B0_dir``
(array axes). The affine encodes the same B0 direction
(:func:`qsmnet.physics.geometry.affine_from_b0_dir`), so readers that use either agree.

Truth conventions: chi is relative to CSF (zero outside the mask, not re-referenced), so that
``localfield = forward_field(Chimap) * mask`` exactly; ``totalfield = localfield + background``
inside the mask (zero outside), the field that the phase encodes there:
``phase_e = wrap(phi0 + 2 pi GAMMA_BAR B0 TE_e totalfield) + noise``.
Every file is written atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from qsmnet.io.atomic import atomic_write_json
from qsmnet.io.errors import QSMInputError
from qsmnet.io.nifti import save_nifti
from qsmnet.physics.geometry import affine_from_b0_dir, normalize_b0_dir
from qsmnet.simulation.config import MIN_SIMULATED_VOXELS, SimulationConfig, make_config
from qsmnet.simulation.simulator import QSMSimulator

DERIVATIVE_NAME = "qsmnet-simulation"
BIDS_VERSION = "1.9.0"
_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def head_config(shape: Sequence[int], voxel_size_mm: Sequence[float], b0_dir: Sequence[float],
                b0_t: float, te_s: Sequence[float], peak_snr: float | None,
                **overrides: Any) -> SimulationConfig:
    """Simulator settings for a whole head in the volume.

    A centred, axis-aligned brain-like mask with CSF, skull and scalp layers and air around the
    head (layers scaled to the field of view: about 15 mm on a 96 mm grid), air pockets
    (sinus / ear canal) outside the brain, fixed geometry, echo times and SNR, no chi scaling.
    """
    half = min(0.5 * n * float(v) for n, v in zip(shape, voxel_size_mm))
    layers = min(15.0, 0.3 * half)
    frac = max(0.2, 1.0 - (layers + 0.08 * half) / half)
    noise_free = peak_snr is None or not math.isfinite(float(peak_snr))
    snr = 100.0 if noise_free else float(peak_snr)
    values: dict[str, Any] = dict(
        voxel_size_mm=tuple(float(v) for v in voxel_size_mm),
        b0_dir=tuple(float(v) for v in b0_dir),
        b0_t_choices=(float(b0_t),), te_s=tuple(float(t) for t in te_s),
        snr_range=(snr, snr), noise_free_prob=1.0 if noise_free else 0.0,
        full_mask_prob=0.0, mask_radius_frac=(frac, frac), mask_center_jitter=0.02,
        mask_axis_jitter=0.03, mask_rotate=False, mask_lobes_max=0, mask_perturb_frac=0.05,
        csf_mm=(0.15 * layers, 0.15 * layers), skull_mm=(0.45 * layers, 0.45 * layers),
        scalp_mm=(0.4 * layers, 0.4 * layers), skull_prob=1.0, head_air_prob=1.0,
        air_blobs_max=2, air_blob_radius_mm=(0.1 * half, 0.2 * half),
        distant_sources_max=1, shim_residual_ppm=(0.02, 0.1),
        shapes_count=(25, 50), strong_prob=0.6, chi_scale_prob=0.0,
        acquisition=True, with_total_field=True,
    )
    values.update(overrides)
    return make_config(None, **values)


def _check_args(subject: str, shape, voxel_size_mm, b0_dir, b0_t, te_s, peak_snr):
    label = str(subject)
    if label.startswith("sub-"):
        label = label[4:]
    if not _LABEL.match(label):
        raise QSMInputError(f"subject label {subject!r}: BIDS labels are letters and digits only")
    try:
        shape = tuple(int(n) for n in shape)
        vs = tuple(float(v) for v in voxel_size_mm)
        te = tuple(float(t) for t in te_s)
    except (TypeError, ValueError) as exc:
        raise QSMInputError(f"shape, voxel_size_mm and te_s must be numbers: {exc}") from exc
    if len(shape) != 3 or min(shape) < MIN_SIMULATED_VOXELS:
        raise QSMInputError(f"shape must be 3 sizes of at least {MIN_SIMULATED_VOXELS} voxels, "
                            f"got {shape}")
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise QSMInputError(f"voxel_size_mm must be 3 positive sizes in mm, got {vs}")
    try:
        b0 = tuple(float(v) for v in normalize_b0_dir(b0_dir))
    except ValueError as exc:
        raise QSMInputError(f"b0_dir: {exc}") from exc
    if not (math.isfinite(float(b0_t)) and float(b0_t) > 0):
        raise QSMInputError(f"b0_t must be a positive field strength in tesla, got {b0_t}")
    if not te or not all(math.isfinite(t) and t > 0 for t in te) or any(b <= a for a, b in zip(te, te[1:])):
        raise QSMInputError(f"te_s must be increasing positive echo times in seconds, got {te}")
    if max(te) > 1.0:
        raise QSMInputError(f"te_s are in seconds; got {te} (milliseconds?)")
    if peak_snr is not None and not (float(peak_snr) > 0):
        raise QSMInputError(f"peak_snr must be positive (or None / inf for no noise), got {peak_snr}")
    return label, shape, vs, b0, te


def _arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _write_echoes(written: dict[str, Any], anat: Path, label: str, te, sample, affine, header,
                  b0_t: float, b0_list: list[float]) -> None:
    """Write the magnitude and phase NIfTI of each echo with their sidecars into ``written``."""
    for e, t in enumerate(te, start=1):
        stem = anat / f"sub-{label}_echo-{e}"
        for part, key, data in (("mag", "magnitude", sample["magnitude"][e - 1]),
                                ("phase", "phase", sample["phase"][e - 1])):
            nii = Path(f"{stem}_part-{part}_MEGRE.nii.gz")
            written[key].append(save_nifti(nii, _arr(data), affine, header=header))
            side: dict[str, Any] = {
                "EchoTime": float(t), "EchoNumber": e, "MagneticFieldStrength": float(b0_t),
                "B0_dir": b0_list,
                "ImageType": ["ORIGINAL", "PRIMARY", "P" if part == "phase" else "M"],
            }
            if part == "phase":
                side["Units"] = "rad"
            written[f"{key}_json"].append(atomic_write_json(nii.with_name(nii.name[:-7] + ".json"), side))


def _write_truths(written: dict[str, Any], root: Path, label: str, sample, info, affine, header,
                  seed, shape, vs, b0_list: list[float], b0_t, te, peak_snr) -> None:
    """Write the derivative truths (chi, mask, fields, simulation sidecar) into ``written``."""
    deriv = root / "derivatives" / DERIVATIVE_NAME
    written["derivatives_description"] = atomic_write_json(deriv / "dataset_description.json", {
        "Name": "qsmnet simulation truths", "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmnet.simulation", "Description": "write_simulated_subject"}],
    })
    danat = deriv / f"sub-{label}" / "anat"
    mask = sample["mask"][0]
    total = info["local_field_clean_ppm"] + sample["background_field_ppm"][0]
    written["chi"] = save_nifti(danat / f"sub-{label}_Chimap.nii.gz", _arr(sample["chi_ppm"][0]),
                                affine, header=header)
    written["mask"] = save_nifti(danat / f"sub-{label}_mask.nii.gz", _arr(mask).astype(np.uint8),
                                 affine, header=header, dtype=np.uint8)
    written["localfield"] = save_nifti(danat / f"sub-{label}_localfield.nii.gz",
                                       _arr(info["local_field_clean_ppm"]), affine, header=header)
    written["totalfield"] = save_nifti(danat / f"sub-{label}_totalfield.nii.gz", _arr(total),
                                       affine, header=header)
    written["simulation_json"] = atomic_write_json(danat / f"sub-{label}_simulation.json", {
        "seed": int(seed), "shape": list(shape), "voxel_size": list(vs), "B0_dir": b0_list,
        "B0": float(b0_t), "TE": list(te),
        "peak_snr": None if peak_snr is None or not math.isfinite(float(peak_snr)) else float(peak_snr),
        "noise_sigma": float(info["signal_sigma"]),
        "n_strong_sources": int(info["n_strong"]),
        "chi_reference": "CSF (zero outside the mask); localfield = forward_field(Chimap) * mask",
        "units": {"Chimap": "ppm", "localfield": "ppm", "totalfield": "ppm", "phase": "rad"},
    })


def write_simulated_subject(out_dir: str | os.PathLike, subject: str = "01", seed: int = 0,
                            shape: Sequence[int] = (96, 96, 64),
                            voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                            b0_dir: Sequence[float] = (0.0, 0.0, 1.0), b0_t: float = 3.0,
                            te_s: Sequence[float] = (0.004, 0.012, 0.020, 0.028),
                            peak_snr: float | None = 100.0, *, device: str | torch.device = "cpu",
                            **simulator_overrides: Any) -> dict[str, Any]:
    """Simulate one head and write it as BIDS multi-echo GRE plus derivative truths.

    Parameters
    ----------
    out_dir : BIDS root (created if needed).
    subject : subject label (letters and digits; a leading ``sub-`` is dropped).
    seed : the simulation seed; the same seed writes the same data.
    shape : (X, Y, Z) voxels.   voxel_size_mm : (3,) mm.
    b0_dir : B0 direction in array axes (encoded in the affine and the sidecars).
    b0_t : tesla.   te_s : echo times, s.
    peak_snr : ``max(echo-1 magnitude) / noise sigma``; None or ``inf`` writes noise-free data.
    device : where to simulate.
    **simulator_overrides : further :class:`~qsmnet.simulation.SimulationConfig` fields.

    Returns
    -------
    dict of written paths: ``dataset_description``, ``magnitude`` / ``phase`` /
    ``magnitude_json`` / ``phase_json`` (lists, one per echo), ``chi``, ``mask``, ``localfield``,
    ``totalfield``, ``simulation_json``, ``derivatives_description``.

    Raises
    ------
    QSMInputError
        For a bad label, shape, voxel size, direction, field strength, echo times or SNR.
    """
    label, shape, vs, b0, te = _check_args(subject, shape, voxel_size_mm, b0_dir, b0_t, te_s,
                                           peak_snr)
    cfg = head_config(shape, vs, b0, float(b0_t), te, peak_snr, **simulator_overrides)
    sample, info = QSMSimulator(cfg)(shape, int(seed), device=device, return_info=True)

    root = Path(out_dir)
    affine = affine_from_b0_dir(b0, vs, shape)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    header["qform_code"] = 1
    header["sform_code"] = 1

    written: dict[str, Any] = {"magnitude": [], "phase": [], "magnitude_json": [], "phase_json": []}
    written["dataset_description"] = atomic_write_json(root / "dataset_description.json", {
        "Name": "qsmnet simulated multi-echo GRE", "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "qsmnet.simulation", "Description": "write_simulated_subject"}],
    })
    b0_list = [float(v) for v in b0]
    _write_echoes(written, root / f"sub-{label}" / "anat", label, te, sample, affine, header,
                  float(b0_t), b0_list)
    _write_truths(written, root, label, sample, info, affine, header, seed, shape, vs, b0_list,
                  b0_t, te, peak_snr)
    return written
