"""DICOM -> BIDS through dcm2niix: round trip of DICOM series written here with pydicom.

The truth is what the test writes: integer magnitude, integer-coded phase (and the radians it
codes), echo times, and the slice geometry (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing). Every converted voxel is located in the scanner frame by the NIfTI affine and
compared with the DICOM pixel at that place, so the check does not depend on how dcm2niix
orders the array axes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from qsmnet.cli import main  # noqa: E402
from qsmnet.io import QSMInputError, read_bids_subject  # noqa: E402
from qsmnet.io import dicom as qdicom  # noqa: E402

try:
    qdicom.find_dcm2niix()
    HAVE_DCM2NIIX = True
except QSMInputError:
    HAVE_DCM2NIIX = False
needs_dcm2niix = pytest.mark.skipif(not HAVE_DCM2NIIX, reason="dcm2niix not installed")

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
TE_MS = (4.0, 12.0, 20.0)
# (columns, rows, slices): all different, so that a swapped axis cannot pass
SHAPE = (24, 20, 16)
PIXEL_SPACING = (0.9, 1.1)  # DICOM order: (between rows, between columns), mm
SLICE_MM = 2.0


def _geometry(tilt_deg: float):
    """Unit row / column / slice-normal directions (LPS) and the first slice's corner (mm)."""
    t = math.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(t), -math.sin(t)])
    normal = np.cross(row, col)
    corner = np.array([-10.5, -12.0, -15.0])
    return row, col, normal, corner


def _phase_truth(rng: np.random.Generator) -> np.ndarray:
    """(E, C, R, S) wrapped phase, rad: an offset plus a field growing with TE (wraps)."""
    c, r, s = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    field_rad_per_ms = 0.9 * (c ** 2 + 0.5 * r - 0.7 * s * c) + 0.05 * rng.standard_normal(SHAPE)
    offset = 0.6 * r - 0.4
    te = np.asarray(TE_MS)[:, None, None, None]
    return np.angle(np.exp(1j * (offset + field_rad_per_ms * te)))


def _dataset(path: Path, pixels: np.ndarray, *, series: int, instance: int, echo: int,
             image_type: list[str], position, row, col, uids: dict, manufacturer: str,
             slope: float = 1.0, intercept: float = 0.0, signed: bool = False,
             extra=None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.PatientName, ds.PatientID = "Phantom^Test", "qsmnet0"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids[series]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.StudyDate, ds.SeriesDate, ds.AcquisitionTime = "20240101", "20240101", "120000"
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = series, instance, 1
    ds.SeriesDescription = ds.ProtocolName = "gre_me_qsm"
    ds.ImageType = image_type
    ds.MagneticFieldStrength = 3.0
    ds.EchoTime = TE_MS[echo - 1]
    ds.EchoNumbers = echo
    ds.RepetitionTime = 30.0
    ds.FlipAngle = 15.0
    ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "GR", "SP", "3D"
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = SLICE_MM
    ds.SpacingBetweenSlices = SLICE_MM
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for tag, vr, value in extra or ():
        ds.add_new(tag, vr, value)
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, stored: np.ndarray, *, part: str, tilt_deg: float,
                 manufacturer: str = "SIEMENS", slope: float = 1.0, intercept: float = 0.0,
                 signed: bool = False, image_type=None, extra=None, first_series: int = 2,
                 uids: dict | None = None) -> dict:
    """Write (E, C, R, S) stored values as one series per echo, one file per slice."""
    row, col, normal, corner = _geometry(tilt_deg)
    uids = uids if uids is not None else {"study": generate_uid(), "frame": generate_uid()}
    image_type = image_type or ["ORIGINAL", "PRIMARY", "P" if part == "phase" else "M", "ND"]
    folder.mkdir(parents=True, exist_ok=True)
    for e in range(stored.shape[0]):
        series = first_series + e
        uids[series] = generate_uid()
        for k in range(SHAPE[2]):
            position = corner + k * SLICE_MM * normal
            # DICOM pixel (row j, column i) holds voxel (i, j) of slice k
            _dataset(folder / f"{part}_e{e + 1}_s{k:03d}.dcm", stored[e, :, :, k].T,
                     series=series, instance=k + 1, echo=e + 1, image_type=image_type,
                     position=position, row=row, col=col, uids=uids,
                     manufacturer=manufacturer, slope=slope, intercept=intercept,
                     signed=signed, extra=extra)
    return uids


