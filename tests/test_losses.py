"""QSMLoss against independent numpy computations and physical identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qsmnet.losses import QSMLoss
from qsmnet.physics import forward_field


def _np_dipole(shape, vs, b0):
    """D(k) = 1/3 - (k.b)^2/|k|^2, k_i = fftfreq(N_i, d=vs_i), D(0) = 0 (numpy, float64)."""
    b = np.asarray(b0, float) / np.linalg.norm(b0)
    k = np.meshgrid(*[np.fft.fftfreq(n, d=v) for n, v in zip(shape, vs)], indexing="ij")
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    kb = k[0] * b[0] + k[1] * b[1] + k[2] * b[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb ** 2 / k2
    d[k2 == 0] = 0.0
    return d


def _np_forward(chi, vs, b0, pad):
    big = np.pad(chi, pad)
    out = np.real(np.fft.ifftn(_np_dipole(big.shape, vs, b0) * np.fft.fftn(big)))
    return out[pad:pad + chi.shape[0], pad:pad + chi.shape[1], pad:pad + chi.shape[2]]


def _sample(shape=(5, 11, 5), seed=0, vs=(0.8, 1.1, 2.0), b0=(0.2, -0.3, 0.93)):
    # Padded by 2 per side the grid is (9, 15, 9): odd sizes, so the k-space grid has no Nyquist
    # plane and full-FFT numpy and qsmnet's half-spectrum FFT are the same operator even for an
    # oblique B0 (on even grids the oblique kernel is not Hermitian on the Nyquist plane).
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape)
    mask[1:-1, 2:-1, 0:4] = 1
    truth = (rng.normal(size=shape) * 0.1 + 0.05) * mask
    pred = (truth + rng.normal(size=shape) * 0.03) * mask
    field = (_np_forward(truth, vs, b0, 2) + rng.normal(size=shape) * 0.002) * mask
    return truth, pred, field, mask, np.array(vs), np.array(b0)


def _t(a):
    return torch.as_tensor(a, dtype=torch.float64)[None, None]


def test_dc_is_zero_for_truth_and_its_exact_field():
    g = torch.Generator().manual_seed(1)
    shape = (12, 10, 14)
    mask = torch.zeros(2, 1, *shape, dtype=torch.float64)
    mask[..., 2:-2, 2:-2, 3:-3] = 1
    chi = torch.randn(2, 1, *shape, generator=g, dtype=torch.float64) * 0.1 * mask
    vs = torch.tensor([[1.0, 1.0, 1.0], [0.6, 1.3, 2.0]], dtype=torch.float64)
    b0 = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.1, 0.86]], dtype=torch.float64)
    loss = QSMLoss(w_sup=1.0, w_dc=1.0, w_grad=1.0, pad="auto", dc_free_mean=False)
    field = forward_field(chi, vs, b0, pad="auto") * mask
    total, parts = loss(chi, chi, field, mask, vs, b0)
    assert float(parts["dc"]) < 1e-9
    assert float(parts["sup"]) == 0.0 and float(parts["grad"]) == 0.0
    assert float(total) < 1e-9
    # a wrong B0 direction for the second sample gives a clearly non-zero residual
    _, parts_wrong = loss(chi, chi, field, mask, vs, b0.flip(0))
    assert float(parts_wrong["dc"]) > 1e-3


def test_dc_free_mean_ignores_the_unidentifiable_constant():
    shape = (12, 12, 12)
    mask = torch.zeros(1, 1, *shape, dtype=torch.float64)
    mask[..., 3:9, 2:10, 4:8] = 1  # a box: a uniform c*M produces a field inside it
    chi = (torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
           + 0.2) * mask  # mean 0.25 ppm inside the mask
    field = forward_field(chi, (1, 1, 1), (0, 0, 1)) * mask
    referenced = (chi - (chi * mask).sum() / mask.sum()) * mask
    free = QSMLoss(w_dc=1.0, dc_free_mean=True)
    fixed = QSMLoss(w_dc=1.0, dc_free_mean=False)
    _, p_free = free(referenced, chi, field, mask, (1, 1, 1), (0, 0, 1))
    _, p_fixed = fixed(referenced, chi, field, mask, (1, 1, 1), (0, 0, 1))
    assert float(p_free["dc"]) < 1e-9
    assert float(p_fixed["dc"]) > 1e-3
    # and the supervised term compares referenced maps: the constant costs nothing
    assert float(p_free["sup"]) < 1e-12


@pytest.mark.parametrize("sup,dc_norm,free", [("l1", "l2", True), ("l2", "l1", False), ("l1", "l1", True)])
def test_loss_matches_numpy(sup, dc_norm, free):
    truth, pred, field, mask, vs, b0 = _sample()
    w = dict(w_sup=1.3, w_dc=0.7, w_grad=0.2)
    loss = QSMLoss(sup=sup, dc_norm=dc_norm, pad=2, dc_free_mean=free, **w)
    total, parts = loss(_t(pred), _t(truth), _t(field), _t(mask), torch.tensor(vs), torch.tensor(b0))

    m = mask > 0
    dp = pred[m] - pred[m].mean()
    dt = truth[m] - truth[m].mean()
    e = dp - dt
    sup_np = np.mean(np.abs(e)) if sup == "l1" else np.mean(e ** 2)
    r = mask * (_np_forward(pred, vs, b0, 2) - field)
    if free:
        gvec = mask * _np_forward(mask, vs, b0, 2)
        r = r - (r * gvec).sum() / (gvec * gvec).sum() * gvec
    dc_np = math.sqrt(np.mean(r[m] ** 2)) if dc_norm == "l2" else np.mean(np.abs(r[m]))
    num, den = 0.0, 0.0
    for ax in range(3):
        gp = np.diff(pred, axis=ax) / vs[ax]
        gt = np.diff(truth, axis=ax) / vs[ax]
        pm = np.take(mask, range(mask.shape[ax] - 1), axis=ax) * np.take(mask, range(1, mask.shape[ax]), axis=ax)
        num += (np.abs(gp - gt) * pm).sum()
        den += pm.sum()
    grad_np = num / den
    np.testing.assert_allclose(float(parts["sup"]), sup_np, rtol=1e-10)
    np.testing.assert_allclose(float(parts["dc"]), dc_np, rtol=1e-8)
    np.testing.assert_allclose(float(parts["grad"]), grad_np, rtol=1e-10)
    np.testing.assert_allclose(float(total), 1.3 * sup_np + 0.7 * dc_np + 0.2 * grad_np, rtol=1e-8)


def test_per_sample_geometry_in_a_batch():
    """A batch of two samples with different geometry: the pooled DC term equals the per-sample
    terms combined over mask voxels, and each sample uses its own kernel."""
    s1 = _sample(seed=1, vs=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0))
    s2 = _sample(seed=2, vs=(0.6, 1.2, 1.9), b0=(0.6, 0.0, 0.8))
    loss = QSMLoss(w_sup=0.0, w_dc=1.0, w_grad=0.0, pad=2, dc_free_mean=True)
    singles = []
    for truth, pred, field, mask, vs, b0 in (s1, s2):
        _, p = loss(_t(pred), _t(truth), _t(field), _t(mask), torch.tensor(vs), torch.tensor(b0))
        singles.append((float(p["dc"]), mask.sum()))
    batch = [torch.cat([_t(a[i]), _t(b[i])]) for a, b in [(s1, s2)] for i in range(4)]
    vs = torch.tensor(np.stack([s1[4], s2[4]]))
    b0 = torch.tensor(np.stack([s1[5], s2[5]]))
    truth, pred, field, mask = batch
    _, p = loss(pred, truth, field, mask, vs, b0)
    pooled = math.sqrt(sum(d * d * n for d, n in singles) / sum(n for _, n in singles))
    np.testing.assert_allclose(float(p["dc"]), pooled, rtol=1e-8)
    # the same batch with the two geometries exchanged is a different (larger) residual
    _, p_swapped = loss(pred, truth, field, mask, vs.flip(0), b0.flip(0))
    assert float(p_swapped["dc"]) > 1.5 * float(p["dc"])


def test_gradient_term_is_voxel_size_scaled():
    shape = (8, 6, 5)
    i = torch.arange(shape[0], dtype=torch.float64).reshape(-1, 1, 1).expand(shape)
    pred = (0.1 * i)[None, None]  # 0.1 ppm per voxel along x
    truth = torch.zeros_like(pred)
    mask = torch.ones_like(pred)
    loss = QSMLoss(w_sup=0.0, w_dc=0.0, w_grad=1.0)
    _, p = loss(pred, truth, truth, mask, (2.0, 1.0, 1.0), (0, 0, 1))
    # only x differences are non-zero: 0.1 ppm / 2 mm = 0.05 ppm/mm on (7*6*5) of the pairs
    pairs_x, pairs_y, pairs_z = 7 * 6 * 5, 8 * 5 * 5, 8 * 6 * 4
    expected = 0.05 * pairs_x / (pairs_x + pairs_y + pairs_z)
    np.testing.assert_allclose(float(p["grad"]), expected, rtol=1e-12)


def test_zero_weight_terms_are_logged_without_gradient():
    truth, pred, field, mask, vs, b0 = _sample()
    pred_t = _t(pred).requires_grad_(True)
    loss = QSMLoss(w_sup=0.0, w_dc=1.0, w_grad=0.0, pad=2)
    total, parts = loss(pred_t, _t(truth), _t(field), _t(mask), torch.tensor(vs), torch.tensor(b0))
    assert set(parts) == {"sup", "dc", "grad"} and float(parts["sup"]) > 0 and float(parts["grad"]) > 0
    np.testing.assert_allclose(float(total.detach()), float(parts["dc"]), rtol=1e-12)
    total.backward()
    assert pred_t.grad is not None and float(pred_t.grad.abs().sum()) > 0


def test_invalid_arguments():
    with pytest.raises(ValueError):
        QSMLoss(sup="huber")
    with pytest.raises(ValueError):
        QSMLoss(dc_norm="l3")
    with pytest.raises(ValueError):
        QSMLoss(w_sup=0.0, w_dc=0.0, w_grad=0.0)
    with pytest.raises(ValueError):
        QSMLoss(w_dc=-1.0)
