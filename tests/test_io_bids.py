"""BIDS multi-echo GRE reading on hand-made subjects, and derivative naming."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from qsmnet.io import (
    BIDS_MASK_FROM_DERIVATIVES,
    QSMInputError,
    bids_derivative_path,
    find_bids_subjects,
    parse_bids_name,
    read_bids_subject,
    write_derivative_description,
)
from qsmnet.physics.geometry import b0_dir_from_affine


def test_two_echo_subject(tmp_path, write_megre_subject, small_shape):
    written = write_megre_subject(tmp_path, "01", te_s=(0.0045, 0.0093), b0_t=2.89)
    (acq,) = read_bids_subject(tmp_path, "01")
    assert acq.name == "sub-01"
    assert acq.entities == {"sub": "01"}
    assert acq.te_s == (0.0045, 0.0093)
    assert acq.b0_t == 2.89
    assert acq.shape == small_shape and acq.phase.shape == (2, *small_shape)
    np.testing.assert_array_equal(acq.phase, written["phase_rad"])
    assert acq.magnitude is not None and acq.magnitude[0, 0, 0, 0] == pytest.approx(
        100 * math.exp(-0.0045 / 0.03), rel=1e-6)
    assert acq.mask is None
    np.testing.assert_allclose(acq.b0_dir, [0.0, 0.0, 1.0])
    # "sub-01" and "01" name the same subject.
    assert read_bids_subject(tmp_path, "sub-01")[0].te_s == acq.te_s


def test_echo_10_sorts_after_echo_2(tmp_path, write_megre_subject):
    te = tuple(0.002 * k for k in range(1, 12))  # 11 echoes: echo-1 .. echo-11
    written = write_megre_subject(tmp_path, "02", te_s=te, shape=(4, 5, 6), with_magnitude=False)
    (acq,) = read_bids_subject(tmp_path, "02")
    assert acq.te_s == pytest.approx(te)
    assert acq.magnitude is None
    # Lexical order would put echo-10 and echo-11 right after echo-1.
    np.testing.assert_array_equal(acq.phase, written["phase_rad"])
    np.testing.assert_array_equal(acq.phase[9], written["phase_rad"][9])


def test_groups_by_acq_and_session(tmp_path, write_megre_subject):
    write_megre_subject(tmp_path, "03", entities="_acq-fast")
    write_megre_subject(tmp_path, "03", entities="_acq-slow_run-2", te_s=(0.005, 0.01, 0.015))
    write_megre_subject(tmp_path, "03", ses="2")
    acqs = read_bids_subject(tmp_path, "03")
    names = [a.name for a in acqs]
    assert names == ["sub-03_acq-fast", "sub-03_acq-slow_run-2", "sub-03_ses-2"]
    assert [a.n_echoes for a in acqs] == [2, 3, 2]
    assert acqs[2].entities == {"sub": "03", "ses": "2"}


def test_find_subjects(tmp_path, write_megre_subject):
    write_megre_subject(tmp_path, "10")
    write_megre_subject(tmp_path, "02", ses="a")
    (tmp_path / "sub-99" / "anat").mkdir(parents=True)  # no MEGRE phase
    (tmp_path / "sub-99" / "anat" / "sub-99_T1w.nii.gz").write_bytes(b"")
    assert find_bids_subjects(tmp_path) == ["02", "10"]
    with pytest.raises(QSMInputError, match="nowhere: BIDS folder not found"):
        find_bids_subjects(tmp_path / "nowhere")


def test_b0_dir_from_sidecar_else_affine(tmp_path, write_megre_subject, oblique_affine):
    write_megre_subject(tmp_path / "a", "01", affine=oblique_affine)
    (acq,) = read_bids_subject(tmp_path / "a", "01")
    # Oblique by 20 deg about x: b0 = (0, sin 20, cos 20) in array axes.
    t = math.radians(20.0)
    np.testing.assert_allclose(acq.b0_dir, [0.0, math.sin(t), math.cos(t)], atol=1e-6)
    np.testing.assert_allclose(acq.b0_dir, b0_dir_from_affine(oblique_affine), atol=1e-6)
    np.testing.assert_allclose(acq.voxel_size_mm, [1.0, 1.2, 2.0], rtol=1e-6)

    write_megre_subject(tmp_path / "b", "01", affine=oblique_affine,
                        sidecar_extra={"B0_dir": [1.0, 0.0, 1.0]})
    (acq,) = read_bids_subject(tmp_path / "b", "01")
    np.testing.assert_allclose(acq.b0_dir, [math.sqrt(0.5), 0.0, math.sqrt(0.5)])


def test_sidecar_inheritance(tmp_path, write_megre_subject):
    written = write_megre_subject(tmp_path, "01", te_s=(0.004, 0.008), b0_t=3.0)
    # Move the field strength to a dataset-level sidecar; the per-echo files keep EchoTime.
    for p in written["phase"] + written["magnitude"]:
        sidecar = p.with_name(p.name.replace(".nii.gz", ".json"))
        sidecar.write_text(json.dumps({"EchoTime": json.loads(sidecar.read_text())["EchoTime"]}))
    (tmp_path / "MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": 7.0}))
    (acq,) = read_bids_subject(tmp_path, "01")
    assert acq.b0_t == 7.0 and acq.te_s == (0.004, 0.008)


def _sidecar(path):
    return path.with_name(path.name.replace(".nii.gz", ".json"))


def test_missing_echo_time_names_sidecar(tmp_path, write_megre_subject):
    written = write_megre_subject(tmp_path, "01", with_magnitude=False)
    _sidecar(written["phase"][1]).write_text(json.dumps({"MagneticFieldStrength": 3.0}))
    with pytest.raises(QSMInputError, match="sub-01_echo-2_part-phase_MEGRE.json: no EchoTime"):
        read_bids_subject(tmp_path, "01")


def test_echo_time_in_ms_names_sidecar(tmp_path, write_megre_subject):
    write_megre_subject(tmp_path, "01", te_s=(4.0, 8.0))
    with pytest.raises(QSMInputError,
                       match="sub-01_echo-1_part-phase_MEGRE.json: EchoTime 4 looks like "
                             "milliseconds; BIDS EchoTime is in seconds"):
        read_bids_subject(tmp_path, "01")


def test_missing_or_inconsistent_field_strength(tmp_path, write_megre_subject):
    written = write_megre_subject(tmp_path / "a", "01", with_magnitude=False)
    _sidecar(written["phase"][0]).write_text(json.dumps({"EchoTime": 0.004}))
    with pytest.raises(QSMInputError,
                       match="sub-01_echo-1_part-phase_MEGRE.json: no MagneticFieldStrength"):
        read_bids_subject(tmp_path / "a", "01")
    written = write_megre_subject(tmp_path / "b", "01", with_magnitude=False)
    _sidecar(written["phase"][1]).write_text(
        json.dumps({"EchoTime": 0.008, "MagneticFieldStrength": 1.5}))
    with pytest.raises(QSMInputError, match="echo-2_part-phase_MEGRE.json: MagneticField"):
        read_bids_subject(tmp_path / "b", "01")
    write_megre_subject(tmp_path / "c", "01", b0_t=21.0)
    with pytest.raises(QSMInputError, match=r"echo-1_part-phase_MEGRE.json: field strength 21"):
        read_bids_subject(tmp_path / "c", "01")


def test_te_not_increasing_names_acquisition(tmp_path, write_megre_subject):
    write_megre_subject(tmp_path, "01", te_s=(0.008, 0.004))
    with pytest.raises(QSMInputError, match="sub-01 .*strictly increasing"):
        read_bids_subject(tmp_path, "01")


def test_echo_shape_mismatch_names_file(tmp_path, write_megre_subject, write_nifti):
    written = write_megre_subject(tmp_path, "01", shape=(6, 6, 5), with_magnitude=False)
    write_nifti(written["phase"][1], np.zeros((6, 6, 4), np.float32))
    with pytest.raises(QSMInputError) as err:
        read_bids_subject(tmp_path, "01")
    assert str(err.value).startswith("sub-01_echo-2_part-phase_MEGRE.nii.gz: shape (6, 6, 4) "
                                     "differs from echo 1")


def test_magnitude_echoes_must_match(tmp_path, write_megre_subject):
    written = write_megre_subject(tmp_path, "01")
    written["magnitude"][1].unlink()
    with pytest.raises(QSMInputError, match=r"sub-01: magnitude echoes \[1\] do not match"):
        read_bids_subject(tmp_path, "01")


def test_missing_subject_or_files(tmp_path, write_megre_subject):
    write_megre_subject(tmp_path, "01")
    with pytest.raises(QSMInputError, match="sub-02: subject folder not found"):
        read_bids_subject(tmp_path, "02")
    (tmp_path / "sub-05" / "anat").mkdir(parents=True)
    with pytest.raises(QSMInputError, match="sub-05: no .*part-phase_MEGRE"):
        read_bids_subject(tmp_path, "05")


def test_mask_only_when_asked(tmp_path, write_megre_subject, write_nifti, small_shape):
    write_megre_subject(tmp_path, "01", entities="_acq-x")
    mask = np.zeros(small_shape, np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    deriv = tmp_path / "derivatives" / "masks" / "sub-01" / "anat"
    write_nifti(deriv / "sub-01_acq-x_desc-brain_mask.nii.gz", mask)
    write_nifti(deriv / "sub-01_acq-y_desc-brain_mask.nii.gz", np.ones(small_shape, np.uint8))
    (acq,) = read_bids_subject(tmp_path, "01")
    assert acq.mask is None  # not asked
    (acq,) = read_bids_subject(tmp_path, "01", mask_path=BIDS_MASK_FROM_DERIVATIVES)
    assert acq.mask.sum() == 64  # acq-x's mask, not acq-y's
    (acq,) = read_bids_subject(tmp_path, "01",
                               mask_path=deriv / "sub-01_acq-y_desc-brain_mask.nii.gz")
    assert acq.mask.all()


def test_mask_from_derivatives_missing_or_wrong(tmp_path, write_megre_subject, write_nifti):
    write_megre_subject(tmp_path, "01")
    with pytest.raises(QSMInputError, match="sub-01: no mask found"):
        read_bids_subject(tmp_path, "01", mask_path=BIDS_MASK_FROM_DERIVATIVES)
    deriv = tmp_path / "derivatives" / "m" / "sub-01" / "anat"
    write_nifti(deriv / "sub-01_mask.nii.gz", np.ones((3, 3, 3), np.uint8))
    with pytest.raises(QSMInputError, match=r"sub-01_mask.nii.gz: shape \(3, 3, 3\) differs"):
        read_bids_subject(tmp_path, "01", mask_path=BIDS_MASK_FROM_DERIVATIVES)


def test_derivative_path(tmp_path, write_megre_subject):
    write_megre_subject(tmp_path, "01", entities="_acq-x_run-1")
    write_megre_subject(tmp_path, "01", ses="pre")
    a, b = read_bids_subject(tmp_path, "01")
    deriv = tmp_path / "derivatives" / "qsmnet"
    assert bids_derivative_path(tmp_path, a, "Chimap") == (
        deriv / "sub-01" / "anat" / "sub-01_acq-x_run-1_Chimap.nii.gz")
    assert bids_derivative_path(tmp_path, b, "Chimap", out_root=tmp_path / "out") == (
        tmp_path / "out" / "sub-01" / "ses-pre" / "anat" / "sub-01_ses-pre_Chimap.nii.gz")
    with pytest.raises(ValueError):
        bids_derivative_path(tmp_path, a, "Chi_map")


def test_derivative_description(tmp_path):
    p = write_derivative_description(tmp_path / "derivatives" / "qsmnet")
    desc = json.loads(p.read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "qsmnet"
    p.write_text('{"Name": "mine"}')
    write_derivative_description(tmp_path / "derivatives" / "qsmnet")
    assert json.loads(p.read_text()) == {"Name": "mine"}  # never overwritten


def test_parse_bids_name():
    assert parse_bids_name("sub-01_ses-2_echo-10_part-mag_MEGRE.nii") == (
        {"sub": "01", "ses": "2", "echo": "10", "part": "mag"}, "MEGRE", ".nii")
    assert parse_bids_name("notbids.nii.gz") == ({}, "notbids", ".nii.gz")
    assert parse_bids_name("sub-01_bad_MEGRE.nii.gz") is None
    assert parse_bids_name("sub-01_MEGRE.txt") is None


def test_reads_qsm_forward_output(tmp_path):
    """A peer tool's BIDS output: qsm-forward's sidecar B0_dir agrees with its affine and ours."""
    pytest.importorskip("qsm_forward")
    root = tmp_path / "qf"
    proc = subprocess.run(
        [sys.executable, "-m", "qsm_forward.main", "simple", str(root), "--resolution", "16", "16",
         "16", "--small-cylinder-radii", "2", "2", "2", "3", "--TEs", "0.004", "0.012",
         "--B0", "3", "--B0-dir", "0", "0.5", "1", "--acq", "x"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert find_bids_subjects(root) == ["1"]
    (acq,) = read_bids_subject(root, "1", mask_path=BIDS_MASK_FROM_DERIVATIVES)
    assert acq.name == "sub-1_acq-x" and acq.te_s == (0.004, 0.012) and acq.b0_t == 3.0
    expected = np.array([0.0, 0.5, 1.0]) / math.sqrt(1.25)
    np.testing.assert_allclose(acq.b0_dir, expected, atol=1e-6)       # from the sidecar
    np.testing.assert_allclose(b0_dir_from_affine(acq.affine), expected, atol=1e-5)  # affine
    phase2 = nib.load(str(root / "sub-1" / "anat" / "sub-1_acq-x_echo-2_part-phase_MEGRE.nii"))
    np.testing.assert_array_equal(acq.phase[1], phase2.get_fdata().astype(np.float32))
    mask = nib.load(str(root / "derivatives" / "qsm-forward" / "sub-1" / "anat" /
                        "sub-1_acq-x_mask.nii")).get_fdata() > 0.5
    np.testing.assert_array_equal(acq.mask, mask)
