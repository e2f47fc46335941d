"""Inputs that used to give a silent wrong answer (issue #20, point 1), through the CLI.

Each is either recognised (and the assumption logged) or refused: exit 2, one
``qsmnet: error: <file>: <problem>`` line naming the flag that overrides, nothing written.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmnet.cli import main
from qsmnet.io import MIN_EXTENT_VOXELS, TE_MAX_S, read_bids_subject, reader_options

SHAPE = (12, 12, 10)
TE = (0.004, 0.008, 0.012)


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("qsmnet: error: ")]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    return lines[0]


def _nothing_under(folder: Path) -> bool:
    return not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


def _head(shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A field (ppm) strong enough to wrap at every echo, and a brain-like mask."""
    x, y, z = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    field = (4.0 * x + 3.0 * y * z + 2.0 * z).astype(np.float32)
    mask = ((x ** 2 + y ** 2 + z ** 2) < 0.6).astype(np.uint8)
    return field, mask


def _wrapped(field: np.ndarray, te: float, b0: float = 3.0) -> np.ndarray:
    phase = 2.0 * math.pi * 42.57747892 * b0 * te * field
    return (np.mod(phase + math.pi, 2.0 * math.pi) - math.pi).astype(np.float32)


def _magnitude(mask: np.ndarray, te_s) -> np.ndarray:
    """(X, Y, Z, E) magnitude: bright head, dark noisy background, T2* decay of 40 ms."""
    rng = np.random.default_rng(0)
    base = np.where(mask > 0, 1.0, 0.02) + 0.01 * rng.random(mask.shape)
    return np.stack([base * math.exp(-te / 0.04) for te in te_s], axis=-1).astype(np.float32)


