"""The BIDS-App form ``qsmnet BIDS_DIR OUTPUT_DIR participant`` (qsmnet.cohort).

A small study is simulated once (two 16^3 subjects and a third whose second phase echo is a
truncated gzip file); it is reconstructed serially, then again on a two-worker Dask cluster,
and the two derivative folders are compared file by file; a second serial run must skip the
subjects done and redo one whose record was removed. Every subject runs in its own
``python -m qsmnet predict`` process with one torch thread in both runs (same code, same thread
count), so equal arrays are expected, not merely close ones.
"""

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

from qsmnet.cli import main
from qsmnet.cohort import SUMMARY_NAME, is_bids_app_call, subject_state

PREDICT_ARGS = ["--method", "tkd", "--no-preview"]
GOOD, BROKEN = ("01", "02"), "09"
BROKEN_FILE = f"sub-{BROKEN}_echo-2_part-phase_MEGRE.nii.gz"


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / SUMMARY_NAME, newline="", encoding="utf-8") as f:
        return {row["participant_id"]: row for row in csv.DictReader(f, delimiter="\t")}


def _outputs(out: Path, label: str) -> dict[str, Path]:
    return {p.name: p for p in sorted((out / f"sub-{label}" / "anat").iterdir())}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort") / "bids"
    for seed, label in enumerate(GOOD, start=1):
        assert main(["simulate", "--out", str(root), "--subject", label, "--shape", "16", "16",
                     "16", "--seed", str(seed)]) == 0
    # the broken subject: sub-01's files renamed, one echo's gzip stream cut in half
    src, dst = root / "sub-01" / "anat", root / f"sub-{BROKEN}" / "anat"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, dst / f.name.replace("sub-01", f"sub-{BROKEN}"))
    data = (dst / BROKEN_FILE).read_bytes()
    (dst / BROKEN_FILE).write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def serial(study: Path) -> tuple[Path, int]:
    out = study.parent / "serial"
    code = main([str(study), str(out), "participant", "--threads-per-subject", "1",
                 *PREDICT_ARGS])
    return out, code


def test_serial_run_reconstructs_good_subjects_and_reports_the_broken_one(study, serial):
    out, code = serial
    assert code == 1  # one subject failed
    rows = _summary(out)
    assert list(rows) == ["sub-01", "sub-02", f"sub-{BROKEN}"]
    for label in GOOD:
        assert rows[f"sub-{label}"]["status"] == "done"
        assert float(rows[f"sub-{label}"]["runtime_s"]) > 0
        assert rows[f"sub-{label}"]["error"] == "n/a"
        assert subject_state(study, out, label) == "done"
    broken = rows[f"sub-{BROKEN}"]
    assert broken["status"] == "failed"
    assert BROKEN_FILE in broken["error"] and "cannot read as NIfTI" in broken["error"]
    assert not (out / f"sub-{BROKEN}").exists()  # predict wrote nothing for it
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"


def test_outputs_are_those_of_qsmnet_predict(study, serial, tmp_path):
    """The same files, with the same arrays, as ``qsmnet predict --bids --subject --out``."""
    out, _ = serial
    direct = tmp_path / "direct"
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "qsmnet", "predict", "--bids", str(study),
                           "--subject", "01", "--out", str(direct), *PREDICT_ARGS],
                          env={**os.environ, **env}, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    ours, theirs = _outputs(out, "01"), _outputs(direct, "01")
    assert list(ours) == list(theirs)
    assert "sub-01_Chimap.nii.gz" in ours and "sub-01_Chimap.json" in ours
    for name in ours:
        if name.endswith(".nii.gz"):
            assert np.array_equal(nib.load(ours[name]).get_fdata(),
                                  nib.load(theirs[name]).get_fdata()), name
    record, direct_record = (json.loads(p["sub-01_Chimap.json"].read_text())
                             for p in (ours, theirs))
    assert record["parameters"] == direct_record["parameters"]
    assert record["outputs"] == direct_record["outputs"]


def test_dask_cluster_gives_the_serial_outputs_bit_for_bit(study, serial):
    distributed = pytest.importorskip("distributed")
    out_serial, _ = serial
    out = study.parent / "dask"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        # one good and the broken subject: one task for each worker, at the same time
        code = main([str(study), str(out), "participant", "--dask-scheduler",
                     cluster.scheduler_address, "--participant-label", "01", BROKEN,
                     *PREDICT_ARGS])
    assert code == 1
    rows = _summary(out)
    assert {k: v["status"] for k, v in rows.items()} == {"sub-01": "done",
                                                         f"sub-{BROKEN}": "failed"}
    assert rows[f"sub-{BROKEN}"]["error"] == _summary(out_serial)[f"sub-{BROKEN}"]["error"]
    # default on Dask: one torch thread per subject (a worker's threads are its cores)
    assert "\n# threads 1\n" in (out / "logs" / "sub-01_predict.log").read_text()
    for label in GOOD[:1]:
        ours, theirs = _outputs(out, label), _outputs(out_serial, label)
        assert list(ours) == list(theirs)
        for name, path in ours.items():
            if name.endswith(".nii.gz"):
                a, b = nib.load(path), nib.load(theirs[name])
                assert a.header.binaryblock == b.header.binaryblock, name
                assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), name


