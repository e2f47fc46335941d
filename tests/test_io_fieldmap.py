"""Accepted inputs beyond wrapped phase (issue #19, point 2): a total field map in Hz or ppm
(``predict --fieldmap``) and phase unwrapped elsewhere (``--phase-units rad``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmnet.cli import main
from qsmnet.inference.options import ReconOptions
from qsmnet.inference.pipeline import reconstruct
from qsmnet.io import QSMInputError, save_nifti
from qsmnet.io.fieldmap import read_fieldmap
from qsmnet.io.params import write_params_json

pytestmark = pytest.mark.usefixtures("single_thread")

#: CODATA proton gamma / 2 pi, MHz/T, stated here as the test's own truth.
GAMMA_BAR = 42.57747892
SHAPE = (16, 16, 14)


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("qsmnet: error: ")]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    return lines[0]


def _b0_with_exact_scale(hz_per_ppm: float = 128.0) -> float:
    """A field strength (T, about 3) whose Hz-per-ppm factor GAMMA_BAR * B0 is exactly
    ``hz_per_ppm`` in float64: a power of two scales float32 values without rounding, so a map
    in Hz made from a float32 field in ppm converts back to it bit for bit."""
    b0 = hz_per_ppm / GAMMA_BAR
    while GAMMA_BAR * b0 != hz_per_ppm:
        b0 = float(np.nextafter(b0, math.inf if GAMMA_BAR * b0 < hz_per_ppm else 0.0))
    return b0


def _analytic(shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A smooth total field (ppm, |f| < 2) and a ball mask with background around it."""
    x, y, z = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    field = (0.8 * x + 0.5 * y * z + 0.3 * z ** 2).astype(np.float32)
    mask = ((x ** 2 + y ** 2 + z ** 2) < 0.6).astype(np.uint8)
    return field, mask


def _write_case(folder: Path, field, mask, b0_t=None, affine=None, mask_affine=None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    aff = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    paths = {"field": folder / "field.nii.gz", "mask": folder / "mask.nii.gz",
             "params": folder / "params.json"}
    img = nib.Nifti1Image(np.asarray(field, dtype=np.float32), aff)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(paths["field"]))
    m = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), aff if mask_affine is None
                        else mask_affine)
    m.header.set_xyzt_units("mm", "sec")
    nib.save(m, str(paths["mask"]))
    params: dict = {"TE": [0.02]}
    if b0_t is not None:
        params["B0"] = b0_t
    paths["params"].write_text(json.dumps(params))
    return paths


def _predict_fieldmap(paths: dict, out: Path, *extra: str) -> int:
    return main(["predict", "--fieldmap", str(paths["field"]), "--params", str(paths["params"]),
                 "--mask", str(paths["mask"]), "--out", str(out), "--method", "tkd",
                 "--device", "cpu", "--no-preview", *extra])


# --- the Hz -> ppm scaling ----------------------------------------------------------------------

def test_hz_map_is_scaled_by_gamma_bar_times_b0_exactly(tmp_path):
    field_ppm, mask = _analytic()
    b0 = 2.89  # not a power-of-two factor: the division rounds, once, as in the formula below
    field_hz = (field_ppm.astype(np.float64) * GAMMA_BAR * b0).astype(np.float32)
    paths = _write_case(tmp_path, field_hz, mask, b0_t=b0)
    fm = read_fieldmap(paths["field"], paths["mask"], "hz", b0_t=b0)
    # f_ppm = f_Hz / (GAMMA_BAR [MHz/T] * B0 [T]) in float64, rounded once to float32
    expected = (field_hz.astype(np.float64) / (GAMMA_BAR * b0)).astype(np.float32)
    np.testing.assert_array_equal(fm.total_field_ppm, expected)
    # and within one float32 rounding of each way of the original field
    np.testing.assert_allclose(fm.total_field_ppm, field_ppm, rtol=2 ** -22, atol=1e-12)
    assert fm.inputs_record()["fieldmap_units"] == "hz"
    assert fm.inputs_record()["hz_per_ppm"] == pytest.approx(GAMMA_BAR * b0, rel=1e-15)


