"""Small shared fixtures: tiny NIfTI volumes, BIDS subjects and QSM-CI folders on disk.

Volumes are a few voxels per side so that the whole suite stays fast on 2 CPU cores.
Fixtures that write files return factories taking the target folder, so a test decides where.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

#: Default small grid; odd-sized and anisotropic-friendly on purpose.
SMALL_SHAPE = (8, 9, 10)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator (tests stay deterministic)."""
    return np.random.default_rng(1234)


@pytest.fixture
def small_shape() -> tuple[int, int, int]:
    return SMALL_SHAPE


def axial_affine(voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """RAS-aligned affine with the given voxel size and a non-zero origin."""
    a = np.diag([*map(float, voxel_size_mm), 1.0])
    a[:3, 3] = (-10.0, -12.0, 5.0)
    return a


def oblique_affine(angle_deg: float = 20.0, voxel_size_mm: Sequence[float] = (1.0, 1.2, 2.0)
                   ) -> np.ndarray:
    """Affine rotated by ``angle_deg`` about the scanner x axis, anisotropic voxels."""
    t = math.radians(angle_deg)
    rot = np.array([[1.0, 0.0, 0.0],
                    [0.0, math.cos(t), -math.sin(t)],
                    [0.0, math.sin(t), math.cos(t)]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(np.asarray(voxel_size_mm, dtype=np.float64))
    a[:3, 3] = (3.0, -4.0, 7.0)
    return a


@pytest.fixture(name="axial_affine")
def axial_affine_fixture() -> np.ndarray:
    return axial_affine()


@pytest.fixture(name="oblique_affine")
def oblique_affine_fixture() -> np.ndarray:
    return oblique_affine()


@pytest.fixture
def make_axial_affine():
    """Factory ``make_axial_affine(voxel_size_mm) -> (4, 4)``."""
    return axial_affine


@pytest.fixture
def make_oblique_affine():
    """Factory ``make_oblique_affine(angle_deg, voxel_size_mm) -> (4, 4)``."""
    return oblique_affine


def write_nifti(path: Path | str, data: np.ndarray, affine: np.ndarray | None = None,
                qform_code: int = 1, sform_code: int = 1) -> Path:
    """Write ``data`` with nibabel directly (independent of qsmnet's writer); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = axial_affine() if affine is None else affine
    img = nib.Nifti1Image(np.asarray(data), aff)
    img.set_qform(aff, code=qform_code)
    img.set_sform(aff, code=sform_code)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


@pytest.fixture(name="write_nifti")
def write_nifti_fixture():
    """Factory ``write_nifti(path, data, affine=None, qform_code=1, sform_code=1) -> Path``."""
    return write_nifti


def wrapped_phase(field_ppm: np.ndarray, te_s: float, b0_t: float) -> np.ndarray:
    """Phase (rad, wrapped to [-pi, pi)) of ``field_ppm`` at one echo, qsmnet's polarity."""
    phase = 2.0 * math.pi * 42.57747892 * b0_t * te_s * field_ppm
    return (np.mod(phase + math.pi, 2.0 * math.pi) - math.pi).astype(np.float32)


def write_megre_subject(root: Path | str, subject: str = "01",
                        te_s: Sequence[float] = (0.004, 0.008), b0_t: float = 3.0,
                        shape: Sequence[int] = SMALL_SHAPE,
                        affine: np.ndarray | None = None, entities: str = "",
                        with_magnitude: bool = True, sidecar_extra: dict | None = None,
                        field_ppm: np.ndarray | None = None, ses: str | None = None) -> dict:
    """Write a tiny BIDS MEGRE subject, one 3-D file per echo and part, with JSON sidecars.

    Returns a dict with ``phase`` / ``magnitude`` path lists (echo order), the ``field_ppm``
    used and the echo-by-echo wrapped phase ``phase_rad`` (E, X, Y, Z).
    """
    root = Path(root)
    aff = axial_affine() if affine is None else affine
    if field_ppm is None:
        x = np.linspace(-1.0, 1.0, shape[0])[:, None, None]
        y = np.linspace(-1.0, 1.0, shape[1])[None, :, None]
        z = np.linspace(-1.0, 1.0, shape[2])[None, None, :]
        field_ppm = (0.3 * x + 0.2 * y * z + 0.1 * z).astype(np.float32)
    anat = root / f"sub-{subject}" / (f"ses-{ses}" if ses else "") / "anat"
    stem = f"sub-{subject}" + (f"_ses-{ses}" if ses else "") + entities
    out = {"phase": [], "magnitude": [], "field_ppm": field_ppm, "phase_rad": []}
    for i, te in enumerate(te_s, start=1):
        phase = wrapped_phase(field_ppm, te, b0_t)
        out["phase_rad"].append(phase)
        sidecar = {"EchoTime": te, "MagneticFieldStrength": b0_t, **(sidecar_extra or {})}
        parts = [("phase", phase)]
        if with_magnitude:
            parts.append(("mag", np.full(shape, 100.0 * math.exp(-te / 0.03), np.float32)))
        for part, data in parts:
            base = anat / f"{stem}_echo-{i}_part-{part}_MEGRE"
            write_nifti(base.with_name(base.name + ".nii.gz"), data, aff)
            base.with_name(base.name + ".json").write_text(json.dumps(sidecar))
            out["phase" if part == "phase" else "magnitude"].append(
                base.with_name(base.name + ".nii.gz"))
    out["phase_rad"] = np.stack(out["phase_rad"])
    return out


@pytest.fixture(name="write_megre_subject")
def write_megre_subject_fixture():
    """Factory, see :func:`write_megre_subject`."""
    return write_megre_subject


def write_qsmci_folder(folder: Path | str, stage: str, te_s: Sequence[float] = (0.004, 0.008),
                       b0_t: float = 3.0, b0_dir: Sequence[float] | None = (0.0, 0.0, 1.0),
                       shape: Sequence[int] = SMALL_SHAPE, affine: np.ndarray | None = None,
                       voxel_size_mm: Sequence[float] | None = None) -> dict:
    """Write a tiny QSM-CI stage input folder; return the arrays written (name -> ndarray)."""
    folder = Path(folder)
    aff = axial_affine() if affine is None else affine
    x = np.linspace(-1.0, 1.0, shape[0])[:, None, None] * np.ones(shape)
    field_ppm = (0.05 * x).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[2:-2, 2:-2, 2:-2] = 1
    written = {"mask": mask}
    if stage in ("field-mapping", "end-to-end"):
        phase = np.stack([wrapped_phase(field_ppm, te, b0_t) for te in te_s], axis=-1)
        mag = np.ones((*shape, len(te_s)), np.float32)
        write_nifti(folder / "phase.nii.gz", phase, aff)
        write_nifti(folder / "magnitude.nii.gz", mag, aff)
        written.update(phase=phase, magnitude=mag)
    elif stage == "bfr":
        write_nifti(folder / "totalfield.nii.gz", field_ppm, aff)
        written["totalfield"] = field_ppm
    elif stage == "dipole":
        write_nifti(folder / "localfield.nii.gz", field_ppm, aff)
        written["localfield"] = field_ppm
    write_nifti(folder / "mask.nii.gz", mask, aff)
    voxel = voxel_size_mm if voxel_size_mm is not None else \
        np.linalg.norm(aff[:3, :3], axis=0).tolist()
    params = {"TE": list(te_s), "B0": b0_t, "voxel_size": list(voxel)}
    if b0_dir is not None:
        params["B0_dir"] = list(b0_dir)
    (folder / "params.json").write_text(json.dumps(params))
    return written


@pytest.fixture(name="write_qsmci_folder")
def write_qsmci_folder_fixture():
    """Factory, see :func:`write_qsmci_folder`."""
    return write_qsmci_folder


@pytest.fixture
def single_thread():
    """Run a test on one torch thread, then restore: small volumes gain nothing from threads,
    and on a shared 2-core machine OpenMP workers spin-waiting for each other make small
    operations up to 100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dipole_blocks_batch(batch: int = 2, shape: Sequence[int] = (16, 16, 16), seed: int = 0):
    """Piecewise-constant chi blocks and their field, two samples with different geometry.

    Returns ``(chi, field, mask, voxel_size_mm, b0_dir)``: chi and field ``(B, 1, X, Y, Z)`` float32
    ppm (field = ``forward_field(chi)`` inside the mask), mask the same shape, geometry ``(B, 3)``
    (sample 0 axial isotropic, sample 1 anisotropic and tilted).
    """
    import torch

    from qsmnet.physics import forward_field

    g = torch.Generator().manual_seed(seed)
    chi = torch.zeros(batch, 1, *shape)
    for b in range(batch):
        for _ in range(4):
            lo = torch.randint(0, shape[0] - 5, (3,), generator=g)
            chi[b, 0, lo[0]:lo[0] + 4, lo[1]:lo[1] + 5, lo[2]:lo[2] + 3] += 0.1 * (1 + b)
    mask = torch.zeros_like(chi)
    mask[..., 2:-2, 3:-3, 2:-2] = 1
    chi = chi * mask
    vs = torch.tensor([[1.0, 1.0, 1.0], [0.7, 0.9, 2.0]])[:batch]
    b0 = torch.tensor([[0.0, 0.0, 1.0], [0.3, -0.4, 0.866]])[:batch]
    field = forward_field(chi, vs, b0) * mask
    return chi, field, mask, vs, b0


@pytest.fixture(name="dipole_blocks_batch")
def dipole_blocks_batch_fixture():
    """Factory, see :func:`dipole_blocks_batch`."""
    return dipole_blocks_batch
