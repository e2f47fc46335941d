"""Chi statistics per label (qsmnet.metrics.roi) against values known by construction, Python's
``statistics`` module on the same voxels (an independent implementation), and the refusals of
bad label images and name tables."""

from __future__ import annotations

import csv
import io
import statistics

import nibabel as nib
import numpy as np
import pytest

from qsmnet.io.errors import QSMInputError
from qsmnet.metrics.roi import (
    ROI_COLUMNS,
    format_roi_tsv,
    read_roi_labels,
    read_roi_names,
    roi_statistics,
)

SHAPE = (12, 10, 8)


def _piecewise():
    """Label 1: chi 0.05 everywhere; label 2: -0.02 and 0.04 on alternate x planes; label 3:
    entirely outside the mask; label 4: half outside the mask. A mask that cuts label 4."""
    labels = np.zeros(SHAPE, np.int64)
    chi = np.zeros(SHAPE)
    labels[0:4] = 1
    chi[0:4] = 0.05
    labels[4:8] = 2
    chi[4:8:2] = -0.02
    chi[5:8:2] = 0.04
    labels[8:10] = 3
    labels[10:12] = 4
    chi[10:12] = np.arange(2 * 10 * 8).reshape(2, 10, 8) * 1e-3
    mask = np.ones(SHAPE, bool)
    mask[8:10] = False            # all of label 3
    mask[10:12, 5:] = False       # half of label 4
    return chi, mask, labels


def test_statistics_are_the_known_values_of_a_piecewise_constant_chi():
    chi, mask, labels = _piecewise()
    rows = {r["index"]: r for r in roi_statistics(chi, mask, labels, {1: "a", 2: "b"})}
    assert sorted(rows) == [1, 2, 3, 4]
    n_plane = 10 * 8
    # label 1: constant 0.05 -> mean = median = 0.05, std 0; 4 planes, none outside the mask.
    # Tolerances: float64 sums of at most 320 terms of size 0.05 (eps64 * 320 * 0.05 < 1e-14).
    one = rows[1]
    assert one["name"] == "a" and one["voxels"] == 4 * n_plane and one["voxels_outside_mask"] == 0
    assert abs(one["mean_ppm"] - 0.05) < 1e-14 and abs(one["median_ppm"] - 0.05) < 1e-14
    assert one["std_ppm"] < 1e-14
    # label 2: equal numbers of -0.02 and 0.04 -> mean = median = 0.01, population std 0.03
    two = rows[2]
    assert two["voxels"] == 4 * n_plane
    assert abs(two["mean_ppm"] - 0.01) < 1e-14 and abs(two["median_ppm"] - 0.01) < 1e-14
    assert abs(two["std_ppm"] - 0.03) < 1e-14
    # label 3: no voxel in the mask -> NaN statistics, every voxel counted as outside
    three = rows[3]
    assert three["name"] == "label-3" and three["voxels"] == 0
    assert three["voxels_outside_mask"] == 2 * n_plane
    assert all(np.isnan(three[k]) for k in ("mean_ppm", "median_ppm", "std_ppm"))
    # label 4: only its in-mask half is used, compared with Python's statistics module
    four = rows[4]
    values = [float(v) for v in chi[10:12, :5].ravel()]
    assert four["voxels"] == len(values) == n_plane and four["voxels_outside_mask"] == n_plane
    # float64: the two implementations sum 80 terms below 0.16 in different orders (< 1e-15)
    assert abs(four["mean_ppm"] - statistics.fmean(values)) < 1e-15
    assert four["median_ppm"] == statistics.median(values)  # a middle value (pair mean), copied
    assert abs(four["std_ppm"] - statistics.pstdev(values)) < 1e-15


def test_tsv_round_trip_and_na_for_empty_labels():
    chi, mask, labels = _piecewise()
    rows = roi_statistics(chi, mask, labels, {2: "caudate nucleus"})
    table = list(csv.DictReader(io.StringIO(format_roi_tsv(rows)), delimiter="\t"))
    assert tuple(table[0]) == ROI_COLUMNS
    assert [int(r["index"]) for r in table] == [1, 2, 3, 4]
    assert table[1]["name"] == "caudate nucleus"
    assert table[2]["mean_ppm"] == table[2]["median_ppm"] == table[2]["std_ppm"] == "n/a"
    # 9 significant digits written: relative error below 1e-8 after reading back
    for r, row in zip(table, rows):
        assert int(r["voxels"]) == row["voxels"]
        if row["voxels"]:
            assert abs(float(r["mean_ppm"]) - row["mean_ppm"]) <= 1e-8 * abs(row["mean_ppm"])