def test_ppm_map_needs_no_b0_and_equals_the_same_field_in_hz(tmp_path):
    field_ppm, mask = _analytic()
    b0 = _b0_with_exact_scale()
    hz = _write_case(tmp_path / "hz", field_ppm * np.float32(128.0), mask, b0_t=b0)
    ppm = _write_case(tmp_path / "ppm", field_ppm, mask)
    assert _predict_fieldmap(hz, tmp_path / "out_hz") == 0
    assert _predict_fieldmap(ppm, tmp_path / "out_ppm", "--fieldmap-units", "ppm") == 0
    chi_hz = nib.load(tmp_path / "out_hz" / "chimap.nii.gz").get_fdata()
    chi_ppm = nib.load(tmp_path / "out_ppm" / "chimap.nii.gz").get_fdata()
    # x128 and /128 are exact in binary floating point: the same ppm field, the same arithmetic
    np.testing.assert_array_equal(chi_hz, chi_ppm)
    assert np.abs(chi_hz[mask > 0]).max() > 0
    record = json.loads((tmp_path / "out_ppm" / "chimap.json").read_text())
    assert record["inputs"]["fieldmap_units"] == "ppm" and record["inputs"]["b0_t"] is None
    record = json.loads((tmp_path / "out_hz" / "chimap.json").read_text())
    assert record["inputs"]["fieldmap_units"] == "hz"
    assert record["inputs"]["hz_per_ppm"] == 128.0


# --- against the in-process reconstruction from the total field ---------------------------------

@pytest.fixture(scope="module")
def acquisition():
    pytest.importorskip("qsm_forward")
    from qsmnet.simulation.head_phantom import head_phantom
    from qsmnet.simulation.qsmforward_acquisition import simulate_acquisition, tilted_b0

    ph = head_phantom(voxel_size_mm=(2.0, 2.0, 2.0), scale=0.6, seed=3)
    return simulate_acquisition(ph, b0_dir=tilted_b0(15.0), peak_snr=200.0, seed=5)


def test_fieldmap_in_hz_reconstructs_as_the_total_field_start(tmp_path, acquisition):
    acq = acquisition
    b0 = _b0_with_exact_scale()
    field_ppm = acq.total_field_ppm.astype(np.float32)
    save_nifti(tmp_path / "b0_hz.nii.gz", field_ppm * np.float32(128.0), acq.affine)
    save_nifti(tmp_path / "mask.nii.gz", acq.mask.astype(np.uint8), acq.affine, dtype=np.uint8)
    write_params_json(tmp_path / "params.json", acq.te_s, b0, acq.b0_dir, acq.voxel_size_mm)
    out = tmp_path / "out"
    assert main(["predict", "--fieldmap", str(tmp_path / "b0_hz.nii.gz"), "--params",
                 str(tmp_path / "params.json"), "--mask", str(tmp_path / "mask.nii.gz"),
                 "--out", str(out), "--method", "l2", "--device", "cpu", "--no-preview"]) == 0
    # the written total field is the ppm field itself (x128, /128 exact)
    np.testing.assert_array_equal(nib.load(out / "totalfield.nii.gz").get_fdata(), field_ppm)
    sample = {"total_field_ppm": field_ppm, "mask": acq.mask, "voxel_size_mm": acq.voxel_size_mm,
              "b0_dir": acq.b0_dir, "b0_t": b0}
    ref = reconstruct(sample, ReconOptions(method="l2", device="cpu"), start="totalfield")
    chi = nib.load(out / "chimap.nii.gz").get_fdata()
    # the same float32 field, mask and geometry through the same single-threaded steps: equal up
    # to the float32 storage of the chi map (exact) and FFT plan choices (none on one thread)
    np.testing.assert_allclose(chi, ref.chi_ppm.numpy(), rtol=0, atol=1e-7)
    record = json.loads((out / "chimap.json").read_text())
    assert record["parameters"]["start"] == "totalfield"
    assert "field_mapping" not in record["timings_s"]


def _local_field_error(local_ppm: np.ndarray, acq) -> float:
    """Relative RMS error (%) of a local field against the simulated one, both at mask mean 0."""
    m = acq.mask.astype(bool)
    est = local_ppm[m] - local_ppm[m].mean()
    true = acq.local_field_ppm[m] - acq.local_field_ppm[m].mean()
    return float(100 * np.linalg.norm(est - true) / np.linalg.norm(true))


def _write_total_field(folder: Path, acq) -> np.ndarray:
    """The simulated total field (ppm), mask and params.json in ``folder``; returns the field."""
    field_ppm = acq.total_field_ppm.astype(np.float32)
    save_nifti(folder / "field.nii.gz", field_ppm, acq.affine)
    save_nifti(folder / "mask.nii.gz", acq.mask.astype(np.uint8), acq.affine, dtype=np.uint8)
    write_params_json(folder / "params.json", acq.te_s, acq.b0_t, acq.b0_dir, acq.voxel_size_mm)
    return field_ppm


