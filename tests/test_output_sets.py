"""Output sets: a run writes all of its files or none, never overwrites another run's outputs
without --overwrite, refuses unwritable or locked folders and volumes too large for the memory
before computing, and a rerun after any failure (an exception, a full disk, a kill) succeeds."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import qsmnet.inference.outputs as outputs_module
import qsmnet.inference.options as options_module
import qsmnet.inference.resources as resources
from qsmnet.cli import main
from qsmnet.io.output_set import LOCK_NAME, STAGING_PREFIX, FolderLock, OutputSet, recover

ROOT = Path(__file__).resolve().parents[1]
SET = ("chimap.nii.gz", "chimap.json", "localfield.nii.gz", "totalfield.nii.gz", "mask.nii.gz",
       "fieldsupport_mask.nii.gz", "unreliable_mask.nii.gz")


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> dict[str, Path]:
    """A small simulated subject as plain NIfTI files (4-D phase and magnitude, params.json)."""
    root = tmp_path_factory.mktemp("subject")
    assert main(["simulate", "--out", str(root / "bids"), "--subject", "a", "--shape", "32", "32",
                 "24", "--voxel-size", "2", "2", "2", "--seed", "3"]) == 0
    anat = root / "bids" / "sub-a" / "anat"
    files = {}
    for part in ("phase", "mag"):
        echoes = sorted(anat.glob(f"*_part-{part}_MEGRE.nii.gz"))
        imgs = [nib.load(p) for p in echoes]
        data = np.stack([np.asarray(i.dataobj) for i in imgs], axis=-1)
        files[part] = root / f"{part}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), imgs[0].affine), files[part])
    te = [json.loads(p.read_text())["EchoTime"] for p in sorted(anat.glob("*_part-phase_MEGRE.json"))]
    files["params"] = root / "params.json"
    files["params"].write_text(json.dumps({"TE": te, "B0": 3.0}))
    files["bids"] = root / "bids"
    return files


def _predict(subject, out: Path, *extra: str) -> int:
    return main(["predict", "--phase", str(subject["phase"]), "--magnitude", str(subject["mag"]),
                 "--params", str(subject["params"]), "--out", str(out), "--method", "tkd",
                 "--no-preview", "--device", "cpu", *extra])


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def _assert_whole_set(folder: Path, allow_lock: bool = False) -> dict:
    """The JSON record names every output, each exists and loads; nothing hidden is left (but
    the lock file of a killed run, with ``allow_lock``: the next run takes and removes it)."""
    record = json.loads((folder / "chimap.json").read_text())
    for name in record["outputs"].values():
        assert (folder / name).is_file(), name
        if name.endswith(".nii.gz"):
            assert np.all(np.isfinite(nib.load(folder / name).get_fdata()))
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")
              and not (allow_lock and p.name == LOCK_NAME)]
    assert not hidden, hidden
    return record


def test_rerun_with_another_method_is_refused_unless_overwrite(subject, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(subject, out) == 0
    first = _listing(out)
    assert set(SET) <= set(first)
    capsys.readouterr()
    assert _predict(subject, out, "--method", "l2") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qsmnet: error: ") and len(err.splitlines()) == 1
    assert "exists (made by --method tkd on" in err and "--overwrite" in err
    assert _listing(out) == first  # untouched
    assert _predict(subject, out, "--method", "l2", "--overwrite") == 0
    assert _assert_whole_set(out)["method"] == "l2"
    assert (out / "chimap.nii.gz").read_bytes() != first["chimap.nii.gz"]


def test_overwrite_removes_the_earlier_sets_companions(subject, tmp_path):
    out = tmp_path / "out"
    assert _predict(subject, out, "--max-phase-step", "1.0") == 0
    assert (out / "unreliable_mask.nii.gz").is_file()
    # the unreliable-phase test off: that mask is not part of the new set and must go
    assert _predict(subject, out, "--max-phase-step", "0", "--overwrite") == 0
    record = _assert_whole_set(out)
    assert "unreliable" not in record["outputs"]
    assert not (out / "unreliable_mask.nii.gz").exists()


def test_bids_rerun_is_refused_and_names_the_file(subject, tmp_path, capsys):
    import shutil

    bids = tmp_path / "bids"
    shutil.copytree(subject["bids"], bids)
    argv = ["predict", "--bids", str(bids), "--method", "tkd", "--no-preview", "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv[:3], "--method", "l2", *argv[5:]]) == 2
    assert "sub-a_Chimap.nii.gz: exists (made by --method tkd" in capsys.readouterr().err


@pytest.mark.parametrize("fail_on", ["chimap.nii.gz", "localfield.nii.gz"])
def test_a_failed_write_leaves_no_partial_set_and_a_rerun_succeeds(subject, tmp_path, capsys,
                                                                   monkeypatch, fail_on):
    out = tmp_path / "out"
    real = outputs_module.save_nifti

    def disk_full(path, *args, **kwargs):
        if Path(path).name == fail_on:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(outputs_module, "save_nifti", disk_full)
    assert _predict(subject, out) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert _listing(out) == {}  # no map, no record, no staging folder, no lock
    monkeypatch.setattr(outputs_module, "save_nifti", real)
    assert _predict(subject, out) == 0
    _assert_whole_set(out)


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): run as root to test "
                    "a real full or read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_leaves_no_partial_set(subject, tmp_path, capsys):
    # 40 kB (ten 4 kB pages) hold the first maps of the set (about 15 kB each), not all of them
    with _tmpfs(tmp_path / "small", "size=40k") as disk:
        out = disk / "out"
        code = _predict(subject, out)
        err = capsys.readouterr().err
        assert code == 1 and "No space left" in err, err
        assert _listing(out) == {}
        assert _listing(disk) == {}  # the folders the run created are gone too


def test_a_read_only_folder_fails_before_computing(subject, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(options_module, "make_inverter",
                        lambda *a, **k: loaded.append(a) or pytest.fail("computed"))
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        assert _predict(subject, disk / "out") == 2
        err = capsys.readouterr().err
        assert "cannot write output here (Read-only file system" in err, err
    assert not loaded


def test_a_folder_in_use_by_another_run_is_refused(subject, tmp_path, capsys):
    out = tmp_path / "out"
    with FolderLock(out):
        assert _predict(subject, out) == 2
        err = capsys.readouterr().err
        assert f"another qsmnet run (pid {os.getpid()}) is writing to this folder" in err
    assert not (out / LOCK_NAME).exists()
    assert _predict(subject, out) == 0


def test_leftovers_of_killed_runs_are_cleared_or_finished(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    # killed while computing: a staging folder with no journal, a temporary file of a dead pid
    partial = folder / f"{STAGING_PREFIX}{dead}-0000"
    partial.mkdir()
    (partial / "localfield.nii.gz").write_bytes(b"partial")
    (folder / f".chimap.json.{dead}.abcd1234.tmp.json").write_text("{")
    # killed while moving a set in: its journal says what remains to be done
    with OutputSet(folder) as staged:
        for name in ("a.txt", "b.txt"):
            staged.path(name).write_text(name)
        (staged.staging / ".commit.json").write_text(json.dumps({"move": ["a.txt", "b.txt"],
                                                                "remove": ["old.txt"]}))
        os.replace(staged.staging / "a.txt", folder / "a.txt")  # the first move was done
        (folder / "old.txt").write_text("old")
        leftover = staged.staging
        staged.staging = None  # "killed": no clean-up
    done = recover(folder)
    assert len(done) == 3, done
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]
    assert (folder / "b.txt").read_text() == "b.txt" and not leftover.exists()


def test_memory_estimate_bounds_a_measured_peak(subject, tmp_path):
    """The estimate is an upper bound of what predict really takes (peak RSS of the process),
    and not a wild one."""
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the pytest process the
    # child was forked from
    script = ("import sys; from qsmnet.cli import main; code = main(sys.argv[1:]); "
              "print(next(line.split()[1] for line in open('/proc/self/status') "
              "if line.startswith('VmHWM'))); sys.exit(code)")
    out = tmp_path / "out"
    argv = [sys.executable, "-c", script, "predict", "--phase", str(subject["phase"]),
            "--magnitude", str(subject["mag"]), "--params", str(subject["params"]), "--out",
            str(out), "--method", "unet", "--no-preview", "--device", "cpu"]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    peak_mb = int(res.stdout.strip().splitlines()[-1]) / 1024
    shape = nib.load(subject["phase"]).shape
    estimate_mb = resources.estimate_peak_bytes(shape[:3], shape[3]) / 2**20
    assert peak_mb < estimate_mb < 3 * peak_mb, (peak_mb, estimate_mb)


def test_a_volume_too_large_for_the_memory_is_refused_with_the_figures(subject, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 64 * 2**20)
    out = tmp_path / "out"
    assert _predict(subject, out) == 2
    err = capsys.readouterr().err
    assert "needs about 0.6 GiB of memory and 0.1 GiB are available" in err, err
    assert "--skip-memory-check" in err and _listing(out) == {}
    assert _predict(subject, out, "--skip-memory-check") == 0


def test_384_cubed_with_the_network_does_not_fit_this_machine_kind():
    """The case the OOM killer used to end with no message: 384^3, 4 echoes, 24 GiB."""
    need = resources.estimate_peak_bytes((384, 384, 384), 4)
    with pytest.raises(ValueError, match=r"needs about 2\d\.\d GiB .* 23\.0 GiB are available"):
        resources.check_memory((384, 384, 384), 4, "unet", "cpu", "big", available=23 * 2**30)
    assert need > 24 * 2**30


def test_run_stage_writes_a_whole_set_and_refuses_to_overwrite(tmp_path, write_qsmci_folder,
                                                               capsys):
    write_qsmci_folder(tmp_path / "in", "dipole")
    out = tmp_path / "out"
    argv = ["run-stage", "dipole", str(tmp_path / "in"), str(out), "--method", "tkd"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["chimap.json", "chimap.nii.gz"]
    first = _listing(out)
    capsys.readouterr()
    assert main(argv) == 2
    assert "chimap.nii.gz: exists" in capsys.readouterr().err and _listing(out) == first
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.slow
def test_sigkill_while_writing_leaves_the_old_set_or_the_new_one(subject, tmp_path):
    """SIGKILL `qsmnet predict --overwrite` at random moments after it starts writing (when its
    staging folder appears): the folder then holds one whole set, the earlier one or the new one,
    and the next run clears the leftovers and succeeds. Ten kills, their delays printed on
    failure."""
    out = tmp_path / "out"
    base = [sys.executable, "-m", "qsmnet.cli", "predict", "--phase", str(subject["phase"]),
            "--magnitude", str(subject["mag"]), "--params", str(subject["params"]), "--out",
            str(out), "--no-preview", "--device", "cpu", "--overwrite"]
    assert subprocess.run([*base, "--method", "tkd"], cwd=ROOT, capture_output=True).returncode == 0
    rng = random.Random()
    outcomes = []
    for trial in range(10):
        delay_s = rng.uniform(0.0, 0.02)  # writing the set takes about 10-15 ms
        method = ("l2", "tkd")[trial % 2]
        proc = subprocess.Popen([*base, "--method", method], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir()):
                time.sleep(delay_s)
                break
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        why = f"trial {trial}: killed {delay_s * 1000:.1f} ms after writing began"
        recover(out)
        record = _assert_whole_set(out, allow_lock=True)
        assert record["method"] in ("l2", "tkd"), why
        outcomes.append(f"{delay_s * 1000:.0f} ms: {'new' if record['method'] == method else 'old'}")
    print("kills:", "; ".join(outcomes))
    res = subprocess.run([*base, "--method", "l2"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _assert_whole_set(out)["method"] == "l2"


def test_memory_estimate_bounds_the_benchmarked_peaks():
    """Against the peaks `scripts/benchmark.py speed` measured up to 256x256x176 x 4 echoes:
    the estimate, one figure for any built-in method, lies above every method's peak and
    within twice the peak of the most demanding one at that size."""
    runs = json.loads((ROOT / "docs" / "results" / "speed.json").read_text())["runs"]
    assert any(key.startswith("cpu/256x256x176/") for key in runs)
    peaks: dict[str, dict[str, float]] = {}
    for key, run in runs.items():
        peaks.setdefault(key.split("/")[1], {})[key] = run["peak_rss_mb"]
    for shape, by_key in peaks.items():
        estimate_mb = resources.estimate_peak_bytes([int(v) for v in shape.split("x")], 4) / 2**20
        for key, peak_mb in by_key.items():
            assert peak_mb < estimate_mb, key
        assert estimate_mb < 2 * max(by_key.values()), shape
