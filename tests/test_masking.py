"""Masks: automatic brain mask of a noisy simulated head, SMV erosion equal to scipy's."""

from __future__ import annotations

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
