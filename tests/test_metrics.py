"""Metric wrappers: known answers for offsets, scalings and erosion."""

import numpy as np
import pytest

from qsmnet.metrics import score
from qsmnet.metrics.qsm import eroded_mask, score_table


@pytest.fixture()
def truth_and_mask():
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 0.05, (24, 24, 24))
    mask = np.zeros(truth.shape, np.uint8)
    mask[4:20, 4:20, 4:20] = 1
    return truth, mask


def test_constant_offset_is_free_and_scaling_is_detrended(truth_and_mask):
    truth, mask = truth_and_mask
    s = score(truth + 0.3, truth, mask)["mask"]
    assert s["nrmse"] == pytest.approx(0.0, abs=1e-9) and s["correlation"] == pytest.approx(1.0)
    s2 = score(2.0 * truth, truth, mask)["mask"]
    # Demeaned NRMSE of 2x is ||x - xbar|| / ||x - xbar|| = 100 %; detrending removes the slope.
    assert s2["nrmse"] == pytest.approx(100.0, rel=1e-6)
    assert s2["nrmse_detrend"] == pytest.approx(0.0, abs=1e-6)


def test_nrmse_matches_direct_formula(truth_and_mask):
    truth, mask = truth_and_mask
    rng = np.random.default_rng(1)
    pred = truth + rng.normal(0, 0.02, truth.shape)
    m = mask > 0
    a, b = pred[m] - pred[m].mean(), truth[m] - truth[m].mean()
    expected = 100 * np.linalg.norm(a - b) / np.linalg.norm(b)
    assert score(pred, truth, mask, erode_mm=None)["mask"]["nrmse"] == pytest.approx(expected)


def test_eroded_mask_of_a_cube_anisotropic():
    mask = np.zeros((30, 30, 20), bool)
    mask[5:25, 5:25, 5:15] = True
    er = eroded_mask(mask, (1.0, 1.0, 2.0), 2.0)
    # A ball of 2 mm is 2 voxels in x, y and 1 voxel in z: the cube shrinks by that much per side.
    assert er.sum() == 16 * 16 * 8


def test_shape_mismatch_and_empty_mask_raise(truth_and_mask):
    truth, mask = truth_and_mask
    with pytest.raises(ValueError, match="shape"):
        score(truth[:-1], truth, mask)
    with pytest.raises(ValueError, match="empty"):
        score(truth, truth, np.zeros_like(mask))


def test_table_renders_rows(truth_and_mask):
    truth, mask = truth_and_mask
    table = score_table({"identity": score(truth, truth, mask)["mask"]})
    assert "| identity | 0.0 | 0.0 | 0.0 | 1.000 | 1.000 |" in table


def test_evaluate_cli_table_and_json(tmp_path, capsys, truth_and_mask):
    import json

    from qsmnet.cli import main
    from qsmnet.io import save_nifti

    truth, mask = truth_and_mask
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    save_nifti(tmp_path / "t.nii.gz", truth, aff)
    save_nifti(tmp_path / "p.nii.gz", 2 * truth, aff)
    save_nifti(tmp_path / "m.nii.gz", mask, aff, dtype=np.uint8)
    args = [str(tmp_path / n) for n in ("p.nii.gz", "t.nii.gz", "m.nii.gz")]
    assert main(["evaluate", *args, "--json", str(tmp_path / "s.json"), "--erode-mm", "2"]) == 0
    out = capsys.readouterr().out
    assert "| mask | 100.0 |" in out and "mask eroded 2 mm" in out
    metrics = json.loads((tmp_path / "s.json").read_text())["metrics"]
    assert metrics["mask"]["nrmse"] == pytest.approx(100.0, rel=1e-4)
    assert metrics["eroded_mask"]["n_voxels"] == 12 ** 3
    # A mask on another grid is refused, naming the file.
    save_nifti(tmp_path / "m2.nii.gz", mask[:-1], aff, dtype=np.uint8)
    assert main(["evaluate", args[0], args[1], str(tmp_path / "m2.nii.gz")]) == 2
    assert "m2.nii.gz" in capsys.readouterr().err


def test_evaluate_script_matches_the_cli(tmp_path, truth_and_mask):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from qsmnet.io import save_nifti

    truth, mask = truth_and_mask
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    save_nifti(tmp_path / "t.nii.gz", truth, aff)
    save_nifti(tmp_path / "p.nii.gz", truth + 0.5 * np.roll(truth, 1, axis=0), aff)
    save_nifti(tmp_path / "m.nii.gz", mask, aff, dtype=np.uint8)
    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    args = [str(tmp_path / n) for n in ("p.nii.gz", "t.nii.gz", "m.nii.gz")]
    res = subprocess.run([sys.executable, str(script), *args, "--json", str(tmp_path / "s.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "s.json").read_text())["metrics"]
    pred = np.asarray(truth + 0.5 * np.roll(truth, 1, axis=0), np.float32).astype(np.float64)
    direct = score(pred, np.asarray(truth, np.float32).astype(np.float64), mask > 0, (1.0, 1.0, 2.0),
                   erode_mm=3.0)
    for region in ("mask", "eroded_mask"):
        for key in ("nrmse", "hfen", "xsim", "correlation"):
            assert metrics[region][key] == pytest.approx(direct[region][key], rel=1e-5)
    bad = subprocess.run([sys.executable, str(script), args[0], args[1], str(tmp_path / "none.nii.gz")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.nii.gz" in bad.stderr and not (tmp_path / "none.json").exists()