def _write(path: Path, data, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def _qsmci(folder: Path, stage: str = "field-mapping", shape=SHAPE, te_s=TE) -> dict:
    """A QSM-CI stage folder with wrapped phase filling [-pi, pi) and decaying magnitude."""
    field, mask = _head(shape)
    phase = np.stack([_wrapped(field, te) for te in te_s], axis=-1)
    files = {"phase": phase, "magnitude": _magnitude(mask, te_s), "mask": mask,
             "field": field}
    if stage in ("field-mapping", "end-to-end"):
        _write(folder / "phase.nii.gz", phase)
        _write(folder / "magnitude.nii.gz", files["magnitude"])
    else:
        _write(folder / ("totalfield.nii.gz" if stage == "bfr" else "localfield.nii.gz"),
               0.01 * field)
    _write(folder / "mask.nii.gz", mask)
    (folder / "params.json").write_text(json.dumps(
        {"TE": list(te_s), "B0": 3.0, "B0_dir": [0, 0, 1], "voxel_size": [1, 1, 1]}))
    return files


def _bids(root: Path, shape=SHAPE, te_s=TE, phase=None, magnitude=None) -> dict:
    """A BIDS subject (3-D files per echo) from ``_head``; ``phase``/``magnitude`` (E, ...)."""
    field, mask = _head(shape)
    if phase is None:
        phase = np.stack([_wrapped(field, te) for te in te_s])
    if magnitude is None:
        magnitude = np.moveaxis(_magnitude(mask, te_s), -1, 0)
    anat = root / "sub-01" / "anat"
    for i, te in enumerate(te_s, start=1):
        for part, data in (("phase", phase[i - 1]), ("mag", magnitude[i - 1])):
            stem = anat / f"sub-01_echo-{i}_part-{part}_MEGRE"
            _write(stem.with_name(stem.name + ".nii.gz"), data)
            stem.with_name(stem.name + ".json").write_text(
                json.dumps({"EchoTime": te, "MagneticFieldStrength": 3.0}))
    _write(root / "brain_mask.nii.gz", mask)
    return {"phase": phase, "magnitude": magnitude, "mask": mask}


def _stage(stage, in_dir, out_dir, *extra):
    return main(["run-stage", stage, str(in_dir), str(out_dir), "--method", "tkd",
                 "--device", "cpu", *extra])


# --- phase in degrees ---------------------------------------------------------------------

def test_integer_degrees_are_recognised_exactly(tmp_path, capsys):
    written = _qsmci(tmp_path / "rad")
    degrees = np.round(written["phase"] * (180.0 / math.pi))        # integers in [-180, 180]
    truth = (degrees.astype(np.float64) * (math.pi / 180.0)).astype(np.float32)
    _qsmci(tmp_path / "deg")
    _write(tmp_path / "deg" / "phase.nii.gz", degrees.astype(np.int16))
    _qsmci(tmp_path / "truth")
    _write(tmp_path / "truth" / "phase.nii.gz", truth)

    assert _stage("field-mapping", tmp_path / "deg", tmp_path / "out_deg") == 0
    err = capsys.readouterr().err
    assert "phase.nii.gz: phase values [-180, 180] fill the degree range [-180, 180]" in err
    assert "taken as degrees" in err and "--phase-units overrides" in err
    assert _stage("field-mapping", tmp_path / "truth", tmp_path / "out_truth") == 0
    a = nib.load(str(tmp_path / "out_deg" / "totalfield.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "out_truth" / "totalfield.nii.gz")).get_fdata()
    np.testing.assert_array_equal(a, b)  # same phase in radians, so the same field


def test_float_degrees_read_as_v_pi_over_180(tmp_path, caplog):
    written = _bids(tmp_path / "rad")
    degrees = (written["phase"].astype(np.float64) * (180.0 / math.pi)).astype(np.float32)
    _bids(tmp_path / "deg", phase=degrees)
    with caplog.at_level(logging.INFO, logger="qsmnet"):
        (acq,) = read_bids_subject(tmp_path / "deg", "01", **reader_options())
    np.testing.assert_array_equal(
        acq.phase, (degrees.astype(np.float64) * (math.pi / 180.0)).astype(np.float32))
    np.testing.assert_allclose(acq.phase, written["phase"], atol=1e-6)
    assert "sub-01_echo-1_part-phase_MEGRE.nii.gz (and 2 more echo files): phase values" in \
        caplog.text and "taken as degrees" in caplog.text


def test_phase_units_flag_overrides_and_ambiguous_integers_are_refused(tmp_path, capsys):
    written = _qsmci(tmp_path / "in")
    degrees = np.round(written["phase"] * (180.0 / math.pi)).astype(np.int16)
    _write(tmp_path / "in" / "phase.nii.gz", degrees)
    # forced: the old reading of the same file as 9-bit raw phase
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "o_int", "--phase-units",
                  "int") == 0
    assert "phase taken as integers (--phase-units) in [-256, 255]" in capsys.readouterr().err

    # integers filling 56 % of [-180, 180] and 78 % of [-128, 127]: neither, so refused
    _write(tmp_path / "in" / "phase.nii.gz", np.clip(degrees, -100, 100))
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "o_amb") == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("qsmnet: error: phase.nii.gz: integer phase values span [-100, 100]")
    assert "degrees [-180, 180] (56 %) nor integer raw phase [-128, 127] (78 %)" in line
    assert "pass --phase-units rad, deg, int or mrad" in line
    assert _nothing_under(tmp_path / "o_amb")
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "o_deg", "--phase-units",
                  "deg") == 0
    assert "phase taken as degrees (--phase-units)" in capsys.readouterr().err
    assert (tmp_path / "o_deg" / "totalfield.nii.gz").is_file()


def test_float_phase_in_no_known_unit_names_the_flag(tmp_path, capsys):
    _qsmci(tmp_path / "in")
    _write(tmp_path / "in" / "phase.nii.gz", np.full((*SHAPE, 3), 50.5, np.float32))
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "out") == 2
    line = _error_line(capsys.readouterr().err)
    assert "phase.nii.gz: phase values span [50.5, 50.5], which is not in radians" in line
    assert "--phase-units" in line and _nothing_under(tmp_path / "out")


# --- echoes in reverse order --------------------------------------------------------------

def test_reversed_echoes_are_refused_with_the_figures(tmp_path, capsys):
    written = _bids(tmp_path / "bids")
    _bids(tmp_path / "bids", phase=written["phase"][::-1], magnitude=written["magnitude"][::-1])
    assert main(["predict", "--bids", str(tmp_path / "bids"), "--method", "tkd",
                 "--no-preview"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "sub-01_echo-1_part-mag_MEGRE.nii.gz (and 2 more echo files): magnitude grows " \
           "with echo time" in line
    medians = [float(np.median(m[written["mask"] > 0])) for m in written["magnitude"][::-1]]
    assert ", ".join(f"{m:.4g}" for m in medians) in line   # per-echo figures
    assert "at TE 4, 8, 12 ms" in line and "--no-decay-check" in line
    assert not (tmp_path / "bids" / "derivatives").exists()


def test_no_decay_check_accepts_growing_magnitude(tmp_path, capsys):
    written = _qsmci(tmp_path / "in")
    _write(tmp_path / "in" / "magnitude.nii.gz", written["magnitude"][..., ::-1])
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "o1") == 2
    line = _error_line(capsys.readouterr().err)
    assert "magnitude.nii.gz: magnitude grows with echo time (median over" in line
    assert "mask voxels" in line and _nothing_under(tmp_path / "o1")
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "o2", "--no-decay-check") == 0
    assert (tmp_path / "o2" / "totalfield.nii.gz").is_file()