def test_second_run_skips_done_subjects_and_redoes_an_incomplete_one(study, serial, tmp_path):
    out = tmp_path / "rerun"
    shutil.copytree(serial[0], out)
    kept = {p: p.stat().st_mtime_ns for p in _outputs(out, "01").values()}
    chimap_02 = np.asanyarray(nib.load(out / "sub-02/anat/sub-02_Chimap.nii.gz").dataobj)
    (out / "sub-02/anat/sub-02_Chimap.json").unlink()  # as if killed before the record
    assert subject_state(study, out, "02") == "partial"
    # two subjects to run, at the same time
    code = main([str(study), str(out), "participant", "--jobs", "2", "--threads-per-subject",
                 "1", *PREDICT_ARGS])
    assert code == 1
    rows = _summary(out)
    assert rows["sub-01"]["status"] == "skipped" and rows["sub-01"]["runtime_s"] == "n/a"
    assert rows["sub-02"]["status"] == "done"
    assert rows[f"sub-{BROKEN}"]["status"] == "failed"
    assert {p: p.stat().st_mtime_ns for p in _outputs(out, "01").values()} == kept
    assert subject_state(study, out, "02") == "done"
    redone = np.asanyarray(nib.load(out / "sub-02/anat/sub-02_Chimap.nii.gz").dataobj)
    assert np.array_equal(redone, chimap_02)  # same inputs, same process set-up


# ---------------------------------------------------------------------------------------------
# Arguments and states (no reconstruction)
# ---------------------------------------------------------------------------------------------

def test_bids_app_form_is_recognised(tmp_path):
    assert is_bids_app_call(["bids", "out", "participant"])
    assert is_bids_app_call(["-v", "bids", "out", "participant", "--jobs", "2"])
    assert is_bids_app_call([str(tmp_path), "out"])  # existing folder: level missing
    assert not is_bids_app_call(["predict", "--bids", "bids"])
    assert not is_bids_app_call(["simulate", "--out", "x", "participant"])
    assert not is_bids_app_call(["--version"])
    assert not is_bids_app_call(["no-such-command", "x"])


@pytest.mark.parametrize("extra, message", [
    (["--subject", "01"], "--subject: not used in the BIDS-App form"),
    (["--out=elsewhere"], "--out: not used in the BIDS-App form"),
    (["--methd", "tkd"], "unrecognized arguments: --methd tkd"),
    (["--bfr", "nope"], "invalid choice: 'nope'"),
    (["--participant-label", "07"], "no MEGRE phase images for this participant"),
    (["--participant-label", "0_1"], "is not a BIDS label"),
    (["--jobs", "0"], "--jobs: 0 must be at least 1"),
])
def test_bad_arguments_stop_before_anything_is_written(study, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main([str(study), str(out), "participant", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qsmnet: error: ") and message in err[0]
    assert not out.exists()


def test_group_level_and_output_in_bids_dir_are_refused(study, capsys):
    assert main([str(study), str(study.parent / "o"), "group"]) == 2
    assert "invalid choice: 'group'" in capsys.readouterr().err
    assert main([str(study), str(study), "participant"]) == 2
    assert "must not be BIDS_DIR itself" in capsys.readouterr().err


def test_missing_dask_is_one_clear_line(study, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    out = tmp_path / "out"
    assert main([str(study), str(out), "participant", "--dask-scheduler", "tcp://x:1"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'qsmnet[cluster]'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_subject_state_follows_the_json_records(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    anat = bids / "sub-01" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    for echo in (1, 2):
        (anat / f"sub-01_ses-1_acq-x_echo-{echo}_part-phase_MEGRE.nii.gz").write_bytes(b"")
    assert subject_state(bids, out, "01") == "new"
    folder = out / "sub-01" / "ses-1" / "anat"
    folder.mkdir(parents=True)
    (folder / "sub-01_ses-1_acq-x_Chimap.nii.gz").write_bytes(b"x")
    assert subject_state(bids, out, "01") == "partial"  # a map without its record
    record = folder / "sub-01_ses-1_acq-x_Chimap.json"
    record.write_text(json.dumps({"outputs": {"chimap": "sub-01_ses-1_acq-x_Chimap.nii.gz",
                                              "localfield": "sub-01_ses-1_acq-x_lf.nii.gz"}}))
    assert subject_state(bids, out, "01") == "partial"  # the record names a missing file
    (folder / "sub-01_ses-1_acq-x_lf.nii.gz").write_bytes(b"x")
    assert subject_state(bids, out, "01") == "done"
