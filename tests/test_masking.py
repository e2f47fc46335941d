"""Masks: automatic brain mask of a noisy simulated head, SMV erosion equal to scipy's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from qsmnet.physics.kernels import sphere_mask
from qsmnet.transforms.base import Compose
from qsmnet.transforms.masking import (
    BrainMask,
    SMVErode,
    ellipsoid_structure,
    robust_threshold,
    smv_erode,
)



pytestmark = pytest.mark.usefixtures("single_thread")


def _grid(shape, vs):
    ax = [(np.arange(n) - (n - 1) / 2.0) * h for n, h in zip(shape, vs)]
    return np.meshgrid(*ax, indexing="ij", sparse=True)


def simulated_head(shape=(64, 64, 52), vs=(1.0, 1.0, 1.25), n_echoes=3, noise=0.05, seed=0):
    """Brain ellipsoid (bright, textured, with a darker ventricle), dark skull, bright scalp,
    Rician background noise. Returns (magnitude (E, X, Y, Z) float32, brain mask)."""
    rng = np.random.default_rng(seed)
    x, y, z = _grid(shape, vs)

    def ell(a, b, c):
        return (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2

    brain = ell(22, 26, 21) <= 1
    skull = ell(26, 30, 25) <= 1
    head = ell(29, 31, 28) <= 1
    ventricle = ell(5, 9, 4) <= 1
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    texture /= texture.std()
    m0 = np.where(head, 0.6, 0.0)
    m0 = np.where(skull, 0.05, m0)
    m0 = np.where(brain, 1.0 + 0.08 * texture, m0)
    m0 = np.where(ventricle & brain, 0.5, m0)
    mags = []
    for e in range(n_echoes):
        s = m0 * np.exp(-e * 0.2)
        c = s + noise * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        mags.append(np.abs(c))
    return torch.from_numpy(np.stack(mags).astype(np.float32)), torch.from_numpy(brain)


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# ------------------------------------------------------------------------------------------
# Automatic brain mask
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", ["otsu", "robust"])
@pytest.mark.parametrize("combine", ["rss", "first"])
def test_auto_mask_dice(threshold, combine):
    vs = (1.0, 1.0, 1.25)
    mag, truth = simulated_head(vs=vs)
    mask = BrainMask(threshold=threshold, combine=combine)(mag, None, vs)
    assert mask.dtype == torch.bool and mask.shape == truth.shape
    assert dice(mask, truth) > 0.95
    # One connected component, no holes (the darker ventricle is inside).
    _, n = ndimage.label(mask.numpy())
    assert n == 1
    assert torch.equal(mask, torch.from_numpy(ndimage.binary_fill_holes(mask.numpy())))


def test_user_mask_wins_and_dict_twin():
    vs = (1.0, 1.0, 1.25)
    mag, truth = simulated_head(shape=(40, 40, 32), vs=vs)
    user = torch.zeros_like(truth)
    user[5:10, 5:10, 5:10] = True
    assert torch.equal(BrainMask()(mag, user.to(torch.uint8), vs), user)
    out = Compose([BrainMask()])({"magnitude": mag, "mask": user, "voxel_size_mm": vs})
    assert torch.equal(out["mask"], user)
    out = BrainMask().apply({"magnitude": mag, "voxel_size_mm": vs})
    assert out["mask"].shape == truth.shape
    # Single-image layout and a batch.
    single = BrainMask(multi_echo=False)(mag[0], None, vs)
    assert torch.equal(single, BrainMask(combine="first")(mag, None, vs))
    batch = BrainMask()(torch.stack([mag, mag]), None, vs)
    assert batch.shape == (2, *truth.shape) and torch.equal(batch[0], batch[1])


def _bench():
    """scripts/bench_brain_mask.py as a module (its bridged head phantom and scoring)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_brain_mask.py"
    spec = importlib.util.spec_from_file_location("bench_brain_mask", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bridged_head():
    """The evaluation head phantom (scalp, skull, air sinuses) with eyes on optic nerves and a
    thinned temporal bone (brain-to-scalp bridges), half size, 1x1x2 mm, qsm-forward magnitude
    at 3 T: ``(bench module, phantom, magnitude (E, X, Y, Z), voxel size)``."""
    pytest.importorskip("qsm_forward")
    bench = _bench()
    vs = (1.0, 1.0, 2.0)
    ph = bench.make_heads(vs, seed=0, scale=0.5)["bridged"]
    return bench, ph, bench.magnitude(ph, 3.0, seed=0), vs


def test_auto_mask_of_a_bridged_head_keeps_scalp_and_sinus_out(bridged_head):
    bench, ph, mag, vs = bridged_head
    # Without the separation step the mask runs over the bridges into the scalp (about 50 mL
    # here), so the head does test the bridges.
    leaky = bench.score(BrainMask(separation_mm=0.0)(torch.from_numpy(mag), None, vs).numpy(), ph)
    assert leaky["false_positive_ml"]["scalp"] > 10.0
    mask = BrainMask()(torch.from_numpy(mag), None, vs).numpy()
    got = bench.score(mask, ph)
    # Scalp and sinus: what is left is the stub of the cut optic nerves (separation_mm plus a
    # voxel) and partial voxels, well under 1 mL and 0.05 mL.
    assert got["false_positive_ml"]["scalp"] < 1.0
    assert got["false_positive_ml"]["sinus_air"] < 0.05
    # Against the intracranial space (brain plus the CSF rim, as bright as brain) the mask is
    # near exact; against the brain alone the CSF rim (about 8 % of the union) bounds the Dice.
    assert got["dice_intracranial"] > 0.99
    assert got["dice"] > 0.91
    assert got["missed_brain_ml"] < 0.5
    assert ndimage.label(mask)[1] == 1


@pytest.mark.slow
def test_auto_mask_against_peer_bet(bridged_head):
    """brainextractor (FSL BET in Python) on the same head: the two masks agree, and ours is the
    closer to the intracranial space (BET's surface also takes in the inner skull)."""
    pytest.importorskip("brainextractor")
    bench, ph, mag, vs = bridged_head
    peer = bench.peer_bet(mag, vs)
    ours = BrainMask()(torch.from_numpy(mag), None, vs).numpy()
    # Agreement is limited by BET's few mm of skull on the outside of the CSF rim.
    assert bench.dice(ours, peer) > 0.92
    assert bench.score(ours, ph)["dice_intracranial"] > bench.score(peer, ph)["dice_intracranial"]
    assert bench.score(peer, ph)["false_positive_ml"]["scalp"] < 5.0


def test_separation_falls_back_on_thin_objects():
    """An object thinner than twice separation_mm has no core: the plain largest component."""
    img = np.zeros((30, 30, 30), np.float32)
    img[5:25, 5:25, 12:17] = 1.0   # a 5-voxel slab: the separation core (depth > 4 mm) is empty
    img[2:4, 2:4, 2:4] = 1.0       # a smaller, separate blob
    kw = {"multi_echo": False, "opening_mm": 0.0, "closing_mm": 0.0}  # no rounding of edges
    sep = BrainMask(**kw)(torch.from_numpy(img), None)
    expected = img > 0.5
    expected[2:4, 2:4, 2:4] = False
    assert torch.equal(sep, torch.from_numpy(expected))


def test_reconstruct_uses_the_given_mask_not_the_automatic_one():
    """reconstruct: a given mask is the mask (and the one chi is reported on), whatever the
    magnitude suggests; without one the automatic mask is used."""
    from qsmnet.inference.options import ReconOptions
    from qsmnet.inference.pipeline import reconstruct

    shape, vs = (32, 32, 32), (1.0, 1.0, 1.0)
    x, y, z = _grid(shape, vs)
    ball = (x * x + y * y + z * z) <= 12.0 ** 2
    mag = np.stack([ball * np.exp(-0.1 * e) for e in range(3)]).astype(np.float32)
    user = np.zeros(shape, bool)
    user[6:20, 8:22, 10:24] = True
    sample = {"phase": np.zeros_like(mag), "magnitude": mag, "te_s": (0.004, 0.008, 0.012),
              "b0_t": 3.0, "voxel_size_mm": vs, "b0_dir": (0.0, 0.0, 1.0), "mask": user}
    ident = lambda f, *a: f  # noqa: E731
    given = reconstruct(sample, ReconOptions(bfr="vsharp"), inverter=ident)
    assert torch.equal(given.mask, torch.from_numpy(user)) and given.params["mask"] == "given"
    assert not bool(given.chi_mask[~torch.from_numpy(user)].any())
    auto = reconstruct({**sample, "mask": None}, ReconOptions(bfr="vsharp"), inverter=ident)
    assert torch.equal(auto.mask, BrainMask()(torch.from_numpy(mag), None, vs))
    assert auto.params["mask"].startswith("automatic")


def test_robust_threshold_between_noise_and_tissue():
    rng = np.random.default_rng(0)
    bg = np.abs(0.05 * (rng.standard_normal(50_000) + 1j * rng.standard_normal(50_000)))
    tissue = 1.0 + 0.05 * rng.standard_normal(20_000)
    t = robust_threshold(np.concatenate([bg, tissue]))
    assert bg.mean() * 2 < t < 0.5


# ------------------------------------------------------------------------------------------
# SMV erosion
# ------------------------------------------------------------------------------------------

def test_ellipsoid_structure_is_the_smv_sphere():
    """Same voxel rule as qsmnet.physics.kernels.sphere_mask (centred instead of at 0)."""
    vs = (1.0, 1.3, 2.0)
    st = ellipsoid_structure(3.5, vs)
    shape = (16, 16, 16)
    sph = sphere_mask(shape, vs, 3.5).numpy()
    centred = np.fft.fftshift(sph)
    c = [n // 2 for n in shape]
    h = [s // 2 for s in st.shape]
    crop = centred[c[0] - h[0]:c[0] + h[0] + 1, c[1] - h[1]:c[1] + h[1] + 1,
                   c[2] - h[2]:c[2] + h[2] + 1]
    assert np.array_equal(crop, st) and crop.sum() == sph.sum()


@pytest.mark.parametrize("radius_mm,vs", [(1.0, (1.0, 1.0, 1.0)), (2.0, (1.0, 1.0, 1.0)),
                                          (3.5, (1.0, 1.3, 2.0)), (5.0, (0.8, 0.8, 2.5))])
def test_smv_erode_matches_scipy_exactly(radius_mm, vs):
    rng = np.random.default_rng(int(radius_mm * 10))
    shape = (48, 44, 30)
    blob = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0) > -0.05
    blob[:2] = True  # touches the array border: outside counts as outside the mask
    ref = ndimage.binary_erosion(blob, structure=ellipsoid_structure(radius_mm, vs),
                                 border_value=0)
    got = smv_erode(torch.from_numpy(blob), radius_mm, vs)
    assert got.dtype == torch.bool
    assert np.array_equal(got.numpy(), ref), int((got.numpy() != ref).sum())
    assert 0 < ref.sum() < blob.sum()


def test_smv_erode_transform_batch_and_dict_twin():
    vs = (1.0, 1.0, 1.25)
    _, truth = simulated_head(shape=(40, 40, 32), vs=vs)
    t = SMVErode(radius_mm=2.0)
    batch = t(torch.stack([truth, ~truth]), vs)
    for i, m in enumerate((truth, ~truth)):
        ref = ndimage.binary_erosion(m.numpy(), ellipsoid_structure(t.radius_mm, vs))
        assert np.array_equal(batch[i].numpy(), ref)
    out = t.apply({"mask": truth, "voxel_size_mm": vs})
    assert torch.equal(out["mask"], batch[0])