# --- masks --------------------------------------------------------------------------------

def test_all_ones_mask_refused_where_background_removal_runs(tmp_path, capsys):
    _bids(tmp_path / "bids")
    ones = _write(tmp_path / "ones_mask.nii.gz", np.ones(SHAPE, np.uint8))
    out = tmp_path / "out"
    assert main(["predict", "--bids", str(tmp_path / "bids"), "--mask", str(ones), "--out",
                 str(out), "--method", "tkd", "--no-preview"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"ones_mask.nii.gz: mask covers the whole grid ({np.prod(SHAPE)} voxels" in line
    assert "omit --mask for an automatic one" in line and _nothing_under(out)

    for stage in ("bfr", "end-to-end"):
        _qsmci(tmp_path / stage, stage)
        _write(tmp_path / stage / "mask.nii.gz", np.ones(SHAPE, np.uint8))
        assert _stage(stage, tmp_path / stage, tmp_path / f"o_{stage}") == 2
        line = _error_line(capsys.readouterr().err)
        assert "mask.nii.gz: mask covers the whole grid" in line and "give a brain mask" in line
        assert _nothing_under(tmp_path / f"o_{stage}")
    # no background removal in the dipole stage: an all-ones mask is a valid region there
    _qsmci(tmp_path / "dipole", "dipole")
    _write(tmp_path / "dipole" / "mask.nii.gz", np.ones(SHAPE, np.uint8))
    assert _stage("dipole", tmp_path / "dipole", tmp_path / "o_dipole") == 0


def test_fractional_mask_refused_threshold_flag_binarises(tmp_path, capsys):
    _, mask = _head()
    prob = mask.astype(np.float32) * 0.9
    prob[0, 0, :4] = (0.1, 0.2, 0.3, 0.45)
    _qsmci(tmp_path / "in")
    _write(tmp_path / "in" / "mask.nii.gz", prob)
    n_fractional = int(np.count_nonzero(mask)) + 4
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "o1") == 2
    line = _error_line(capsys.readouterr().err)
    assert f"mask.nii.gz: mask has {n_fractional} voxel(s) with fractional values in " \
           "[0.1, 0.9]" in line and "--mask-threshold T" in line
    assert _nothing_under(tmp_path / "o1")
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "o2", "--mask-threshold",
                  "0.5") == 0
    assert "mask binarised at 0.5 (--mask-threshold)" in capsys.readouterr().err
    field = nib.load(str(tmp_path / "o2" / "totalfield.nii.gz")).get_fdata()
    assert np.all(field[mask == 0] == 0) and np.any(field[mask > 0] != 0)


