"""QSM-CI stage folders: each stage's inputs, metadata and errors; names agree with qsm-ci."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from qsmnet.io import QSMCI_INPUTS, QSMCI_OUTPUT, QSMInputError, read_qsmci_inputs
from qsmnet.physics.geometry import b0_dir_from_affine

SHAPE = (8, 9, 10)


def test_canonical_names_match_qsm_ci():
    stages = pytest.importorskip("qsm_ci.stages")
    for stage, output in QSMCI_OUTPUT.items():
        (produced,) = stages.STAGES[stage]["produces"]
        assert stages.ARTIFACT_FILE[produced] == output
        consumed = {stages.ARTIFACT_FILE[a] for a in stages.STAGES[stage]["consumes"]}
        ours = {name for name, _ in QSMCI_INPUTS[stage]} | {"params.json"}
        assert ours == consumed


@pytest.mark.parametrize("stage", ["field-mapping", "end-to-end"])
def test_phase_stages(tmp_path, write_qsmci_folder, stage):
    written = write_qsmci_folder(tmp_path, stage, te_s=(0.004, 0.008, 0.012), b0_t=7.0,
                                 b0_dir=(0.0, 0.6, 0.8))
    inp = read_qsmci_inputs(tmp_path, stage)
    assert inp.phase.shape == (3, *SHAPE)
    np.testing.assert_array_equal(inp.phase, np.moveaxis(written["phase"], -1, 0))
    np.testing.assert_array_equal(inp.magnitude, np.moveaxis(written["magnitude"], -1, 0))
    np.testing.assert_array_equal(inp.mask, written["mask"].astype(bool))
    assert inp.te_s == (0.004, 0.008, 0.012) and inp.b0_t == 7.0
    np.testing.assert_allclose(inp.b0_dir, [0.0, 0.6, 0.8])
    assert inp.totalfield_ppm is None and inp.localfield_ppm is None
    assert inp.output_name == ("chimap.nii.gz" if stage == "end-to-end" else "totalfield.nii.gz")
    acq = inp.to_acquisition()
    assert acq.n_echoes == 3 and acq.mask is not None
    sample = inp.to_sample()
    assert sample["phase"].shape == (3, *SHAPE) and sample["mask"].dtype == torch.bool


def test_phase_stage_magnitude_optional(tmp_path, write_qsmci_folder):
    write_qsmci_folder(tmp_path, "field-mapping")
    (tmp_path / "magnitude.nii.gz").unlink()
    inp = read_qsmci_inputs(tmp_path, "field-mapping")
    assert inp.magnitude is None and inp.phase.shape[0] == 2


@pytest.mark.parametrize("stage,key,sample_key", [("bfr", "totalfield", "total_field_ppm"),
                                                  ("dipole", "localfield", "local_field_ppm")])
def test_field_stages(tmp_path, write_qsmci_folder, stage, key, sample_key):
    # qsm-ci writes a placeholder TE of [1.0] for these stages: it must be accepted.
    written = write_qsmci_folder(tmp_path, stage, te_s=(1.0,))
    inp = read_qsmci_inputs(tmp_path, stage)
    field = getattr(inp, f"{key}_ppm")
    assert field.dtype == np.float32 and field.shape == SHAPE
    np.testing.assert_array_equal(field, written[key])
    assert inp.phase is None
    assert inp.output_name == QSMCI_OUTPUT[stage]
    sample = inp.to_sample()
    assert set(sample) == {sample_key, "mask", "voxel_size_mm", "b0_dir", "affine", "b0_t",
                           "te_s"}
    torch.testing.assert_close(sample[sample_key], torch.from_numpy(written[key]))
    with pytest.raises(ValueError):
        inp.to_acquisition()


@pytest.mark.parametrize("stage,key", [("bfr", "totalfield"), ("dipole", "localfield")])
def test_field_stage_nan_outside_the_mask_reads_as_zero_inside_refused(
        tmp_path, write_qsmci_folder, write_nifti, stage, key):
    written = write_qsmci_folder(tmp_path, stage, te_s=(1.0,))
    outside = written["mask"] == 0
    holes = written[key].copy()
    holes[outside] = np.nan
    holes[0, 0, 0] = np.inf
    write_nifti(tmp_path / f"{key}.nii.gz", holes)
    field = getattr(read_qsmci_inputs(tmp_path, stage), f"{key}_ppm")
    np.testing.assert_array_equal(field, np.where(outside, 0.0, written[key]).astype(np.float32))
    holes[4, 4, 4] = np.nan  # inside the mask
    write_nifti(tmp_path / f"{key}.nii.gz", holes)
    with pytest.raises(QSMInputError, match=rf"{key}.nii.gz: 1 voxel\(s\) inside the mask are "
                                            "NaN or infinite"):
        read_qsmci_inputs(tmp_path, stage)


def test_field_stage_params_without_te_and_b0(tmp_path, write_qsmci_folder):
    write_qsmci_folder(tmp_path, "dipole")
    (tmp_path / "params.json").write_text(json.dumps({"B0_dir": [0, 0, 1],
                                                      "voxel_size": [1, 1, 1]}))
    inp = read_qsmci_inputs(tmp_path, "dipole")
    assert inp.te_s is None and inp.b0_t is None
    assert "b0_t" not in inp.to_sample()


def test_b0_dir_from_affine_when_params_has_none(tmp_path, write_qsmci_folder,
                                                 make_oblique_affine):
    affine = make_oblique_affine(-15.0, (1.0, 1.0, 1.0))
    write_qsmci_folder(tmp_path, "dipole", b0_dir=None, affine=affine)
    inp = read_qsmci_inputs(tmp_path, "dipole")
    t = math.radians(-15.0)
    np.testing.assert_allclose(inp.b0_dir, [0.0, math.sin(t), math.cos(t)], atol=1e-6)
    np.testing.assert_allclose(inp.b0_dir, b0_dir_from_affine(affine), atol=1e-6)


def test_params_voxel_size_wins_with_a_warning(tmp_path, write_qsmci_folder, caplog):
    write_qsmci_folder(tmp_path, "bfr", voxel_size_mm=(1.0, 1.0, 2.0))
    with caplog.at_level(logging.WARNING, logger="qsmnet"):
        inp = read_qsmci_inputs(tmp_path, "bfr")
    np.testing.assert_allclose(inp.voxel_size_mm, [1.0, 1.0, 2.0])
    assert "voxel_size" in caplog.text and "totalfield.nii.gz" in caplog.text


@pytest.mark.parametrize("stage,missing", [("field-mapping", "phase.nii.gz"),
                                           ("end-to-end", "mask.nii.gz"),
                                           ("bfr", "totalfield.nii.gz"),
                                           ("dipole", "localfield.nii.gz"),
                                           ("dipole", "params.json")])
def test_missing_input_names_file(tmp_path, write_qsmci_folder, stage, missing):
    write_qsmci_folder(tmp_path, stage)
    (tmp_path / missing).unlink()
    with pytest.raises(QSMInputError, match=f"{missing}: file not found"):
        read_qsmci_inputs(tmp_path, stage)


def test_echo_count_differs_from_params(tmp_path, write_qsmci_folder):
    write_qsmci_folder(tmp_path, "field-mapping")
    (tmp_path / "params.json").write_text(json.dumps({"TE": [0.004, 0.008, 0.012], "B0": 3}))
    with pytest.raises(QSMInputError, match=r"phase.nii.gz: 2 echo\(es\) but params.json TE"):
        read_qsmci_inputs(tmp_path, "field-mapping")


def test_phase_stage_needs_te(tmp_path, write_qsmci_folder):
    write_qsmci_folder(tmp_path, "end-to-end")
    (tmp_path / "params.json").write_text(json.dumps({"B0": 3}))
    with pytest.raises(QSMInputError, match="params.json: no TE"):
        read_qsmci_inputs(tmp_path, "end-to-end")


def test_mask_on_other_grid_or_empty(tmp_path, write_qsmci_folder, write_nifti):
    write_qsmci_folder(tmp_path, "bfr")
    write_nifti(tmp_path / "mask.nii.gz", np.ones((8, 9, 11), np.uint8))
    with pytest.raises(QSMInputError, match=r"mask.nii.gz: shape \(8, 9, 11\) differs from "
                                            r"totalfield.nii.gz"):
        read_qsmci_inputs(tmp_path, "bfr")
    write_nifti(tmp_path / "mask.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(QSMInputError, match="mask.nii.gz: mask is empty"):
        read_qsmci_inputs(tmp_path, "bfr")


def test_4d_field_is_refused(tmp_path, write_qsmci_folder, write_nifti):
    write_qsmci_folder(tmp_path, "dipole")
    write_nifti(tmp_path / "localfield.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    with pytest.raises(QSMInputError, match="localfield.nii.gz: image is 4-D"):
        read_qsmci_inputs(tmp_path, "dipole")


def test_unknown_stage_and_missing_folder(tmp_path):
    with pytest.raises(QSMInputError, match="stage 'qsm': unknown"):
        read_qsmci_inputs(tmp_path, "qsm")
    with pytest.raises(QSMInputError, match="nope: input folder not found"):
        read_qsmci_inputs(tmp_path / "nope", "bfr")
