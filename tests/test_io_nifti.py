"""NIfTI reading/writing and atomic writes: exact round trips, orientation, no partial files."""

from __future__ import annotations

import gzip
import json
import math
import os

import nibabel as nib
import numpy as np
import pytest

from qsmnet.io import QSMInputError, atomic_write_json, atomic_write_text, load_nifti, save_nifti
from qsmnet.io import atomic as atomic_mod


def _no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if ".tmp" in p]


@pytest.mark.parametrize("qcode,scode", [(1, 1), (0, 2), (1, 0), (4, 4)])
def test_round_trip_exact_data_affine_and_codes(tmp_path, rng, write_nifti, make_oblique_affine,
                                                qcode, scode):
    data = rng.standard_normal((8, 9, 10)).astype(np.float32)
    affine = make_oblique_affine(17.0, (0.9, 1.1, 2.5))
    src = write_nifti(tmp_path / "in.nii.gz", data, affine, qform_code=qcode, sform_code=scode)
    loaded, aff_in, header = load_nifti(src)
    np.testing.assert_array_equal(loaded, data)

    out = save_nifti(tmp_path / "sub" / "dir" / "out.nii.gz", loaded, aff_in, header)
    assert out.exists()
    with open(out, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # gzipped
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    # The affine read back equals the input's (to float32 storage precision of the header).
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert int(img.header["qform_code"]) == qcode
    assert int(img.header["sform_code"]) == scode
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert _no_temp_files(out.parent)


def test_save_without_header_keeps_affine(tmp_path, axial_affine):
    data = np.arange(4 * 5 * 6, dtype=np.float64).reshape(4, 5, 6)
    out = save_nifti(tmp_path / "a.nii.gz", data, axial_affine)
    loaded, aff, _ = load_nifti(out)
    np.testing.assert_array_equal(loaded, data.astype(np.float32))
    np.testing.assert_allclose(aff, axial_affine, atol=1e-6)


def test_save_header_without_orientation_keeps_affine(tmp_path, write_nifti, oblique_affine):
    # A header with qform_code = sform_code = 0 would drop the affine; the writer keeps it.
    src = write_nifti(tmp_path / "in.nii.gz", np.ones((4, 4, 4), np.float32), oblique_affine,
                      qform_code=0, sform_code=0)
    _, _, header = load_nifti(src)
    out = save_nifti(tmp_path / "out.nii.gz", np.ones((4, 4, 4)), oblique_affine, header)
    np.testing.assert_allclose(nib.load(str(out)).affine, oblique_affine, atol=1e-5)


def test_save_bool_mask_as_uint8(tmp_path, axial_affine):
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    out = save_nifti(tmp_path / "mask.nii.gz", mask, axial_affine, dtype=np.uint8)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask.astype(np.uint8))


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, axial_affine):
    target = tmp_path / "out.nii.gz"

    def boom(img, filename):
        with open(filename, "wb") as f:  # a partial file appears, then the write fails
            f.write(b"\x1f\x8b partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(target, np.zeros((3, 3, 3)), axial_affine)
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_previous_content(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    atomic_write_json(target, {"a": 1})

    def boom(*args, **kwargs):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic_mod.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["record.json"]


def test_atomic_text_and_json(tmp_path):
    p = atomic_write_text(tmp_path / "x" / "note.txt", "hello\n")
    assert p.read_text() == "hello\n"
    q = atomic_write_json(tmp_path / "params.json",
                          {"TE": np.array([0.004, 0.008]), "B0": np.float32(3.0),
                           "nan": float("nan"), "nested": [math.inf, 1.5]})
    obj = json.loads(q.read_text())
    assert obj == {"TE": [0.004, 0.008], "B0": 3.0, "nan": None, "nested": [None, 1.5]}
    # Same permissions as a plain open() would give (mkstemp alone makes 0600 files).
    assert q.stat().st_mode & 0o777 == 0o666 & ~atomic_mod._UMASK
    assert _no_temp_files(tmp_path)


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(QSMInputError, match="nothere.nii.gz: file not found"):
        load_nifti(tmp_path / "nothere.nii.gz")


def test_load_not_nifti_names_it(tmp_path):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(QSMInputError, match="garbage.nii.gz: cannot read"):
        load_nifti(bad)


def test_load_truncated_gzip_names_it(tmp_path, write_nifti):
    src = write_nifti(tmp_path / "t.nii.gz", np.ones((8, 8, 8), np.float32))
    raw = gzip.decompress(src.read_bytes())
    src.write_bytes(gzip.compress(raw)[:-40])  # cut inside the data
    with pytest.raises(QSMInputError, match="t.nii.gz"):
        load_nifti(src)


def test_load_wrong_extension_names_it(tmp_path):
    p = tmp_path / "image.mgz"
    p.write_bytes(b"x")
    with pytest.raises(QSMInputError, match="image.mgz: not a NIfTI file name"):
        load_nifti(p)


def test_load_nan_names_it(tmp_path, write_nifti):
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    src = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(QSMInputError, match=r"nan.nii.gz: 2 voxel\(s\) are NaN or infinite"):
        load_nifti(src)
