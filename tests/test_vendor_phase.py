"""Vendor phase conventions, recognised from the data and the dcm2niix sidecars.

Truths: the radians each stored value codes by the vendor's own definition (Siemens
``v * pi / 4096``; Philips display values ``D = R * RS + RI`` in milliradians, and dcm2niix's
precise values ``D / (RS * SS)``; degrees ``v * pi / 180``), values chosen to wrap, and GE's
opposite polarity (the flipped phase of a subject gives the same field and chi as the original).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmnet.cli import main
from qsmnet.io import QSMInputError, phase_to_radians, read_bids_subject
from qsmnet.io.phase import phase_sign_from_sidecar, sidecar_phase_rescale

SHAPE = (12, 10, 9)
TE_S = (0.004, 0.008)
# A Philips phase series as dcm2niix reports it (values from a public dcm2niix issue thread)
RS, RI, SS = 1.53455, -3142.0, 651.74


def write_bids(root: Path, phase: np.ndarray, meta: dict, dtype=np.float32, slope=None,
               inter=None, subject: str = "01") -> Path:
    """One subject, one NIfTI + sidecar per echo of ``phase`` (E, X, Y, Z), no magnitude."""
    anat = root / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    for e, volume in enumerate(phase):
        img = nib.Nifti1Image(volume.astype(dtype), np.diag([1.0, 1.0, 1.0, 1.0]))
        if slope is not None:
            img.header.set_slope_inter(slope, inter)
        stem = anat / f"sub-{subject}_echo-{e + 1}_part-phase_MEGRE"
        nib.save(img, f"{stem}.nii.gz")
        sidecar = {"EchoTime": TE_S[e], "MagneticFieldStrength": 3.0, **meta}
        Path(f"{stem}.json").write_text(json.dumps(sidecar))
    return root


def _wrap(rad):
    return np.angle(np.exp(1j * np.asarray(rad, dtype=np.float64)))


def _raw_12bit(rng) -> np.ndarray:
    """(E, X, Y, Z) stored integers 0..4095 with both ends present."""
    raw = rng.integers(0, 4096, size=(len(TE_S), *SHAPE))
    raw[:, 0, 0, 0], raw[:, 0, 0, 1] = 0, 4095
    return raw


def test_siemens_signed_integers(tmp_path):
    raw = np.random.default_rng(0).integers(-4096, 4096, size=(2, *SHAPE))
    raw[:, 0, 0, :3] = [[-4096, 0, 4095]] * 2
    write_bids(tmp_path, raw, {"Manufacturer": "Siemens"}, dtype=np.int16)
    (acq,) = read_bids_subject(tmp_path, "01")
    # -4096 -> -pi, 0 -> 0, 4095 -> pi - 2pi/8192; float32 rounding 4e-7
    np.testing.assert_allclose(acq.phase, raw * math.pi / 4096, atol=1e-6)
    assert acq.phase[0, 0, 0, 2] == pytest.approx(math.pi - 2 * math.pi / 8192, abs=1e-6)
    assert acq.phase_sign == 1


@pytest.mark.parametrize("storage", ["stored integers", "precise floats", "display floats"])
def test_philips_scaled_phase_to_radians(tmp_path, storage, caplog):
    raw = _raw_12bit(np.random.default_rng(1))
    display_mrad = raw * RS + RI  # -3142 .. 3142.0 mrad: the top values wrap past pi
    meta = {"Manufacturer": "Philips", "PhilipsRescaleSlope": RS, "PhilipsRescaleIntercept": RI,
            "PhilipsScaleSlope": SS,
            "UsePhilipsFloatNotDisplayScaling": int(storage != "display floats")}
    if storage == "stored integers":  # dcm2niix's default: R with P's slope/inter in the header
        write_bids(tmp_path, raw, meta, dtype=np.uint16, slope=1 / SS, inter=RI / (RS * SS))
    elif storage == "precise floats":  # P = D / (RS * SS) as float32
        write_bids(tmp_path, display_mrad / (RS * SS), meta)
    else:
        write_bids(tmp_path, display_mrad, meta)
    with caplog.at_level(logging.INFO, logger="qsmnet"):
        (acq,) = read_bids_subject(tmp_path, "01")
    truth = _wrap(display_mrad / 1000.0)
    assert np.max(display_mrad) / 1000 > math.pi  # the known wrap is exercised
    # float32 storage of P (relative 6e-8 of 3.14) and of the radians: below 1e-6 rad
    err = _wrap(acq.phase - truth)
    assert np.max(np.abs(err)) < 1e-6
    assert "milliradians" in caplog.text
    assert ("Philips phase" in caplog.text) == (storage != "display floats")
    # read as radians, the precise values would have been 1.3e-4 (relative) off
    assert abs(RS * SS / 1000 - 1) > 1e-4


def test_philips_sidecar_rescale_rules():
    meta = {"Manufacturer": "Philips", "PhilipsRescaleSlope": RS, "PhilipsScaleSlope": SS,
            "PhilipsRescaleIntercept": RI}
    precise = {**meta, "UsePhilipsFloatNotDisplayScaling": 1}
    assert sidecar_phase_rescale(precise, "a.json")[0] == (RS * SS, 0.0)
    display = {**meta, "UsePhilipsFloatNotDisplayScaling": 0}
    assert sidecar_phase_rescale(display, "a.json")[0] == (1.0, 0.0)
    # stored integers: D = (v - inter) / slope * RS + RI whatever the header scaling
    (scale, offset), _ = sidecar_phase_rescale(display, "a.json", stored_scaling=(2.0, -10.0))
    assert (scale, offset) == (RS / 2.0, RI + 10.0 * RS / 2.0)
    # real-world values (which dcm2niix prefers when present) are kept as they are
    assert sidecar_phase_rescale({**precise, "PhilipsRWVSlope": 1.0}, "a.json")[0] == (1.0, 0.0)
    assert sidecar_phase_rescale({"Manufacturer": "Siemens"}, "a.json") == ((1.0, 0.0), None)
    with pytest.raises(QSMInputError, match="a.json: PhilipsScaleSlope"):
        sidecar_phase_rescale({**precise, "PhilipsScaleSlope": "x"}, "a.json")


def test_milliradians_recognised_and_forced():
    mrad = np.linspace(-3141.0, 3141.5, 200)
    rad, message = phase_to_radians(mrad, "ph.nii.gz", mrad=True)  # a Philips series
    np.testing.assert_allclose(rad, mrad / 1000, atol=1e-6)
    assert "milliradians" in message and "--phase-units overrides" in message
    # without a vendor that stores them, milliradian-like values are refused, naming the flag
    with pytest.raises(QSMInputError, match="rad, deg, int or mrad"):
        phase_to_radians(np.round(mrad), "ph.nii.gz")
    # 4000 mrad forced: wraps to 4 - 2pi
    rad, _ = phase_to_radians(np.array([4000.0, -1000.0]), "ph.nii.gz", units="mrad")
    np.testing.assert_allclose(rad, [4 - 2 * math.pi, -1.0], atol=1e-6)


def test_degrees_known_values_and_wrap(tmp_path):
    rng = np.random.default_rng(2)
    deg = rng.uniform(0.0, 360.0, size=(2, *SHAPE))
    deg[:, 0, 0, :3] = [[0.0, 90.0, 270.0]] * 2  # 270 degrees is -pi/2
    write_bids(tmp_path, deg, {"Manufacturer": "Siemens"})
    (acq,) = read_bids_subject(tmp_path, "01")
    np.testing.assert_allclose(acq.phase[0, 0, 0, :3], [0.0, math.pi / 2, -math.pi / 2],
                               atol=1e-6)
    np.testing.assert_allclose(_wrap(acq.phase - np.radians(deg)), 0.0, atol=1e-6)


def test_ambiguous_phase_names_the_flag(tmp_path):
    write_bids(tmp_path, np.random.default_rng(3).uniform(-50, 50, size=(2, *SHAPE)), {})
    with pytest.raises(QSMInputError, match=r"--phase-units rad, deg, int or mrad"):
        read_bids_subject(tmp_path, "01")


def test_ge_sign_flipped_unless_stated(tmp_path, caplog):
    phase = _wrap(np.random.default_rng(4).uniform(-3, 3, size=(2, *SHAPE)))
    write_bids(tmp_path, phase, {"Manufacturer": "GE"})
    with caplog.at_level(logging.INFO, logger="qsmnet"):
        (acq,) = read_bids_subject(tmp_path, "01")
    assert acq.phase_sign == -1
    assert "GE phase decreases with the field" in caplog.text
    np.testing.assert_allclose(acq.to_sample()["phase"].numpy(), -phase, atol=1e-6)
    assert read_bids_subject(tmp_path, "01", phase_sign=1)[0].phase_sign == 1
    assert phase_sign_from_sidecar({"Manufacturer": "GE MEDICAL SYSTEMS"}, "x")[0] == -1
    assert phase_sign_from_sidecar({"Manufacturer": "Siemens"}, "x") == (1, None)
    assert phase_sign_from_sidecar({"Manufacturer": "GE"}, "x", phase_sign=1) == (1, None)


@pytest.mark.slow
def test_ge_subject_gives_the_same_chi_and_records_the_sign(tmp_path):
    """Predict on a simulated subject and on its GE twin (phase negated, Manufacturer GE)."""
    from qsmnet.simulation.bids import write_simulated_subject

    root = tmp_path / "bids"
    written = write_simulated_subject(root, "01", shape=(32, 32, 24), te_s=(0.004, 0.012))
    twin = root / "sub-02" / "anat"
    twin.mkdir(parents=True)
    for kind in ("phase", "magnitude"):
        for path, side in zip(written[kind], written[f"{kind}_json"]):
            img = nib.load(path)
            data = np.asarray(img.dataobj, dtype=np.float32)
            data = -data if kind == "phase" else data
            name = Path(path).name.replace("sub-01", "sub-02")
            nib.save(nib.Nifti1Image(data, img.affine, img.header), twin / name)
            meta = {**json.loads(Path(side).read_text()), "Manufacturer": "GE"}
            (twin / Path(side).name.replace("sub-01", "sub-02")).write_text(json.dumps(meta))
    assert main(["predict", "--bids", str(root), "--method", "tkd", "--device", "cpu",
                 "--no-preview", "--skip-memory-check"]) == 0
    deriv = root / "derivatives" / "qsmnet"
    chi = [nib.load(deriv / f"sub-0{i}/anat/sub-0{i}_Chimap.nii.gz").get_fdata() for i in (1, 2)]
    records = [json.loads(p.read_text()) for p in sorted(deriv.glob("sub-0*/anat/*.json"))]
    # the same numbers up to float32 rounding of -phase in the pipeline
    np.testing.assert_allclose(chi[1], chi[0], atol=1e-4 * np.abs(chi[0]).max())
    assert np.abs(chi[0]).max() > 0
    text = json.dumps(records)
    assert '"phase_sign": -1' in text and '"phase_sign": 1' in text


def test_philips_dicom_through_dcm2niix(tmp_path):
    """Philips phase DICOM (RS, RI, private scale slope SS) -> dcm2niix precise values ->
    the radians of the display values, with a wrap at the top of the range."""
    pytest.importorskip("pydicom")
    from qsmnet.io.dicom import convert_dicom_to_bids, find_dcm2niix
    try:
        find_dcm2niix()
    except QSMInputError:
        pytest.skip("dcm2niix not installed")
    from test_io_dicom import SHAPE as DICOM_SHAPE, _voxel_index, write_series

    rng = np.random.default_rng(5)
    raw = rng.integers(0, 4096, size=(2, *DICOM_SHAPE))
    raw[:, 0, 0, 0], raw[:, 0, 0, 1] = 0, 4095
    write_series(tmp_path / "dicom", raw, part="phase", tilt_deg=0.0,
                 manufacturer="Philips Medical Systems", slope=RS, intercept=RI,
                 image_type=["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"],
                 extra=[(0x20050010, "LO", "Philips MR Imaging DD 001"),
                        (0x2005100E, "FL", SS)])
    convert_dicom_to_bids(tmp_path / "dicom", tmp_path / "bids", subject="01")
    meta = json.loads((tmp_path / "bids/sub-01/anat/sub-01_echo-1_part-phase_MEGRE.json")
                      .read_text())
    assert meta["UsePhilipsFloatNotDisplayScaling"] == 1
    assert meta["PhilipsScaleSlope"] == pytest.approx(SS)
    (acq,) = read_bids_subject(tmp_path / "bids", "01")
    assert acq.phase_sign == 1
    idx = _voxel_index(acq.affine, 0.0)  # where each DICOM voxel went
    for e in range(2):
        read = acq.phase[e][idx[..., 0], idx[..., 1], idx[..., 2]]
        truth = (raw[e] * RS + RI) / 1000.0
        # from the stored integers: float32 rounding of the radians only
        np.testing.assert_allclose(_wrap(read - truth), 0.0, atol=1e-6)
        assert np.all(read < math.pi) and np.any(truth > math.pi)  # the top values wrapped


def test_cli_phase_sign_defaults_and_convert_checks(tmp_path, capsys):
    from qsmnet.cli import build_parser

    parser = build_parser()
    # predict leaves the sign unset so that the BIDS reader can take GE's from the sidecar
    assert parser.parse_args(["predict", "--bids", "x"]).phase_sign is None
    assert parser.parse_args(["predict", "--bids", "x", "--phase-sign", "1"]).phase_sign == 1
    assert parser.parse_args(["run-stage", "dipole", "a", "b"]).phase_sign == 1
    args = parser.parse_args(["convert", "d", "b", "--subject", "02", "--session", "s1"])
    assert (args.subject, args.session, args.overwrite) == ("02", "s1", False)
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "bids")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "folder not found (DICOM_DIR)" in err
    (tmp_path / "dicom").mkdir()
    assert main(["convert", str(tmp_path / "dicom"), str(tmp_path / "bids"),
                 "--subject", "a_b"]) == 2
    assert "--subject: 'a_b' is not a BIDS label" in capsys.readouterr().err
    assert not (tmp_path / "bids").exists()
