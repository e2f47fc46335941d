"""Plain-NIfTI multi-echo reading: layout, B0 direction, sample dicts and every bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qsmnet.io import Acquisition, QSMInputError, read_nifti_echoes, read_params_json
from qsmnet.io import write_params_json
from qsmnet.physics.geometry import b0_dir_from_affine

SHAPE = (8, 9, 10)
TE = (0.004, 0.008)


@pytest.fixture
def two_echoes(tmp_path, write_nifti, rng):
    """Two 3-D phase echoes (radians) and magnitudes on the default axial grid."""
    phase = rng.uniform(-math.pi, math.pi, (2, *SHAPE)).astype(np.float32)
    mag = rng.uniform(1.0, 2.0, (2, *SHAPE)).astype(np.float32)
    ph = [write_nifti(tmp_path / f"ph{i + 1}.nii.gz", phase[i]) for i in range(2)]
    mg = [write_nifti(tmp_path / f"mag{i + 1}.nii.gz", mag[i]) for i in range(2)]
    return ph, mg, phase, mag


def test_3d_files_and_4d_file_give_the_same_acquisition(tmp_path, write_nifti, two_echoes):
    ph, mg, phase, mag = two_echoes
    acq = read_nifti_echoes(ph, mg, te_s=TE, b0_t=3.0)
    assert acq.phase.shape == (2, *SHAPE)
    np.testing.assert_array_equal(acq.phase, phase)
    np.testing.assert_array_equal(acq.magnitude, mag)
    assert acq.te_s == TE and acq.b0_t == 3.0
    np.testing.assert_allclose(acq.voxel_size_mm, [1.0, 1.0, 1.0])
    assert acq.name == "ph1" and acq.mask is None

    four_d = write_nifti(tmp_path / "phase4d.nii.gz", np.moveaxis(phase, 0, -1))
    acq4 = read_nifti_echoes(four_d, None, te_s=TE, b0_t=3.0)
    np.testing.assert_array_equal(acq4.phase, phase)  # echoes last on disk -> first in memory
    assert acq4.magnitude is None


def test_to_sample_keys_shapes_and_phase_sign(two_echoes, tmp_path, write_nifti):
    ph, mg, phase, _ = two_echoes
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:5, 2:5, 2:5] = 1
    mpath = write_nifti(tmp_path / "mask.nii.gz", mask)
    acq = read_nifti_echoes(ph, mg, te_s=TE, b0_t=7.0, mask_path=mpath, phase_sign=-1)
    s = acq.to_sample()
    assert set(s) == {"phase", "magnitude", "mask", "te_s", "b0_t", "b0_dir", "voxel_size_mm",
                      "affine"}
    assert s["phase"].shape == (2, *SHAPE) and s["phase"].dtype == torch.float32
    torch.testing.assert_close(s["phase"], -torch.from_numpy(phase))  # polarity applied
    assert s["mask"].dtype == torch.bool and int(s["mask"].sum()) == 27
    torch.testing.assert_close(s["te_s"], torch.tensor(TE, dtype=torch.float32))
    assert s["b0_t"] == 7.0
    torch.testing.assert_close(s["b0_dir"], torch.tensor([0.0, 0.0, 1.0]))
    assert isinstance(s["affine"], np.ndarray) and s["affine"].shape == (4, 4)
    assert "sub" not in acq.entities


def _rx(theta_deg: float) -> np.ndarray:
    t = math.radians(theta_deg)
    return np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])


@pytest.mark.parametrize("kind", ["axial", "oblique", "flipped", "oblique_aniso"])
def test_b0_dir_from_affine(tmp_path, write_nifti, kind):
    voxel = (1.0, 1.0, 1.0)
    if kind == "axial":
        rot, expected = np.eye(3), np.array([0.0, 0.0, 1.0])
    elif kind == "oblique":
        # R = Rx(25 deg): b0 = R^T e_z = third row of R = (0, sin 25, cos 25).
        rot = _rx(25.0)
        expected = np.array([0.0, math.sin(math.radians(25)), math.cos(math.radians(25))])
    elif kind == "flipped":
        rot, expected = np.diag([-1.0, 1.0, -1.0]), np.array([0.0, 0.0, -1.0])
    else:
        rot = _rx(-30.0)
        voxel = (0.8, 1.0, 2.5)
        expected = np.array([0.0, math.sin(math.radians(-30)), math.cos(math.radians(-30))])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(voxel)
    p = write_nifti(tmp_path / f"{kind}.nii.gz", np.zeros(SHAPE, np.float32), affine)
    acq = read_nifti_echoes(p, te_s=0.01, b0_t=3.0)
    np.testing.assert_allclose(acq.b0_dir, expected, atol=1e-6)
    np.testing.assert_allclose(acq.b0_dir, b0_dir_from_affine(affine), atol=1e-6)
    np.testing.assert_allclose(acq.voxel_size_mm, voxel, rtol=1e-6)


def test_explicit_b0_dir_wins_and_is_normalised(tmp_path, write_nifti, oblique_affine):
    p = write_nifti(tmp_path / "ph.nii.gz", np.zeros(SHAPE, np.float32), oblique_affine)
    acq = read_nifti_echoes(p, te_s=0.01, b0_t=3.0, b0_dir=(0.0, 3.0, 4.0))
    np.testing.assert_allclose(acq.b0_dir, [0.0, 0.6, 0.8])


def test_integer_phase_is_rescaled(tmp_path, write_nifti):
    # Siemens 12-bit 0..4095 (wrapped phase spans the whole range in real data).
    raw = np.round(np.linspace(0, 4095, np.prod(SHAPE))).reshape(SHAPE).astype(np.int16)
    p = write_nifti(tmp_path / "raw.nii.gz", raw)
    acq = read_nifti_echoes(p, te_s=0.01, b0_t=3.0)
    np.testing.assert_allclose(acq.phase[0], raw * 2 * math.pi / 4096 - math.pi, atol=1e-6)


# --- bad inputs: every one names the file or argument ----------------------------------------

def test_missing_te_or_b0(two_echoes):
    ph, mg, _, _ = two_echoes
    with pytest.raises(QSMInputError, match="--te"):
        read_nifti_echoes(ph, mg, te_s=None, b0_t=3.0)
    with pytest.raises(QSMInputError, match="--b0"):
        read_nifti_echoes(ph, mg, te_s=TE, b0_t=None)


@pytest.mark.parametrize("te,pattern", [
    ((0.008, 0.004), "strictly increasing"),
    ((0.004, 0.004), "strictly increasing"),
    ((-0.004, 0.008), "must be positive"),
    ((4.0, 8.0), "EchoTime 4 looks like milliseconds; BIDS EchoTime is in seconds"),
])
def test_bad_te(two_echoes, te, pattern):
    ph, mg, _, _ = two_echoes
    with pytest.raises(QSMInputError, match=f"--te.*{pattern}"):
        read_nifti_echoes(ph, mg, te_s=te, b0_t=3.0)


@pytest.mark.parametrize("b0", [0.0, -3.0, 20.5, float("nan")])
def test_bad_b0(two_echoes, b0):
    ph, mg, _, _ = two_echoes
    with pytest.raises(QSMInputError, match=r"--b0: field strength .* outside \(0, 20\] T"):
        read_nifti_echoes(ph, mg, te_s=TE, b0_t=b0)


def test_echo_count_differs_from_te(two_echoes):
    ph, mg, _, _ = two_echoes
    with pytest.raises(QSMInputError, match=r"ph1.nii.gz: 2 phase echo\(es\) but 3 echo time"):
        read_nifti_echoes(ph, mg, te_s=(0.004, 0.008, 0.012), b0_t=3.0)


def test_echo_shape_mismatch_names_file(tmp_path, write_nifti):
    a = write_nifti(tmp_path / "sub-01_echo-1_part-phase_MEGRE.nii.gz", np.zeros((6, 6, 5)))
    b = write_nifti(tmp_path / "sub-01_echo-2_part-phase_MEGRE.nii.gz", np.zeros((6, 6, 4)))
    with pytest.raises(QSMInputError) as err:
        read_nifti_echoes([a, b], te_s=TE, b0_t=3.0)
    assert str(err.value) == ("sub-01_echo-2_part-phase_MEGRE.nii.gz: shape (6, 6, 4) differs "
                              "from echo 1 (sub-01_echo-1_part-phase_MEGRE.nii.gz) (6, 6, 5)")


def test_echo_affine_mismatch_names_file(tmp_path, write_nifti, axial_affine):
    shifted = axial_affine.copy()
    shifted[0, 3] += 2.0
    a = write_nifti(tmp_path / "e1.nii.gz", np.zeros(SHAPE), axial_affine)
    b = write_nifti(tmp_path / "e2.nii.gz", np.zeros(SHAPE), shifted)
    with pytest.raises(QSMInputError, match="e2.nii.gz: affine differs"):
        read_nifti_echoes([a, b], te_s=TE, b0_t=3.0)


def test_magnitude_grid_mismatch_names_file(two_echoes, tmp_path, write_nifti):
    ph, _, _, _ = two_echoes
    m = [write_nifti(tmp_path / f"m{i}.nii.gz", np.ones((8, 9, 11))) for i in range(2)]
    with pytest.raises(QSMInputError, match="m0.nii.gz: shape"):
        read_nifti_echoes(ph, m, te_s=TE, b0_t=3.0)


def test_magnitude_that_looks_like_phase(two_echoes):
    ph, _, _, _ = two_echoes
    with pytest.raises(QSMInputError, match="ph1.nii.gz: magnitude has negative values"):
        read_nifti_echoes(ph, ph, te_s=TE, b0_t=3.0)


def test_nan_phase_names_file(tmp_path, write_nifti):
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, 0] = np.nan
    p = write_nifti(tmp_path / "nanphase.nii.gz", data)
    with pytest.raises(QSMInputError, match="nanphase.nii.gz"):
        read_nifti_echoes(p, te_s=0.01, b0_t=3.0)


@pytest.mark.parametrize("shape,word", [((8, 9), "2-D"), ((8, 9, 1), "2-D"),
                                        ((4, 4, 4, 2, 2), "5-D")])
def test_wrong_dimensionality_names_file(tmp_path, write_nifti, shape, word):
    p = write_nifti(tmp_path / "odd.nii.gz", np.zeros(shape, np.float32))
    with pytest.raises(QSMInputError, match=f"odd.nii.gz: image is {word}"):
        read_nifti_echoes(p, te_s=0.01, b0_t=3.0)


def test_4d_among_several_files(tmp_path, write_nifti):
    a = write_nifti(tmp_path / "a.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    b = write_nifti(tmp_path / "b.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(QSMInputError, match="a.nii.gz: 4-D image"):
        read_nifti_echoes([a, b], te_s=(0.004, 0.008, 0.012), b0_t=3.0)


def test_missing_file_names_it(tmp_path, two_echoes):
    _, mg, _, _ = two_echoes
    with pytest.raises(QSMInputError, match="missing_echo.nii.gz: file not found"):
        read_nifti_echoes([tmp_path / "missing_echo.nii.gz"], te_s=0.01, b0_t=3.0)


def test_mask_wrong_shape_affine_or_empty(two_echoes, tmp_path, write_nifti, axial_affine):
    ph, mg, _, _ = two_echoes
    small = write_nifti(tmp_path / "mask_small.nii.gz", np.ones((8, 9, 9), np.uint8))
    with pytest.raises(QSMInputError, match=r"mask_small.nii.gz: shape \(8, 9, 9\) differs"):
        read_nifti_echoes(ph, mg, te_s=TE, b0_t=3.0, mask_path=small)
    moved = axial_affine.copy()
    moved[2, 3] += 1.0
    shifted = write_nifti(tmp_path / "mask_moved.nii.gz", np.ones(SHAPE, np.uint8), moved)
    with pytest.raises(QSMInputError, match="mask_moved.nii.gz: affine differs"):
        read_nifti_echoes(ph, mg, te_s=TE, b0_t=3.0, mask_path=shifted)
    empty = write_nifti(tmp_path / "mask_empty.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(QSMInputError, match="mask_empty.nii.gz: mask is empty"):
        read_nifti_echoes(ph, mg, te_s=TE, b0_t=3.0, mask_path=empty)


def test_bad_b0_dir_argument(two_echoes):
    ph, mg, _, _ = two_echoes
    with pytest.raises(QSMInputError, match="--b0-dir"):
        read_nifti_echoes(ph, mg, te_s=TE, b0_t=3.0, b0_dir=(0.0, 0.0, 0.0))


# --- params.json ------------------------------------------------------------------------------

def test_params_json_round_trip(tmp_path):
    p = write_params_json(tmp_path / "params.json", [0.004, 0.012], 2.89, [0, 1, 1],
                          [1.0, 1.0, 2.0])
    params = read_params_json(p)
    assert params.te_s == (0.004, 0.012) and params.b0_t == 2.89
    np.testing.assert_allclose(params.b0_dir, [0.0, math.sqrt(0.5), math.sqrt(0.5)])
    np.testing.assert_allclose(params.voxel_size_mm, [1.0, 1.0, 2.0])
    raw = json.loads(p.read_text())
    assert set(raw) == {"TE", "B0", "B0_dir", "voxel_size"}


@pytest.mark.parametrize("obj,pattern", [
    ({"B0": 3, "B0_dir": [0, 0, 1]}, "no TE"),
    ({"TE": [0.01]}, "no B0"),
    ({"TE": [4, 8], "B0": 3}, "looks like milliseconds"),
    ({"TE": [0.01], "B0": 30}, r"outside \(0, 20\] T"),
    ({"TE": [0.01], "B0": 3, "B0_dir": [0, 0, 0]}, "B0_dir"),
    ({"TE": [0.01], "B0": 3, "voxel_size": [1, 1]}, "voxel_size"),
    ([1, 2, 3], "expected a JSON object"),
    ({"EchoTime": 0.004, "MagneticFieldStrength": 3}, r"no TE .*EchoTime -> TE, MagneticFieldStrength -> B0"),
    ({"TE": [0.01], "MagneticFieldStrength": 3}, r"no B0 .*MagneticFieldStrength -> B0\)"),
])
def test_params_json_bad(tmp_path, obj, pattern):
    p = tmp_path / "params.json"
    p.write_text(json.dumps(obj))
    with pytest.raises(QSMInputError, match=f"params.json.*{pattern}"):
        read_params_json(p)


def test_params_json_unparsable_and_missing(tmp_path):
    p = tmp_path / "params.json"
    p.write_text("{TE: oops")
    with pytest.raises(QSMInputError, match="params.json: cannot parse"):
        read_params_json(p)
    with pytest.raises(QSMInputError, match="other.json: file not found"):
        read_params_json(tmp_path / "other.json")


def test_acquisition_rejects_inconsistent_construction():
    with pytest.raises(ValueError):
        Acquisition(phase=np.zeros((2, 4, 4, 4), np.float32), magnitude=None, mask=None,
                    te_s=(0.01,), b0_t=3.0, b0_dir=np.array([0, 0, 1.0]),
                    voxel_size_mm=np.ones(3), affine=np.eye(4), header=None, source="x",
                    name="x")
