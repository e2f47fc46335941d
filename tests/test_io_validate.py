"""qsmnet.io.validate: every check's accepted values and its refusals.

Each refusal is a QSMInputError whose one-line message starts with the file or argument name
it was given (the CLI prints that line and exits 2); accepted values come back converted as
documented (unit B0 vector, echoes-first volumes, boolean masks, voxel size in mm).
"""

from __future__ import annotations

import logging
import math

import nibabel as nib
import numpy as np
import pytest

from qsmnet.io.errors import QSMInputError
from qsmnet.io.validate import (
    AFFINE_ATOL_MM,
    B0_MAX_T,
    DECAY_TOLERANCE,
    MIN_EXTENT_VOXELS,
    TE_MAX_S,
    TE_UNUSED_MAX_S,
    check_b0_dir,
    check_b0_t,
    check_magnitude_decay,
    check_mask,
    check_mask_has_background,
    check_min_extent,
    check_same_grid,
    check_te_s,
    check_volume_3d,
    check_volume_echoes,
    voxel_size_from_header,
)

NAME = "sub-01_echo-1_part-phase_MEGRE.nii.gz"


def _refused(fn, *args, match: str, name: str = NAME, **kwargs) -> str:
    """Call ``fn`` expecting a one-line QSMInputError that starts with ``name`` and matches."""
    with pytest.raises(QSMInputError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{name}:"), message
    assert "\n" not in message
    return message


# --- echo times ------------------------------------------------------------------------------

def test_te_accepts_increasing_seconds_as_floats():
    assert check_te_s([0.004, 0.008, 0.012], NAME) == (0.004, 0.008, 0.012)
    assert check_te_s(0.02, NAME) == (0.02,)
    assert check_te_s(np.array([0.005, TE_MAX_S]), NAME) == (0.005, TE_MAX_S)
    # the placeholder TE of stages that do not use it (qsm-ci writes [1.0]) passes the looser bound
    assert check_te_s([1.0], NAME, max_s=TE_UNUSED_MAX_S) == (1.0,)


@pytest.mark.parametrize("te, match", [
    ([4.0, 8.0], "looks like milliseconds"),
    ([0.5], "longer than 0.2 s"),
    ([0.0], "must be positive"),
    ([-0.004], "must be positive"),
    ([float("nan")], "must be positive"),
    ([0.008, 0.004], "strictly increasing"),
    ([0.004, 0.004], "strictly increasing"),
    ([], "no EchoTime"),
    (["abc"], "not a number"),
    ([[0.004], [0.008, 0.01]], "not a number"),
])
def test_te_refusals_name_the_source(te, match):
    _refused(check_te_s, te, NAME, match=match)


def test_te_just_over_the_limit_is_refused_and_ms_above_the_placeholder_bound():
    _refused(check_te_s, [TE_MAX_S * (1 + 1e-9)], NAME, match="longer than")
    _refused(check_te_s, [1.5], NAME, max_s=TE_UNUSED_MAX_S, match="looks like milliseconds")


# --- field strength and direction ------------------------------------------------------------

@pytest.mark.parametrize("b0", [3, 2.89, "7", 1e-3, B0_MAX_T])
def test_b0_t_accepts_numbers_in_range(b0):
    assert check_b0_t(b0, NAME) == float(b0)


@pytest.mark.parametrize("b0, match", [
    (0.0, r"outside \(0, 20\] T"), (-3.0, "outside"), (B0_MAX_T + 0.1, "outside"),
    (float("inf"), "outside"), (float("nan"), "outside"), ("three", "not a number"),
    (None, "not a number"),
])
def test_b0_t_refusals(b0, match):
    _refused(check_b0_t, b0, NAME, match=match)


def test_b0_dir_is_normalised_to_a_unit_float64_vector():
    v = check_b0_dir([0.0, 3.0, 4.0], NAME)
    assert v.dtype == np.float64 and v.shape == (3,)
    np.testing.assert_allclose(v, [0.0, 0.6, 0.8], rtol=0, atol=1e-15)
    assert math.isclose(float(np.linalg.norm(check_b0_dir((1, 1, 1), NAME))), 1.0, rel_tol=1e-15)


@pytest.mark.parametrize("b0_dir", [[0, 0, 0], [0, 1], [0, 0, 1, 0], [0, float("nan"), 1],
                                    ["x", 0, 1], None])
def test_b0_dir_refusals(b0_dir):
    _refused(check_b0_dir, b0_dir, NAME, match="not 3 finite numbers")


# --- dimensionality and extent ---------------------------------------------------------------

def test_volume_3d_returns_the_data_and_drops_a_singleton_fourth_axis():
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    assert np.array_equal(check_volume_3d(data, NAME), data)
    squeezed = check_volume_3d(data[..., None], NAME)
    assert squeezed.shape == (2, 3, 4) and np.array_equal(squeezed, data)


@pytest.mark.parametrize("shape, match", [((5, 6), "is 2-D"), ((5, 6, 1), "is 2-D"),
                                          ((5, 1, 6), "is 2-D"), ((4, 5, 6, 2), "is 4-D"),
                                          ((4, 5, 6, 1, 2), "is 5-D")])
def test_volume_3d_refusals(shape, match):
    _refused(check_volume_3d, np.zeros(shape), NAME, match=match)


def test_volume_echoes_puts_echoes_first():
    rng = np.random.default_rng(0)
    stored = rng.standard_normal((4, 5, 6, 3))  # NIfTI order: echoes last
    echoes = check_volume_echoes(stored, NAME)
    assert echoes.shape == (3, 4, 5, 6)
    for e in range(3):
        assert np.array_equal(echoes[e], stored[..., e])
    one = check_volume_echoes(stored[..., 0], NAME)
    assert one.shape == (1, 4, 5, 6) and np.array_equal(one[0], stored[..., 0])


@pytest.mark.parametrize("shape, match", [((5, 6), "is 2-D"), ((5, 6, 1, 3), "is 2-D"),
                                          ((4, 5, 6, 2, 2), "is 5-D")])
def test_volume_echoes_refusals(shape, match):
    _refused(check_volume_echoes, np.zeros(shape), NAME, match=match)


def test_min_extent_accepts_the_minimum_and_names_the_thin_axis():
    check_min_extent((MIN_EXTENT_VOXELS,) * 3, NAME)
    check_min_extent((MIN_EXTENT_VOXELS, 20, 30, 4), NAME)  # only spatial axes count
    msg = _refused(check_min_extent, (20, MIN_EXTENT_VOXELS - 1, 2), NAME, match="along axis 1")
    assert f"only {MIN_EXTENT_VOXELS - 1} voxel(s)" in msg and f"at least {MIN_EXTENT_VOXELS}" in msg
    _refused(check_min_extent, (9, 9, 9), NAME, min_extent=10, match="along axis 0")


# --- same grid -------------------------------------------------------------------------------

def test_same_grid_tolerates_float32_rounding_and_refuses_other_grids():
    ref = np.diag([1.2, 1.2, 2.0, 1.0])
    ref[:3, 3] = (-90.0, 110.0, -60.0)
    rounded = ref.astype(np.float32).astype(np.float64)  # converters round each echo to float32
    check_same_grid((8, 9, 10), rounded, (8, 9, 10, 3), ref, NAME, "echo 1")
    check_same_grid((8, 9, 10), ref + 0.5 * AFFINE_ATOL_MM, (8, 9, 10), ref, NAME, "echo 1")
    _refused(check_same_grid, (8, 9, 11), ref, (8, 9, 10), ref, NAME, "echo 1",
             match=r"shape \(8, 9, 11\) differs from echo 1 \(8, 9, 10\)")
    shifted = ref.copy()
    shifted[0, 3] += 0.6  # half a voxel off
    msg = _refused(check_same_grid, (8, 9, 10), shifted, (8, 9, 10), ref, NAME, "echo 1",
                   match="affine differs from echo 1")
    assert "max difference 0.6" in msg


# --- masks -----------------------------------------------------------------------------------

def _mask_volume(values=(0.0, 1.0)):
    arr = np.full((6, 7, 8), values[0], dtype=np.float32)
    arr[1:5, 2:6, 3:7] = values[1]
    return arr


def test_mask_integer_values_are_nonzero_inside():
    truth = _mask_volume() > 0
    for inside in (1.0, 255.0, 3.0):
        mask = check_mask(_mask_volume((0.0, inside)), NAME)
        assert mask.dtype == bool and np.array_equal(mask, truth)
    labels = _mask_volume()
    labels[1:3] *= 2  # a label image: 0, 1, 2
    assert np.array_equal(check_mask(labels, NAME), truth)
    # float32 round-off of a scaled mask (inside 1 - 1e-7) still counts as integer
    assert np.array_equal(check_mask(_mask_volume((0.0, 1.0 - 1e-7)), NAME), truth)
    assert np.array_equal(check_mask(_mask_volume()[..., None], NAME), truth)


def test_mask_threshold_binarises_above_the_value(caplog):
    prob = np.linspace(0.0, 1.0, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    with caplog.at_level(logging.INFO, logger="qsmnet.io.validate"):
        mask = check_mask(prob, NAME, threshold=0.5)
    assert np.array_equal(mask, prob > 0.5)
    assert f"{int((prob > 0.5).sum())} of {prob.size} voxels" in caplog.text


def test_mask_refusals():
    prob = np.linspace(0.0, 1.0, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    msg = _refused(check_mask, prob, NAME, match="fractional values")
    assert "--mask-threshold" in msg
    _refused(check_mask, _mask_volume((0.0, -1.0)), NAME, match="negative values")
    _refused(check_mask, np.zeros((6, 7, 8)), NAME, match="mask is empty")
    _refused(check_mask, prob, NAME, threshold=1.0, match=r"no voxel > 1")
    _refused(check_mask, prob, NAME, threshold=float("nan"), name="--mask-threshold",
             match="not a finite number")
    _refused(check_mask, np.ones((6, 7)), NAME, match="is 2-D")


def test_mask_has_background():
    mask = _mask_volume() > 0
    check_mask_has_background(mask, NAME, "pass a brain mask")
    msg = _refused(check_mask_has_background, np.ones((6, 7, 8), bool), NAME, "pass a brain mask",
                   match="covers the whole grid")
    assert f"{6 * 7 * 8} voxels" in msg and msg.endswith("pass a brain mask")


# --- magnitude decay -------------------------------------------------------------------------

def _decaying_magnitude(te_s, t2star_s=0.05, shape=(8, 8, 8)):
    rng = np.random.default_rng(3)
    m0 = np.zeros(shape)
    m0[2:6, 2:6, 2:6] = 100.0 + rng.uniform(0, 20, (4, 4, 4))
    return np.stack([m0 * math.exp(-t / t2star_s) for t in te_s])


def test_magnitude_decay_returns_the_median_of_each_echo():
    te = (0.005, 0.010, 0.020)
    mag = _decaying_magnitude(te)
    medians = check_magnitude_decay(mag, te, NAME)
    bright = mag.mean(axis=0) > 0.3 * np.percentile(mag.mean(axis=0), 99)
    expected = [float(np.median(m[bright])) for m in mag]
    assert medians == expected
    # T2* decay: each median is the first times exp(-dTE / T2*)
    np.testing.assert_allclose(np.array(medians) / medians[0],
                               np.exp(-(np.array(te) - te[0]) / 0.05), rtol=1e-12)
    mask = np.zeros(mag.shape[1:], bool)
    mask[3:5, 3:5, 3:5] = True
    assert check_magnitude_decay(mag, te, NAME, mask=mask) == \
        [float(np.median(m[mask])) for m in mag]


def test_magnitude_decay_refuses_reversed_echoes_only_past_the_tolerance():
    te = (0.005, 0.010, 0.020)
    reversed_mag = _decaying_magnitude(te)[::-1]
    msg = _refused(check_magnitude_decay, reversed_mag, te, NAME, match="grows with echo time")
    assert "TE 5, 10, 20 ms" in msg and "--no-decay-check" in msg
    flat = _decaying_magnitude(te, t2star_s=1e9)
    grow = flat * np.array([1.0, 1.0, 1.0 + 0.5 * DECAY_TOLERANCE])[:, None, None, None]
    assert len(check_magnitude_decay(grow, te, NAME)) == 3
    grow = flat * np.array([1.0, 1.0, 1.0 + 2 * DECAY_TOLERANCE])[:, None, None, None]
    _refused(check_magnitude_decay, grow, te, NAME, match="grows with echo time")


def test_magnitude_decay_has_nothing_to_check_for_one_echo_or_an_empty_region():
    mag = _decaying_magnitude((0.005, 0.010))
    assert check_magnitude_decay(mag[:1], (0.005,), NAME) == []
    assert check_magnitude_decay(mag[0], (0.005,), NAME) == []
    assert check_magnitude_decay(mag, (0.005, 0.010), NAME,
                                 mask=np.zeros(mag.shape[1:], bool)) == []


# --- voxel size from the header --------------------------------------------------------------

@pytest.mark.parametrize("unit, factor", [("mm", 1.0), ("meter", 1000.0), ("micron", 1e-3),
                                          ("unknown", 1.0)])
def test_voxel_size_from_header_converts_units_to_mm(unit, factor):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([0.5, 0.75, 2.0, 1.0]))
    img.header.set_zooms((0.5, 0.75, 2.0))
    img.header.set_xyzt_units(xyz=unit)
    vs = voxel_size_from_header(img.header, NAME)
    assert vs.dtype == np.float64
    np.testing.assert_allclose(vs, np.array([0.5, 0.75, 2.0]) * factor, rtol=1e-7)


def test_voxel_size_from_header_refuses_non_positive_zooms():
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    img.header["pixdim"][1:4] = (1.0, 0.0, 1.0)
    _refused(voxel_size_from_header, img.header, NAME, match="is not positive")
