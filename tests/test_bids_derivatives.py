"""``qsmnet predict --bids`` writes a BIDS derivative dataset: checked by the BIDS validator
(``bids-validator-deno`` from PyPI, the schema-based validator, where it is installed) and, in any
case, against the keys the BIDS specification requires or recommends (BIDS 1.9, "Derivatives":
``dataset_description.json`` with ``Name``, ``BIDSVersion``, ``DatasetType: derivative`` and
``GeneratedBy``; "Common data types and metadata": ``Description``, ``Sources`` as BIDS URIs,
``SkullStripped`` of image derivatives, ``Type`` of masks from Brain/Lesion/Face/ROI).
The ``--roi`` table is compared with numpy on the written chi map, and ``--reference`` with the
constant the record states."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmnet import __version__
from qsmnet.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

PREDICT = ["--method", "tkd", "--device", "cpu"]
MASK_TYPES = {"Brain", "Lesion", "Face", "ROI"}  # BIDS common derivatives, masks: Type values


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bidsderiv") / "bids"
    assert main(["simulate", "--out", str(root), "--subject", "01", "--shape", "16", "16", "16",
                 "--seed", "1"]) == 0
    return root


def _grid(raw: Path):
    img = nib.load(raw / "sub-01" / "anat" / "sub-01_echo-1_part-phase_MEGRE.nii.gz")
    return img.shape[:3], img.affine


@pytest.fixture(scope="module")
def labels(raw: Path) -> tuple[Path, Path]:
    shape, affine = _grid(raw)
    lab = np.zeros(shape, np.int16)
    lab[:, :, : shape[2] // 2] = 3
    lab[:, :, shape[2] // 2:] = 5
    lab[:4, :4, :4] = 9  # a corner, outside the brain mask
    path = raw.parent / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(lab, affine), path)
    names = raw.parent / "atlas.tsv"
    names.write_text("index\tname\n3\tinferior\n5\tsuperior\n9\tcorner\n")
    return path, names


@pytest.fixture(scope="module")
def derivative(raw: Path, labels) -> Path:
    root = raw.parent / "work"
    shutil.copytree(raw, root)
    assert main(["predict", "--bids", str(root), *PREDICT, "--roi", str(labels[0]),
                 "--roi-names", str(labels[1])]) == 0
    return root / "derivatives" / "qsmnet"


def _validator() -> str | None:
    for name in ("bids-validator-deno",):
        found = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                       if (Path(sys.executable).parent / name).is_file() else None)
        if found:
            return found
    return None


def test_bids_validator_accepts_the_derivative_dataset(derivative):
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno, "
                    "in the dev extra); the required keys are checked by the other tests here")
    proc = subprocess.run([exe, str(derivative), "--format", "json"], capture_output=True,
                          text=True, timeout=300, check=False)
    report = json.loads(proc.stdout)
    issues = report["issues"]["issues"]
    errors = [(i["code"], i.get("subCode"), i.get("location")) for i in issues
              if i["severity"] == "error"]
    assert errors == [], errors
    assert proc.returncode == 0
    # its files were seen: dataset_description.json, README.md, and the chi map, the three
    # masks and their sidecars (field maps, ROI table and preview are in .bidsignore)
    assert report["summary"]["dataTypes"] == ["anat"]
    assert report["summary"]["totalFiles"] == 10


def test_dataset_description_has_the_required_derivative_keys(derivative, raw):
    desc = json.loads((derivative / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["Name"] and desc["BIDSVersion"].count(".") == 2
    assert desc["GeneratedBy"][0] == {"Name": "qsmnet", "Version": __version__}
    # DatasetLinks.raw names the raw dataset the Sources URIs point into
    raw_root = (derivative / desc["DatasetLinks"]["raw"]).resolve()
    assert raw_root == (derivative.parent.parent).resolve()
    assert (derivative / "README.md").is_file()
    ignored = (derivative / ".bidsignore").read_text().splitlines()
    assert "*_fieldmap.nii.gz" in ignored and "*_stats.tsv" in ignored


def _resolve(uri: str, derivative: Path) -> Path:
    if uri.startswith("bids::"):
        return derivative / uri[len("bids::"):]
    assert uri.startswith("bids:raw:"), uri
    return derivative.parent.parent / uri[len("bids:raw:"):]


def test_every_nifti_has_a_sidecar_with_description_units_and_sources(derivative):
    anat = derivative / "sub-01" / "anat"
    niftis = sorted(anat.glob("*.nii.gz"))
    assert len(niftis) == 6  # chimap, 2 field maps, 3 masks
    for nii in niftis:
        meta = json.loads(nii.with_name(nii.name[: -len(".nii.gz")] + ".json").read_text())
        assert meta["Description"], nii.name
        assert meta["Sources"], nii.name
        for uri in meta["Sources"]:
            assert _resolve(uri, derivative).is_file(), (nii.name, uri)
        if nii.name.endswith("_mask.nii.gz"):
            assert meta["Type"] in MASK_TYPES and "Units" not in meta
            assert _resolve(meta["SpatialReference"], derivative).is_file()
        else:
            assert meta["Units"] == "ppm" and meta["SkullStripped"] is True
    record = json.loads((anat / "sub-01_Chimap.json").read_text())
    assert record["method"] == "tkd" and "tkd" in record["Description"]
    assert record["reference"]["reference"] == "mask-mean"
    assert record["reference"]["voxels"] == int(
        nib.load(anat / "sub-01_desc-qsm_mask.nii.gz").get_fdata().sum())
    assert record["roi"]["regions"] == 3
    for name in record["outputs"].values():
        assert (anat / name).is_file(), name


def test_roi_table_is_numpy_on_the_written_chimap(derivative, labels):
    anat = derivative / "sub-01" / "anat"
    chi = nib.load(anat / "sub-01_Chimap.nii.gz").get_fdata()
    mask = nib.load(anat / "sub-01_desc-qsm_mask.nii.gz").get_fdata() > 0
    lab = np.asarray(nib.load(labels[0]).dataobj)
    with open(anat / "sub-01_desc-roi_stats.tsv", newline="", encoding="utf-8") as f:
        rows = {int(r["index"]): r for r in csv.DictReader(f, delimiter="\t")}
    assert sorted(rows) == [3, 5, 9]
    assert [rows[i]["name"] for i in (3, 5, 9)] == ["inferior", "superior", "corner"]
    for index, row in rows.items():
        values = chi[(lab == index) & mask]
        assert int(row["voxels"]) == values.size
        assert int(row["voxels_outside_mask"]) == int(((lab == index) & ~mask).sum())
        if values.size == 0:
            assert row["mean_ppm"] == "n/a"
            continue
        # float32 chi read back as float64 both times; the TSV keeps 9 significant digits
        for col, value in (("mean_ppm", values.mean()), ("median_ppm", np.median(values)),
                           ("std_ppm", values.std())):
            assert abs(float(row[col]) - value) <= 1e-8 * max(abs(value), 1e-6), (index, col)
    assert rows[9]["voxels"] == "0"  # the corner lies outside the brain
    columns = json.loads((anat / "sub-01_desc-roi_stats.json").read_text())
    assert columns["mean_ppm"]["Units"] == "ppm"


def test_reference_none_differs_from_mask_mean_by_the_recorded_constant(raw, tmp_path):
    root = tmp_path / "bids"
    shutil.copytree(raw, root)
    out_mm, out_none = tmp_path / "mm", tmp_path / "none"
    assert main(["predict", "--bids", str(root), *PREDICT, "--no-preview", "--out",
                 str(out_mm)]) == 0
    assert main(["predict", "--bids", str(root), *PREDICT, "--no-preview", "--out",
                 str(out_none), "--reference", "none"]) == 0
    rel = Path("sub-01") / "anat"
    mm = nib.load(out_mm / rel / "sub-01_Chimap.nii.gz")
    none = nib.load(out_none / rel / "sub-01_Chimap.nii.gz")
    mask = nib.load(out_mm / rel / "sub-01_desc-qsm_mask.nii.gz").get_fdata() > 0
    rec_mm = json.loads((out_mm / rel / "sub-01_Chimap.json").read_text())["reference"]
    rec_none = json.loads((out_none / rel / "sub-01_Chimap.json").read_text())["reference"]
    assert rec_none == {"reference": "none", "description": rec_none["description"],
                        "value_ppm": 0.0, "voxels": 0}
    diff = none.get_fdata()[mask] - mm.get_fdata()[mask]
    # float32 maps of |chi| < 1 ppm: each difference within 2 eps32 of the constant
    assert np.max(np.abs(diff - rec_mm["value_ppm"])) < 3e-7
    assert none.header["descrip"].tobytes().rstrip(b"\0") == b"chi ppm, not referenced"
    assert b"mean in the mask" in mm.header["descrip"].tobytes()


def test_label_image_off_the_grid_is_one_error_and_nothing_is_written(raw, tmp_path, capsys):
    shape, affine = _grid(raw)
    moved = affine.copy()
    moved[0, 3] += 2.0
    bad = tmp_path / "elsewhere.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.int16), moved), bad)
    frac = tmp_path / "prob.nii.gz"
    nib.save(nib.Nifti1Image(np.full(shape, 0.25, np.float32), affine), frac)
    for path, message in ((bad, "affine differs from the chi map of sub-01"),
                          (frac, "labels must be integers")):
        out = tmp_path / f"out-{path.stem}"
        capsys.readouterr()
        assert main(["predict", "--bids", str(raw), *PREDICT, "--out", str(out), "--roi",
                     str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
        assert not out.exists()
    assert main(["predict", "--bids", str(raw), *PREDICT, "--out", str(tmp_path / "o"),
                 "--roi-names", str(bad)]) == 2
    assert "--roi-names: only used with --roi" in capsys.readouterr().err


def test_bids_app_form_passes_reference_and_roi_on(raw, labels):
    from qsmnet.cohort.arguments import parse_bids_app

    args = parse_bids_app([str(raw), str(raw.parent / "out"), "participant", "--reference",
                           "csf", "--roi", os.fspath(labels[0])])
    assert args.predict_args == ["--reference", "csf", "--roi", os.fspath(labels[0])]
    from qsmnet.cli import _UsageError  # the predict parser refuses a bad choice

    with pytest.raises(_UsageError, match="--reference: invalid choice: 'whole-brain'"):
        parse_bids_app([str(raw), str(raw.parent / "out"), "participant", "--reference",
                        "whole-brain"])