def _world_ras(tilt_deg: float) -> np.ndarray:
    """(C, R, S, 3) scanner RAS position (mm) of every DICOM voxel, from the written geometry."""
    row, col, normal, corner = _geometry(tilt_deg)
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    # column index i moves along the row direction by the column spacing, and vice versa
    lps = (corner + i[..., None] * PIXEL_SPACING[1] * row + j[..., None] * PIXEL_SPACING[0] * col
           + k[..., None] * SLICE_MM * normal)
    return lps * np.array([-1.0, -1.0, 1.0])


def _voxel_index(acq_affine: np.ndarray, tilt_deg: float) -> np.ndarray:
    """(C, R, S, 3) NIfTI index of each DICOM voxel via the converted affine; integers."""
    world = _world_ras(tilt_deg)
    idx = np.einsum("ij,...j->...i", np.linalg.inv(acq_affine)[:3, :3], world) \
        + np.linalg.inv(acq_affine)[:3, 3]
    # positions are exact to float rounding (mm values ~ 1e1): 1e-3 voxel is far above it
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-3)
    return np.round(idx).astype(int)


def _siemens_subject(tmp_path: Path, tilt_deg: float, rng) -> tuple[Path, np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Magnitude (uint, decaying) and signed Siemens phase -4096..4095 DICOM series."""
    phase = _phase_truth(rng)
    stored_phase = np.round(phase * 4096 / math.pi).astype(np.int64)
    stored_phase[stored_phase == 4096] = -4096  # +pi is -pi in the half-open range
    decay = np.exp(-np.asarray(TE_MS) / 30.0)[:, None, None, None]
    mag = np.round(1000 * decay * (1.5 + rng.random(SHAPE))).astype(np.int64)
    dicom = tmp_path / "dicom"
    uids = write_series(dicom / "mag", mag, part="mag", tilt_deg=tilt_deg, first_series=2)
    write_series(dicom / "phase", stored_phase, part="phase", tilt_deg=tilt_deg, signed=True,
                 first_series=10, uids=uids)
    return dicom, mag, stored_phase, phase


@needs_dcm2niix
@pytest.mark.parametrize("tilt_deg", [0.0, 25.0])
def test_siemens_round_trip(tmp_path, tilt_deg):
    rng = np.random.default_rng(0)
    dicom, mag, stored_phase, phase = _siemens_subject(tmp_path, tilt_deg, rng)
    bids = tmp_path / "bids"
    written = qdicom.convert_dicom_to_bids(dicom, bids, subject="01")
    names = sorted(p.name for p in written)
    assert names == sorted(f"sub-01_echo-{e}_part-{p}_MEGRE.{x}" for e in (1, 2, 3)
                           for p in ("mag", "phase") for x in ("nii.gz", "json"))
    (acq,) = read_bids_subject(bids, "01")
    assert acq.te_s == (0.004, 0.012, 0.02)
    assert acq.b0_t == 3.0 and acq.phase_sign == 1
    idx = _voxel_index(acq.affine, tilt_deg)
    x, y, z = idx[..., 0], idx[..., 1], idx[..., 2]
    # every DICOM voxel lands on a distinct converted voxel
    assert len({tuple(v) for v in idx.reshape(-1, 3)}) == math.prod(SHAPE)
    for e in range(3):
        np.testing.assert_array_equal(acq.magnitude[e][x, y, z], mag[e])
        read = acq.phase[e][x, y, z].astype(np.float64)
        # exact code: v * pi / 4096 (float32 rounding of |v| <= pi: 4e-7)
        np.testing.assert_allclose(read, stored_phase[e] * math.pi / 4096, atol=1e-6)
        # and the written radians within half the quantisation step 2*pi/8192
        err = np.angle(np.exp(1j * (read - phase[e])))
        assert np.max(np.abs(err)) <= math.pi / 8192 + 1e-6
    # voxel sizes: the converted axis that carries each DICOM axis has its spacing
    spacing = {0: PIXEL_SPACING[1], 1: PIXEL_SPACING[0], 2: SLICE_MM}
    for dicom_axis, mm in spacing.items():
        step = np.zeros(3, int)
        step[dicom_axis] = 1
        moved = idx[tuple(step)] - idx[0, 0, 0]
        axis = int(np.flatnonzero(moved)[0])
        assert abs(acq.voxel_size_mm[axis] - mm) < 1e-4
    # B0 (scanner z = RAS S) in the converted array axes, from the DICOM directions alone
    row, col, normal, _ = _geometry(tilt_deg)
    expected = np.zeros(3)
    for dicom_axis, direction in enumerate((row, col, normal)):
        step = np.zeros(3, int)
        step[dicom_axis] = 1
        moved = idx[tuple(step)] - idx[0, 0, 0]
        axis = int(np.flatnonzero(moved)[0])
        expected[axis] = direction[2] * moved[axis]  # z is the same in LPS and RAS
    np.testing.assert_allclose(acq.b0_dir, expected, atol=1e-5)
    assert abs(math.degrees(math.acos(abs(acq.b0_dir @ expected)))) < 0.01
    if tilt_deg:
        assert math.degrees(math.acos(abs(acq.b0_dir).max())) == pytest.approx(tilt_deg, abs=1e-3)
    sidecar = json.loads((bids / "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.json").read_text())
    assert sidecar["EchoTime"] == 0.012 and sidecar["MagneticFieldStrength"] == 3
    assert (bids / "dataset_description.json").is_file()
    assert not list(bids.glob(".qsmnet-convert-*"))


@needs_dcm2niix
def test_classic_12bit_siemens_phase_and_session(tmp_path):
    """Stored 0..4095 with slope 2, intercept -4096 (the classic Siemens phase coding)."""
    rng = np.random.default_rng(1)
    phase = _phase_truth(rng)[:2]
    stored = np.round((phase + math.pi) * 4096 / (2 * math.pi)).astype(np.int64) % 4096
    dicom = tmp_path / "dicom"
    write_series(dicom, stored, part="phase", tilt_deg=0.0, slope=2.0, intercept=-4096.0)
    bids = tmp_path / "bids"
    assert main(["convert", str(dicom), str(bids), "--subject", "sub-07", "--session",
                 "pre"]) == 0
    (acq,) = read_bids_subject(bids, "07")
    assert acq.magnitude is None and acq.entities == {"sub": "07", "ses": "pre"}
    idx = _voxel_index(acq.affine, 0.0)
    for e in range(2):
        read = acq.phase[e][idx[..., 0], idx[..., 1], idx[..., 2]].astype(np.float64)
        # display value 2 v - 4096 is v * 2pi/4096 - pi
        np.testing.assert_allclose(read, stored[e] * 2 * math.pi / 4096 - math.pi, atol=1e-6)
        err = np.angle(np.exp(1j * (read - phase[e])))
        assert np.max(np.abs(err)) <= math.pi / 4096 + 1e-6


@needs_dcm2niix
def test_existing_outputs_refused_then_overwritten(tmp_path, capsys):
    rng = np.random.default_rng(2)
    dicom, _, stored_phase, _ = _siemens_subject(tmp_path, 0.0, rng)
    bids = tmp_path / "bids"
    qdicom.convert_dicom_to_bids(dicom, bids, subject="01")
    target = bids / "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"
    stale = bids / "sub-01/anat/sub-01_echo-4_part-phase_MEGRE.nii.gz"
    stale.write_bytes(b"old")
    before = target.stat().st_mtime_ns
    assert main(["convert", str(dicom), str(bids), "--subject", "01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "exists" in err
    assert target.stat().st_mtime_ns == before and stale.exists()
    assert main(["convert", str(dicom), str(bids), "--subject", "01", "--overwrite"]) == 0
    assert not stale.exists()  # the earlier set's extra echo does not survive
    (acq,) = read_bids_subject(bids, "01")
    assert acq.n_echoes == 3


@needs_dcm2niix
def test_failed_conversion_writes_nothing(tmp_path, capsys):
    rng = np.random.default_rng(3)
    mag = np.round(1000 * (1 + rng.random((2, *SHAPE)))).astype(np.int64)
    dicom = tmp_path / "dicom"
    write_series(dicom, mag, part="mag", tilt_deg=0.0)  # magnitude only: no phase
    bids = tmp_path / "bids"
    assert main(["convert", str(dicom), str(bids)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no phase images" in err
    assert not bids.exists()
    bids.mkdir()
    assert main(["convert", str(dicom), str(bids)]) == 2
    assert list(bids.iterdir()) == []


def test_missing_dcm2niix_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(qdicom.shutil, "which", lambda name: None)
    monkeypatch.setitem(__import__("sys").modules, "dcm2niix", None)  # import fails
    monkeypatch.setattr(qdicom.sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(QSMInputError) as info:
        qdicom.find_dcm2niix()
    assert str(info.value) == qdicom.DCM2NIIX_MISSING
    assert "pip install qsmnet[dicom]" in str(info.value)
    (tmp_path / "dicom").mkdir()
    assert main(["convert", str(tmp_path / "dicom"), str(tmp_path / "bids")]) == 2
    assert not (tmp_path / "bids").exists()