def _predict_total_field(folder: Path, out: Path, method: str, budget) -> list[str]:
    """``qsmnet predict`` argv: the files of :func:`_write_total_field`, ``--bfr tfi`` with the
    ``(outer, cg)`` budget."""
    return ["predict", "--fieldmap", str(folder / "field.nii.gz"), "--fieldmap-units", "ppm",
            "--params", str(folder / "params.json"), "--mask", str(folder / "mask.nii.gz"),
            "--out", str(out), "--method", method, "--bfr", "tfi", "--tfi-iterations",
            *map(str, budget), "--device", "cpu", "--no-preview"]


def test_tfi_iterations_reach_the_solver_and_are_recorded(tmp_path, acquisition):
    """``--tfi-iterations OUTER CG``: the local field is the API's with that budget, a larger
    budget is closer to the simulated local field, and the budget is in chimap.json."""
    acq = acquisition
    field_ppm = _write_total_field(tmp_path, acq)
    errors = {}
    for budget in ((1, 4), (4, 40)):
        out = tmp_path / f"out_{budget[0]}x{budget[1]}"
        assert main(_predict_total_field(tmp_path, out, "tkd", budget)) == 0
        local = nib.load(out / "localfield.nii.gz").get_fdata()
        record = json.loads((out / "chimap.json").read_text())["parameters"]
        assert record["bfr"] == "tfi"
        assert record["bfr_params"] == {"outer_iterations": budget[0], "cg_iterations": budget[1]}
        errors[budget] = _local_field_error(local, acq)
    sample = {"total_field_ppm": field_ppm, "mask": acq.mask, "voxel_size_mm": acq.voxel_size_mm,
              "b0_dir": acq.b0_dir, "b0_t": acq.b0_t}
    ref = reconstruct(sample, ReconOptions(method="tkd", bfr="tfi", device="cpu", bfr_params={
        "outer_iterations": 4, "cg_iterations": 40}), start="totalfield")
    # same float32 inputs and steps on one thread: equal up to float32 storage of the output
    np.testing.assert_allclose(local, ref.local_field_ppm.numpy(), rtol=0, atol=1e-6)
    # both budgets start from TFI's background start (the outside sources fitted alone), which
    # leaves about 65 % of the brain's field unexplained; 4 joint CG iterations do little more,
    # 4 x 40 take off a sixth of it (what remains is the mask's edge, which this support without
    # a CSF rim cannot pin)
    assert errors[(4, 40)] < 0.9 * errors[(1, 4)], errors


def test_method_tfi_is_the_chi_of_the_total_field_inversion(tmp_path, acquisition):
    """``--method tfi --bfr tfi``: chi is the one :func:`total_field_inversion` fits (same
    weights, budget and mask), at its mean 0 on the brain; it is closer to the simulated chi
    than l2 on TFI's local field (TFI's TV prior against l2's smoothing)."""
    import torch

    from qsmnet.transforms.tfi import total_field_inversion

    acq = acquisition
    field_ppm = _write_total_field(tmp_path, acq)
    chis = {}
    for method in ("tfi", "l2"):
        out = tmp_path / method
        assert main(_predict_total_field(tmp_path, out, method, (4, 40))) == 0
        chis[method] = nib.load(out / "chimap.nii.gz").get_fdata()
    assert json.loads((tmp_path / "tfi" / "chimap.json").read_text())["method"] == "tfi"
    mask = torch.from_numpy(acq.mask.astype(bool))
    chi, _, _ = total_field_inversion(torch.from_numpy(field_ppm), mask, acq.voxel_size_mm,
                                      tuple(acq.b0_dir), outer_iterations=4, cg_iterations=40)
    # same float32 solve on one thread; chi is stored as float32 (about 1e-7 ppm steps)
    np.testing.assert_allclose(chis["tfi"], chi.numpy() * acq.mask, rtol=0, atol=1e-6)
    m = acq.mask.astype(bool)
    assert abs(chis["tfi"][m].mean()) < 1e-6

    def nrmse(x):
        truth = acq.chi_ppm[m] - acq.chi_ppm[m].mean()
        return np.linalg.norm(x[m] - x[m].mean() - truth) / np.linalg.norm(truth)

    assert nrmse(chis["tfi"]) < nrmse(chis["l2"]), (nrmse(chis["tfi"]), nrmse(chis["l2"]))


