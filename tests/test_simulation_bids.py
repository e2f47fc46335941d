"""The BIDS writer of simulated subjects: names, sidecars, affine, wrapped phase that encodes the
written total field, truths consistent with the forward model, and the wrapper script."""

import importlib.util
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qsmnet.io.errors import QSMInputError
from qsmnet.physics import GAMMA_BAR_MHZ_PER_T, forward_field
from qsmnet.physics.geometry import b0_dir_from_affine
from qsmnet.simulation import write_simulated_subject

SHAPE = (40, 36, 24)
VOXEL = (1.5, 1.5, 2.0)
B0_DIR = (0.2, -0.1, 0.97)
TE = (0.004, 0.011, 0.018)
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clean_subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("bids")
    written = write_simulated_subject(out, subject="07", seed=3, shape=SHAPE, voxel_size_mm=VOXEL,
                                      b0_dir=B0_DIR, b0_t=3.0, te_s=TE, peak_snr=None)
    return out, written


def _load(path):
    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float64)), img.affine


def test_layout_and_sidecars(clean_subject):
    out, written = clean_subject
    anat = out / "sub-07" / "anat"
    for e, te in enumerate(TE, start=1):
        for part in ("mag", "phase"):
            nii = anat / f"sub-07_echo-{e}_part-{part}_MEGRE.nii.gz"
            side = json.loads(nii.with_name(nii.name.replace(".nii.gz", ".json")).read_text())
            assert nii.is_file()
            assert side["EchoTime"] == pytest.approx(te)
            assert side["MagneticFieldStrength"] == 3.0
            assert side["B0_dir"] == pytest.approx(list(np.array(B0_DIR) / np.linalg.norm(B0_DIR)))
    assert written["phase"][0] == anat / "sub-07_echo-1_part-phase_MEGRE.nii.gz"
    deriv = out / "derivatives" / "qsmnet-simulation" / "sub-07" / "anat"
    for suffix in ("Chimap", "mask", "localfield", "totalfield"):
        assert (deriv / f"sub-07_{suffix}.nii.gz").is_file()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["DatasetType"] == "raw"
    ddesc = json.loads((out / "derivatives" / "qsmnet-simulation" / "dataset_description.json").read_text())
    assert ddesc["DatasetType"] == "derivative"
    # Atomic writes leave no temporary files behind.
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_affine_encodes_b0_and_voxel_size(clean_subject):
    _, written = clean_subject
    for path in written["phase"] + written["magnitude"] + [written["chi"], written["mask"]]:
        data, affine = _load(path)
        assert data.shape == SHAPE
        assert b0_dir_from_affine(affine) == pytest.approx(np.array(B0_DIR) / np.linalg.norm(B0_DIR), abs=1e-6)
        assert np.linalg.norm(affine[:3, :3], axis=0) == pytest.approx(VOXEL, abs=1e-6)


def test_phase_wrapped_and_echo_difference_encodes_total_field(clean_subject):
    _, w = clean_subject
    phases = [_load(p)[0] for p in w["phase"]]
    total = _load(w["totalfield"])[0]
    mask = _load(w["mask"])[0] > 0
    assert mask.sum() > 500
    for ph in phases:
        assert ph.min() >= -math.pi - 1e-6 and ph.max() < math.pi
    # Wrapping happened (else this test would not test the modulo).
    assert np.ptp(phases[-1][mask]) > 5.0
    for e in (1, 2):
        dphi = phases[e] - phases[0]
        expected = 2 * math.pi * GAMMA_BAR_MHZ_PER_T * 3.0 * (TE[e] - TE[0]) * total
        resid = np.angle(np.exp(1j * (dphi - expected)))[mask]
        assert np.abs(resid).max() < 1e-3


def test_truths_consistent(clean_subject):
    _, w = clean_subject
    chi, local, total = (_load(w[k])[0] for k in ("chi", "localfield", "totalfield"))
    mask = _load(w["mask"])[0]
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert np.all(chi[mask == 0] == 0) and np.all(local[mask == 0] == 0) and np.all(total[mask == 0] == 0)
    b0 = np.array(B0_DIR) / np.linalg.norm(B0_DIR)
    expected = forward_field(torch.from_numpy(chi), VOXEL, b0).numpy() * mask
    assert np.abs(local - expected).max() < 1e-5 * np.abs(expected).max()
    # Air and bone outside the brain: the background is much larger than the local field.
    assert np.abs(total - local).max() > 3 * np.abs(local).max()


def test_noise_at_peak_snr(tmp_path):
    w = write_simulated_subject(tmp_path, subject="n1", seed=1, shape=(32, 32, 24),
                                voxel_size_mm=(2.0, 2.0, 2.0), te_s=(0.005, 0.010), peak_snr=20.0)
    sim = json.loads(Path(w["simulation_json"]).read_text())
    mag = _load(w["magnitude"][0])[0]
    # The corner of the volume is air: Rayleigh noise with mean sigma * sqrt(pi / 2).
    corner = mag[:4, :4, :4]
    assert corner.mean() == pytest.approx(sim["noise_sigma"] * math.sqrt(math.pi / 2), rel=0.25)
    assert sim["noise_sigma"] == pytest.approx(mag.max() / 20.0, rel=0.3)


def test_same_seed_same_files(tmp_path):
    a = write_simulated_subject(tmp_path / "a", seed=5, shape=(24, 24, 16))
    b = write_simulated_subject(tmp_path / "b", seed=5, shape=(24, 24, 16))
    c = write_simulated_subject(tmp_path / "c", seed=6, shape=(24, 24, 16))
    assert np.array_equal(_load(a["phase"][1])[0], _load(b["phase"][1])[0])
    assert not np.array_equal(_load(a["chi"])[0], _load(c["chi"])[0])


def test_reads_back_with_qsmnet_bids_reader(clean_subject):
    bids = pytest.importorskip("qsmnet.io.bids")
    out, _ = clean_subject
    acqs = bids.read_bids_subject(out, "07")
    assert len(acqs) == 1
    acq = acqs[0]
    assert list(np.asarray(acq.te_s, dtype=float)) == pytest.approx(list(TE))
    assert float(acq.b0_t) == 3.0
    assert np.asarray(acq.b0_dir, dtype=float) == pytest.approx(np.array(B0_DIR) / np.linalg.norm(B0_DIR), abs=1e-6)


@pytest.mark.parametrize("kwargs", [dict(subject="a_b"), dict(shape=(8, 8, 8)),
                                    dict(te_s=(4.0, 12.0)), dict(b0_dir=(0, 0, 0)),
                                    dict(voxel_size_mm=(1, -1, 1)), dict(peak_snr=0)])
def test_bad_arguments_raise_input_error(tmp_path, kwargs):
    with pytest.raises(QSMInputError):
        write_simulated_subject(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_simulate_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("simulate_script", ROOT / "scripts" / "simulate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--out", str(tmp_path), "--subject", "s1", "--shape", "24", "24", "16",
                   "--te", "0.005", "0.01", "--peak-snr", "inf", "--b0-dir", "0", "0.3", "1"])
    assert rc == 0
    assert (tmp_path / "sub-s1" / "anat" / "sub-s1_echo-2_part-phase_MEGRE.nii.gz").is_file()
    assert "sub-s1_Chimap.nii.gz" in capsys.readouterr().out
    assert mod.main(["--out", str(tmp_path / "x"), "--subject", "bad_label"]) == 2