def test_label_and_0_255_masks_are_accepted(tmp_path, capsys):
    _, mask = _head()
    _qsmci(tmp_path / "in")
    _write(tmp_path / "in" / "mask.nii.gz", (mask * 255).astype(np.uint8))
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "o1") == 0
    assert "mask.nii.gz: mask values 255; every nonzero voxel taken as inside" in \
        capsys.readouterr().err
    labels = (mask * (1 + (np.arange(SHAPE[0]) % 3))[:, None, None]).astype(np.int16)
    _write(tmp_path / "in" / "mask.nii.gz", labels)
    assert _stage("field-mapping", tmp_path / "in", tmp_path / "o2") == 0
    a = nib.load(str(tmp_path / "o1" / "totalfield.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "o2" / "totalfield.nii.gz")).get_fdata()
    np.testing.assert_array_equal(a, b)  # same region


# --- thin volumes -------------------------------------------------------------------------

def test_two_slice_volume_is_refused(tmp_path, capsys):
    _bids(tmp_path / "bids", shape=(16, 16, 2))
    assert main(["predict", "--bids", str(tmp_path / "bids"), "--method", "tkd",
                 "--no-preview"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "sub-01_echo-1_part-phase_MEGRE.nii.gz (and 2 more echo files): volume is only 2 " \
           f"voxel(s) along axis 2 (shape (16, 16, 2)); QSM needs at least {MIN_EXTENT_VOXELS}" \
           in line
    assert not (tmp_path / "bids" / "derivatives").exists()
    _qsmci(tmp_path / "dip", "dipole", shape=(16, 16, 2))
    assert _stage("dipole", tmp_path / "dip", tmp_path / "out") == 2
    assert "localfield.nii.gz: volume is only 2 voxel(s) along axis 2" in \
        _error_line(capsys.readouterr().err)
    assert _nothing_under(tmp_path / "out")


def test_simulate_shape_uses_the_same_minimum(tmp_path, capsys):
    from qsmnet.simulation.config import MIN_SIMULATED_VOXELS

    # one minimum for `simulate`: the simulator's, which predict's readers are below
    assert MIN_SIMULATED_VOXELS >= MIN_EXTENT_VOXELS
    assert main(["simulate", "--out", str(tmp_path / "sim"), "--shape", "16", "16", "12"]) == 2
    assert f"--shape: [16, 16, 12] must have at least {MIN_SIMULATED_VOXELS} voxels per axis" in \
        _error_line(capsys.readouterr().err)
    assert not (tmp_path / "sim").exists()


# --- echo times ---------------------------------------------------------------------------

@pytest.mark.parametrize("te", [0.4, 0.95])
def test_echo_times_past_gradient_echo_range_are_refused(tmp_path, capsys, te):
    assert TE_MAX_S <= 0.2
    _bids(tmp_path / "bids", te_s=(0.2 * te, te))
    assert main(["predict", "--bids", str(tmp_path / "bids"), "--method", "tkd",
                 "--no-preview"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"sub-01_echo-2_part-phase_MEGRE.json: EchoTime {te:g} s is longer than " \
           f"{TE_MAX_S:g} s" in line and "BIDS EchoTime is in seconds" in line
    assert not (tmp_path / "bids" / "derivatives").exists()
    ph = _write(tmp_path / "ph.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    assert main(["predict", "--phase", str(ph), "--magnitude", str(ph), "--te", "0.01",
                 str(te), "--b0", "3", "--out", str(tmp_path / "out")]) == 2
    assert f"--te: EchoTime {te:g} s is longer than" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_placeholder_te_of_field_stages_still_accepted(tmp_path):
    _qsmci(tmp_path / "in", "dipole")
    (tmp_path / "in" / "params.json").write_text(json.dumps({"TE": [1.0], "B0": 3.0}))
    assert _stage("dipole", tmp_path / "in", tmp_path / "out") == 0


# --- the probe table (docs/input_probes.md) stays true --------------------------------------

def _probe_module():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "probe_inputs.py"
    spec = importlib.util.spec_from_file_location("probe_inputs", path)
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules.setdefault("probe_inputs", mod)
    spec.loader.exec_module(mod)
    return sys.modules["probe_inputs"]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """The probe script and a small simulated subject (16^3: the simulator's minimum)."""
    mod = _probe_module()
    return mod, mod.make_base(tmp_path_factory.mktemp("probe_base"), (16, 16, 16))


def test_every_probe_builds_and_parses(probes, tmp_path):
    from qsmnet.cli import build_parser

    mod, base = probes
    names = [p.name for p in mod.PROBES]
    assert len(names) == len(set(names)) and len(names) >= 40
    assert {p.expect for p in mod.PROBES} <= {"refused", "recognised", "accepted"}
    parser = build_parser()
    for probe in mod.PROBES:
        argv = probe.build(base, tmp_path / probe.name)
        args = parser.parse_args(argv)
        assert args.command in ("predict", "run-stage"), probe.name
        if args.command == "predict":
            assert args.method == "tkd" and args.no_preview, probe.name


@pytest.mark.parametrize("name", ["phase-deg-int", "phase-mrad", "echoes-reversed",
                                  "mask-all-ones", "mask-probability", "mask-0-255",
                                  "thin-2-slices", "te-too-long", "b0dir-sidecar-vs-affine",
                                  "stage-bfr-all-ones"])
def test_probe_outcome_as_documented(probes, tmp_path, name):
    mod, base = probes
    (probe,) = [p for p in mod.PROBES if p.name == name]
    result = mod.run_probe(probe, base, tmp_path / name, in_process=True)
    assert result.ok, (result.outcome, result.code, result.message)
    if result.outcome == "refused":
        assert result.code == 2 and result.written == []
    else:
        assert result.code == 0 and result.written


def test_probe_table_lists_every_probe():
    mod = _probe_module()
    table = (Path(__file__).resolve().parent.parent / "docs" / "input_probes.md").read_text()
    assert mod.COMMAND in table
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    assert [r.split(" | ")[1] for r in rows] == [p.name for p in mod.PROBES]
    assert "not as expected" not in table