@pytest.mark.parametrize("extra,pattern", [
    (["--bfr", "pdf", "--tfi-iterations", "2", "10"],
     "--tfi-iterations: only used with --bfr tfi (not --bfr pdf)"),
    (["--bfr", "tfi", "--tfi-iterations", "0", "10"], "--tfi-iterations: both counts must be >= 1"),
    (["--method", "tfi", "--bfr", "pdf"], "--method tfi: needs --bfr tfi"),
    (["--method", "tfi", "--bfr", "tfi", "--dc-iterations", "5"],
     "--dc-iterations: not used with --method tfi"),
])
def test_tfi_options_misuse_is_refused(tmp_path, capsys, extra, pattern):
    field, mask = _analytic()
    paths = _write_case(tmp_path, field * 100, mask, b0_t=3.0)
    assert _predict_fieldmap(paths, tmp_path / "out", *extra) == 2
    assert pattern in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))


# --- refusals -----------------------------------------------------------------------------------

def _refused(capsys, paths, out, *extra) -> str:
    assert _predict_fieldmap(paths, out, *extra) == 2
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
    return _error_line(capsys.readouterr().err)


def test_hz_map_without_b0_is_refused(tmp_path, capsys):
    field, mask = _analytic()
    paths = _write_case(tmp_path, field * 100, mask)  # params.json has TE only
    line = _refused(capsys, paths, tmp_path / "out")
    assert "params.json" in line and "B0" in line
    with pytest.raises(QSMInputError, match=r"field\.nii\.gz: a field map in Hz needs"):
        read_fieldmap(paths["field"], paths["mask"], "hz", b0_t=None)