def test_names_tables_bids_and_freesurfer_styles(tmp_path):
    bids = tmp_path / "dseg.tsv"
    bids.write_text("index\tname\tabbreviation\n1\tLeft Thalamus\tLT\n2\tPutamen\tPu\n")
    assert read_roi_names(bids) == {1: "Left Thalamus", 2: "Putamen"}
    swapped = tmp_path / "swapped.tsv"
    swapped.write_text("name\tindex\nGP\t7\n")
    assert read_roi_names(swapped) == {7: "GP"}
    lut = tmp_path / "FreeSurferColorLUT.txt"
    lut.write_text("#$Id: FreeSurferColorLUT.txt\n\n#No. Label Name: R G B A\n"
                   "0   Unknown          0   0   0   0\n"
                   "10  Left-Thalamus    0 118  14   0\n"
                   "11  Left-Caudate   122 186 220   0\n")
    assert read_roi_names(lut) == {0: "Unknown", 10: "Left-Thalamus", 11: "Left-Caudate"}
    plain = tmp_path / "plain.tsv"
    plain.write_text("3\tred nucleus\n")
    assert read_roi_names(plain) == {3: "red nucleus"}


@pytest.mark.parametrize("text,message", [
    ("1\tA\nx\tB\n", "line 2: expected an integer index"),
    ("1\tA\n1\tB\n", "line 2: index 1 is named twice"),
    ("label\tcolour\n1\tA\n", "line 1: a header must name the 'index'"),
])
def test_bad_names_table_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "names.tsv"
    path.write_text(text)
    with pytest.raises(QSMInputError, match=message) as info:
        read_roi_names(path)
    assert str(path) in str(info.value)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_label_image_reading_accepts_integer_floats_and_refuses_the_rest(tmp_path):
    labels = np.zeros(SHAPE, np.int16)
    labels[2:5] = 7
    as_float = read_roi_labels(_save(tmp_path / "f.nii.gz", labels.astype(np.float32)))
    assert as_float.labels.dtype == np.int64 and np.array_equal(as_float.labels, labels)
    singleton = read_roi_labels(_save(tmp_path / "s.nii.gz", labels[..., None]))
    assert singleton.labels.shape == SHAPE
    frac = labels.astype(np.float32)
    frac[0, 0, 0] = 0.5
    path = _save(tmp_path / "prob.nii.gz", frac)
    with pytest.raises(QSMInputError, match=r"prob\.nii\.gz: labels must be integers, found 0\.5"):
        read_roi_labels(path)
    neg = _save(tmp_path / "neg.nii.gz", (labels - 1).astype(np.int16))
    with pytest.raises(QSMInputError, match=r"neg\.nii\.gz: labels must be >= 0"):
        read_roi_labels(neg)
    four = _save(tmp_path / "4d.nii.gz", np.zeros((*SHAPE, 2), np.int16))
    with pytest.raises(QSMInputError, match=r"4d\.nii\.gz: a label image must be 3-D"):
        read_roi_labels(four)
    with pytest.raises(QSMInputError, match=r"missing\.nii\.gz: label image not found"):
        read_roi_labels(tmp_path / "missing.nii.gz")


def test_label_image_on_another_grid_is_refused_naming_the_file(tmp_path):
    labels = np.ones(SHAPE, np.int16)
    roi = read_roi_labels(_save(tmp_path / "atlas.nii.gz", labels))
    roi.check_grid(SHAPE, np.eye(4), "sub-01")  # the same grid passes
    with pytest.raises(QSMInputError, match=r"atlas\.nii\.gz \(--roi\): shape \(12, 10, 8\) "
                                            r"differs from the chi map of sub-01 \(12, 10, 9\)"):
        roi.check_grid((12, 10, 9), np.eye(4), "sub-01")
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    with pytest.raises(QSMInputError, match=r"atlas\.nii\.gz \(--roi\): affine differs .*"
                                            r"\(max difference 1\);"):
        roi.check_grid(SHAPE, shifted, "sub-01")