def test_nan_4d_and_other_grid_are_refused_naming_the_file(tmp_path, capsys):
    field, mask = _analytic()
    bad = field.copy()
    centre = tuple(n // 2 for n in field.shape)
    assert mask[centre]
    bad[centre] = np.nan
    line = _refused(capsys, _write_case(tmp_path / "nan", bad * 100, mask, b0_t=3.0),
                    tmp_path / "o1")
    assert "field.nii.gz: 1 voxel(s) inside the mask are NaN or infinite" in line
    four_d = np.stack([field, field], axis=-1) * 100
    line = _refused(capsys, _write_case(tmp_path / "4d", four_d, mask, b0_t=3.0), tmp_path / "o2")
    assert "field.nii.gz: 4-D image (2 volumes)" in line
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[0, 3] = 5.0
    line = _refused(capsys, _write_case(tmp_path / "aff", field * 100, mask, b0_t=3.0,
                                        mask_affine=shifted), tmp_path / "o3")
    assert "mask.nii.gz: affine differs from field map (field.nii.gz)" in line


def test_nan_outside_the_mask_reads_as_zero(tmp_path):
    """Tools that write NaN outside the brain: those voxels are never read, they become 0."""
    field, mask = _analytic()
    holes = field.copy()
    holes[mask == 0] = np.nan
    holes[0, 0, 0] = -np.inf
    fm = read_fieldmap(_write_case(tmp_path, holes, mask)["field"], tmp_path / "mask.nii.gz",
                       "ppm")
    np.testing.assert_array_equal(fm.total_field_ppm, np.where(mask == 0, 0.0, field))


def test_hz_values_given_as_ppm_are_refused(tmp_path, capsys):
    field, mask = _analytic()
    # the analytic field in Hz at 3 T: 99th percentile in the mask is hundreds of "ppm"
    paths = _write_case(tmp_path, field * GAMMA_BAR * 3.0, mask, b0_t=3.0)
    line = _refused(capsys, paths, tmp_path / "out", "--fieldmap-units", "ppm")
    assert "field.nii.gz" in line and "--fieldmap-units hz" in line
    # the same values as Hz are a plausible field (under 2 ppm)
    assert _predict_fieldmap(paths, tmp_path / "ok") == 0


def test_fieldmap_excludes_phase_and_needs_a_mask(tmp_path, capsys):
    field, mask = _analytic()
    paths = _write_case(tmp_path, field * 100, mask, b0_t=3.0)
    assert main(["predict", "--fieldmap", str(paths["field"]), "--phase", str(paths["field"]),
                 "--params", str(paths["params"]), "--out", str(tmp_path / "o")]) == 2
    assert "give exactly one input" in _error_line(capsys.readouterr().err)
    assert main(["predict", "--fieldmap", str(paths["field"]), "--params", str(paths["params"]),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--mask: required with --fieldmap" in _error_line(capsys.readouterr().err)


# --- pre-unwrapped phase --------------------------------------------------------------------------

def _predict_phase(tmp_path: Path, acq, phase: np.ndarray, out: Path, *extra: str) -> int:
    files = []
    for e in range(len(acq.te_s)):
        p, m = tmp_path / f"{out.name}_ph{e}.nii.gz", tmp_path / f"{out.name}_mag{e}.nii.gz"
        save_nifti(p, phase[e], acq.affine)
        save_nifti(m, acq.magnitude[e], acq.affine)
        files.append((p, m))
    save_nifti(tmp_path / "mask.nii.gz", acq.mask.astype(np.uint8), acq.affine, dtype=np.uint8)
    return main(["predict", "--phase", *[str(p) for p, _ in files],
                 "--magnitude", *[str(m) for _, m in files], "--te", *map(str, acq.te_s),
                 "--b0", str(acq.b0_t), "--mask", str(tmp_path / "mask.nii.gz"),
                 "--out", str(out), "--method", "l2", "--device", "cpu", "--no-preview", *extra])


def test_pre_unwrapped_phase_with_phase_units_rad_gives_the_wrapped_phase_chi(
        tmp_path, capsys, acquisition):
    import torch

    from qsmnet.physics.units import ppm_to_phase

    acq = acquisition
    wrapped = acq.phase.astype(np.float64)
    field = torch.from_numpy(acq.total_field_ppm.astype(np.float64))[None]  # (1, X, Y, Z)
    true_unwrapped = ppm_to_phase(field, acq.te_s, acq.b0_t).numpy()  # (E, X, Y, Z)
    # the integer numbers of turns an unwrapper would have added (any integers would do)
    turns = np.round((true_unwrapped - wrapped) / (2 * math.pi))
    assert np.abs(turns).max() >= 2  # the phase really spans beyond [-pi, pi]
    unwrapped = (wrapped + 2 * math.pi * turns).astype(np.float32)
    assert _predict_phase(tmp_path, acq, unwrapped, tmp_path / "auto") == 2
    line = _error_line(capsys.readouterr().err)
    assert "not in radians" in line and "already unwrapped" in line
    assert "pass --phase-units rad" in line
    # PDF, whose CG stops at its residual test (the bound on chi below is PDF's)
    assert _predict_phase(tmp_path, acq, acq.phase, tmp_path / "wrapped", "--bfr", "pdf") == 0
    assert _predict_phase(tmp_path, acq, unwrapped, tmp_path / "rad", "--phase-units", "rad",
                          "--bfr", "pdf") == 0
    load = lambda run, name: nib.load(tmp_path / run / f"{name}.nii.gz").get_fdata()  # noqa: E731
    mask = load("wrapped", "mask") > 0
    # Wrapping is exact up to the float32 rounding of wrapped + 2*pi*k: half an ulp of |phase|,
    # at most 2**-17 rad (7.6e-6) below 256 rad. If the unwrapping then finds the same integers,
    # the total fields differ by at most that phase over the shortest echo's rad-per-ppm; one
    # integer off in an echo moves it by 2*pi over the longest echo's (0.28 ppm at 28 ms and
    # 3 T) times that echo's weight in the fit, orders of magnitude above this bound.
    assert np.abs(acq.phase).max() <= math.pi and np.abs(unwrapped).max() < 256
    rad_per_ppm = 2 * math.pi * GAMMA_BAR * acq.b0_t * min(acq.te_s)
    total_w, total_u = load("wrapped", "totalfield"), load("rad", "totalfield")
    assert np.abs(total_u - total_w)[mask].max() <= 2 ** -17 / rad_per_ppm
    # chi follows through the same linear steps; PDF's conjugate gradients stop where its
    # residual test says, which a perturbation of this size may move by an iteration: 1e-4 of
    # chi's range bounds that, far below any chi contrast (and any wrong integer's effect).
    chi_w, chi_u = load("wrapped", "chimap"), load("rad", "chimap")
    span = float(np.ptp(chi_w[mask]))
    np.testing.assert_allclose(chi_u[mask], chi_w[mask], rtol=0, atol=1e-4 * span)
