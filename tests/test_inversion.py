"""Dipole inversions against independent truths.

TKD and closed-form L2 are checked against a direct numpy computation (np.fft, kernels built
here from their formulas) on the same padded grid; TV-ADMM against L2 on a piecewise-constant
phantom, against the least-squares solution as lambda -> 0, and with data weights. Volumes are
at most 64^3.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from qsmnet.physics import divergence, forward_field, gradient, laplacian_eigenvalues
from qsmnet.physics.operators import gradient_adjoint_into, gradient_into
from qsmnet.transforms import TKD, TVADMM, ClosedFormL2, closed_form_l2, tkd, tv_admm
from qsmnet.transforms.inversion import (
    DEFAULT_INVERSION_PAD,
    reference_to_mask_mean,
)


pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------
# numpy references (independent of qsmnet.physics)
# ---------------------------------------------------------------------------------------------


def _np_dipole(shape, vs, b0):
    k = np.meshgrid(*[np.fft.fftfreq(n, d=h) for n, h in zip(shape, vs)], indexing="ij")
    b = np.asarray(b0, dtype=np.float64) / np.linalg.norm(b0)
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    kb = k[0] * b[0] + k[1] * b[1] + k[2] * b[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb ** 2 / k2
    d[0, 0, 0] = 0.0
    return d


def _np_grad_spectrum(shape, vs):
    """|E|^2 of the periodic forward-difference gradient: sum (2 - 2 cos(2 pi n / N)) / h^2."""
    out = np.zeros(shape)
    for axis, (n, h) in enumerate(zip(shape, vs)):
        e = (2.0 - 2.0 * np.cos(2.0 * np.pi * np.arange(n) / n)) / h ** 2
        view = [1, 1, 1]
        view[axis] = n
        out = out + e.reshape(view)
    return out


def _np_reference(field, mask, vs, b0, pad, filt):
    """Crop to the mask bbox, zero pad by ``pad`` per side, filter with np.fft, reference."""
    idx = np.nonzero(mask)
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop = (field * mask)[sl]
    padded = np.pad(crop, pad)
    d = _np_dipole(padded.shape, vs, b0)
    chi_p = np.real(np.fft.ifftn(np.fft.fftn(padded) * filt(d, padded.shape)))
    chi = np.zeros_like(field)
    chi[sl] = chi_p[pad:-pad, pad:-pad, pad:-pad]
    chi = np.where(mask, chi - chi[mask].mean(), 0.0)
    return chi


def _np_tkd_filter(threshold):
    def filt(d, _shape):
        # sign(0) = +1, with |D| <= 1e-6 counted as 0 (the documented convention).
        sign = np.where(d > -1e-6, 1.0, -1.0)
        return np.where(np.abs(d) > threshold, 1.0 / np.where(d == 0, 1.0, d), sign / threshold)
    return filt


def _np_l2_filter(alpha, vs):
    def filt(d, shape):
        den = d ** 2 + alpha * _np_grad_spectrum(shape, vs)
        return np.where(den > 0, d / np.where(den > 0, den, 1.0), 0.0)
    return filt


def _ellipsoid(shape, centre, semi, vs=(1.0, 1.0, 1.0)):
    g = np.meshgrid(*[(np.arange(n) - c) * v for n, c, v in zip(shape, centre, vs)],
                    indexing="ij")
    return sum((gi / a) ** 2 for gi, a in zip(g, semi)) <= 1.0


def _ball_mask(width, shape, offset):
    """A ball whose bounding box is exactly ``width`` voxels wide."""
    c = [o + (width - 1) / 2 for o in offset]
    m = _ellipsoid(shape, c, ((width - 1) / 2 + 0.4,) * 3)
    idx = np.nonzero(m)
    assert all(int(i.max()) - int(i.min()) + 1 == width for i in idx)
    return m


def _sphere_mask_bbox51(shape=(56, 58, 60), offset=(2, 4, 6)):
    """Bounding box 51 wide: 51 + 2 * 12 = 75 = 3 * 5^2 is already FFT-fast, and odd, so there is
    no Nyquist bin whose sign convention (fftfreq's -1/2 vs rfftfreq's +1/2) would matter for an
    oblique kernel."""
    return _ball_mask(51, shape, offset)


@functools.lru_cache(maxsize=4)
def _piecewise_phantom(shape=(52, 56, 48), vs=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0),
                       noise=0.002):
    """Piecewise-constant chi (ppm) in a brain-like mask; noisy local field from the forward
    model (auto padding, so not the inversions' grid)."""
    c = [(n - 1) / 2 for n in shape]
    mask = _ellipsoid(shape, c, (22, 24, 20), vs)
    chi = np.where(_ellipsoid(shape, c, (17, 19, 15), vs), -0.03, 0.02)
    for centre, semi, val in [((c[0] - 8, c[1] + 3, c[2]), (4, 7, 4), 0.12),
                              ((c[0] + 8, c[1] + 3, c[2]), (4, 7, 4), 0.10),
                              ((c[0], c[1] - 10, c[2] + 5), (3, 3, 3), 0.25),
                              ((c[0] + 2, c[1] + 9, c[2] - 6), (6, 4, 3), -0.06),
                              ((c[0] - 3, c[1], c[2] + 9), (2, 14, 2), 0.4)]:
        chi = np.where(_ellipsoid(shape, centre, semi, vs), val, chi)
    chi = np.where(mask, chi - chi[mask].mean(), 0.0)
    field = forward_field(torch.tensor(chi), vs, b0).numpy()
    rng = np.random.default_rng(7)
    field = (field + noise * rng.standard_normal(shape)) * mask
    for a in (mask, chi, field):
        a.setflags(write=False)
    return mask, chi, field


def _nrmse(est, truth, mask):
    e = est[mask] - est[mask].mean()
    t = truth[mask] - truth[mask].mean()
    return float(np.linalg.norm(e - t) / np.linalg.norm(t))


# ---------------------------------------------------------------------------------------------
# TKD and closed-form L2 against numpy
# ---------------------------------------------------------------------------------------------

GEOMETRIES = [((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)),
              ((0.9, 1.1, 1.6), (0.25, -0.3, 0.92))]


def test_even_grid_axial_matches_numpy():
    """Even padded grid (40 + 24 = 64): exact too when B0 is along an axis (no Nyquist ambiguity
    without cross terms)."""
    mask = _ball_mask(40, (48, 52, 50), (3, 7, 5))
    field = np.random.default_rng(2).standard_normal(mask.shape) * 0.05
    vs, b0 = (1.0, 1.2, 1.5), (0.0, 0.0, 1.0)
    ref = _np_reference(field, mask, vs, b0, 12, _np_tkd_filter(0.15))
    out = tkd(torch.tensor(field), torch.tensor(mask), vs, b0, pad=12)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("vs, b0", GEOMETRIES)
@pytest.mark.parametrize("threshold", [0.1, 0.15, 0.25])
def test_tkd_matches_numpy(vs, b0, threshold):
    mask = _sphere_mask_bbox51()
    rng = np.random.default_rng(0)
    field = rng.standard_normal(mask.shape) * 0.05
    ref = _np_reference(field, mask, vs, b0, 12, _np_tkd_filter(threshold))
    out = tkd(torch.tensor(field), torch.tensor(mask), vs, b0, threshold=threshold, pad=12)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    out32 = tkd(torch.tensor(field, dtype=torch.float32), torch.tensor(mask), vs, b0,
                threshold=threshold, pad=12)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("vs, b0", GEOMETRIES)
@pytest.mark.parametrize("alpha", [0.0, 0.02, 0.1])
def test_closed_form_l2_matches_numpy(vs, b0, alpha):
    mask = _sphere_mask_bbox51()
    rng = np.random.default_rng(1)
    field = rng.standard_normal(mask.shape) * 0.05
    ref = _np_reference(field, mask, vs, b0, 12, _np_l2_filter(alpha, vs))
    out = closed_form_l2(torch.tensor(field), torch.tensor(mask), vs, b0, alpha=alpha, pad=12)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-9 * np.abs(ref).max())


@pytest.mark.parametrize("b0", [(0.0, 0.0, 1.0), (0.25, -0.3, 0.92)])
def test_default_pad_keeps_the_dipole_wrap_around_small(b0):
    """What the default pad is for: on the inversions' grid (mask box + DEFAULT_INVERSION_PAD per
    side) the periodic images of the dipole field change the field in the mask by under 1 % of
    its norm (a 96-voxel pad is the reference), far below any inversion's error against the
    truth; without padding it is over 3 %."""
    mask, chi, _ = _piecewise_phantom()
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    c, m = torch.tensor(chi[box]), mask[box]

    def rel_wrap(pad):
        ref = forward_field(c, (1.0, 1.0, 1.0), b0, pad=96).numpy()
        out = forward_field(c, (1.0, 1.0, 1.0), b0, pad=pad).numpy()
        return np.linalg.norm((out - ref)[m]) / np.linalg.norm(ref[m])

    assert rel_wrap(DEFAULT_INVERSION_PAD) < 0.01
    assert rel_wrap(0) > 0.03


def test_default_pad_and_transforms():
    mask, _, field = _piecewise_phantom()
    f, m = torch.tensor(field, dtype=torch.float32), torch.tensor(mask)
    sample = {"local_field_ppm": f, "mask": m, "voxel_size_mm": (1.0, 1.0, 1.0),
              "b0_dir": (0.0, 0.0, 1.0)}
    assert torch.equal(TKD().apply(sample)["chi_ppm"], tkd(f, m))
    assert torch.equal(ClosedFormL2(alpha=0.05).apply(sample)["chi_ppm"],
                       closed_form_l2(f, m, alpha=0.05))
    tv = TVADMM(max_iter=5).apply(sample)["chi_ppm"]
    assert torch.equal(tv, tv_admm(f, m, max_iter=5))
    assert TVADMM(weights_key="magnitude").input_keys["weights"] == "magnitude"


def test_direct_inversions_are_differentiable_and_linear():
    mask = torch.tensor(_ball_mask(30, shape=(34, 36, 38), offset=(1, 2, 3)))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(mask.shape, dtype=torch.float64, generator=gen).requires_grad_(True)
    y = torch.randn(mask.shape, dtype=torch.float64, generator=gen)
    for fn in (lambda a: tkd(a, mask, (1, 1, 2), (0.1, 0.2, 0.97)),
               lambda a: closed_form_l2(a, mask, (1, 1, 2), (0.1, 0.2, 0.97))):
        (grad,) = torch.autograd.grad((fn(x) * y).sum(), x)
        # Linear operator: <T x, y> = <x, T^T y> with T^T y from autograd.
        lhs = float((fn(x.detach()) * y).sum())
        rhs = float((x.detach() * grad).sum())
        assert math.isclose(lhs, rhs, rel_tol=1e-9)


# ---------------------------------------------------------------------------------------------
# TV-ADMM
# ---------------------------------------------------------------------------------------------

def test_gradient_helpers_match_operators_and_spectrum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 10, 11, dtype=torch.float64, generator=gen)
    g = torch.randn(3, 9, 10, 11, dtype=torch.float64, generator=gen)
    vs = (0.8, 1.0, 1.7)
    inv_h = [1 / h for h in vs]
    out = torch.empty_like(g)
    torch.testing.assert_close(gradient_into(x, out, inv_h), gradient(x, vs))
    adj = gradient_adjoint_into(g, torch.empty_like(x), inv_h, torch.empty_like(x))
    torch.testing.assert_close(adj, -divergence(g, vs))
    # grad^T grad has the spectrum -laplacian_eigenvalues (what the x-update divides by).
    gtg = gradient_adjoint_into(gradient_into(x, out, inv_h), torch.empty_like(x), inv_h,
                             torch.empty_like(x))
    spec = torch.fft.ifftn(torch.fft.fftn(x) * -laplacian_eigenvalues(
        x.shape, vs, dtype=torch.float64)).real
    torch.testing.assert_close(gtg, spec)


def test_tv_beats_l2_on_piecewise_constant_phantom():
    mask, chi, field = _piecewise_phantom()
    f, m = torch.tensor(field, dtype=torch.float32), torch.tensor(mask)
    e_l2 = _nrmse(closed_form_l2(f, m).numpy(), chi, mask)
    e_tkd = _nrmse(tkd(f, m).numpy(), chi, mask)
    e_tv = _nrmse(tv_admm(f, m).numpy(), chi, mask)
    # Measured (defaults): L2 0.432, TKD 0.345, TV 0.084.
    assert e_tv < 0.5 * e_l2
    assert e_tv < e_tkd


def test_tv_lambda_to_zero_is_least_squares_on_well_conditioned_part():
    """With lambda -> 0 the ADMM fixed point solves D chi = f where D != 0: compare with the
    pseudo-inverse (closed-form L2 with alpha = 0) on |D| > 0.2, on the same periodic grid."""
    shape, vs, b0 = (31, 35, 29), (1.0, 1.0, 1.5), (0.2, 0.1, 0.97)  # odd: no Nyquist bin
    rng = np.random.default_rng(5)
    chi = torch.tensor(rng.standard_normal(shape) * 0.1)
    f = forward_field(chi, vs, b0, pad=None)
    pinv = closed_form_l2(f, None, vs, b0, alpha=0.0, pad=None)
    tv = tv_admm(f, None, vs, b0, lam=1e-9, rho=1e-3, max_iter=60, tol=0.0, pad=None)
    d = _np_dipole(shape, vs, b0)
    keep = np.abs(d) > 0.2
    a = np.fft.fftn(pinv.numpy())[keep]
    b = np.fft.fftn(tv.numpy())[keep]
    assert np.linalg.norm(a - b) < 1e-4 * np.linalg.norm(a)
    # and both recover chi there (the field is exact on this grid).
    c = np.fft.fftn(chi.numpy())[keep]
    assert np.linalg.norm(a - c) < 1e-8 * np.linalg.norm(c)


def test_tv_weights_ignore_corrupted_voxels():
    mask, chi, field = _piecewise_phantom()
    bad = _ellipsoid(mask.shape, (30, 20, 30), (4, 4, 4)) & mask
    corrupted = np.where(bad, field + 0.3, field)
    f, m = torch.tensor(corrupted, dtype=torch.float32), torch.tensor(mask)
    w = torch.tensor(np.where(bad, 0.0, 1.0), dtype=torch.float32)
    good = mask & ~_ellipsoid(mask.shape, (30, 20, 30), (8, 8, 8))
    # Measured at 50 iterations (default lambdas): unweighted 1.39, weighted 0.203.
    e_plain = _nrmse(tv_admm(f, m, max_iter=50).numpy(), chi, good)
    e_w = _nrmse(tv_admm(f, m, weights=w, max_iter=50).numpy(), chi, good)
    assert e_w < 0.25 * e_plain
    # Per-echo magnitudes (E, X, Y, Z) are combined by RMS: identical echoes = the same weights.
    e_w4 = tv_admm(f, m, weights=torch.stack([w, w]), max_iter=10)
    torch.testing.assert_close(e_w4, tv_admm(f, m, weights=w, max_iter=10))


# ---------------------------------------------------------------------------------------------
# Shared properties
# ---------------------------------------------------------------------------------------------

METHODS = {"tkd": lambda *a: tkd(*a), "l2": lambda *a: closed_form_l2(*a),
           "tv": lambda *a: tv_admm(*a, max_iter=15)}


@pytest.mark.parametrize("method", list(METHODS))
def test_referenced_to_zero_mean_in_mask(method):
    mask, _, field = _piecewise_phantom()
    chi = METHODS[method](torch.tensor(field, dtype=torch.float32), torch.tensor(mask),
                          (1.0, 1.0, 1.0), (0.0, 0.0, 1.0)).numpy()
    assert abs(chi[mask].mean()) < 1e-6 * np.abs(chi).max()
    assert np.all(chi[~mask] == 0)


@pytest.mark.parametrize("method", list(METHODS))
def test_batched_per_sample_geometry_equals_single_calls(method):
    shape = (36, 40, 32)
    vs = torch.tensor([[1.0, 1.0, 1.0], [0.9, 1.0, 1.4]])
    b0 = torch.tensor([[0.0, 0.0, 1.0], [0.3, -0.2, 0.93]])
    fields, masks = [], []
    for i in range(2):
        m, _, f = _piecewise_phantom(shape, tuple(vs[i].tolist()), tuple(b0[i].tolist()))
        fields.append(torch.tensor(f, dtype=torch.float32))
        masks.append(torch.tensor(m))
    f, m = torch.stack(fields), torch.stack(masks)
    out = METHODS[method](f, m, vs, b0)
    for i in range(2):
        torch.testing.assert_close(out[i], METHODS[method](fields[i], masks[i], vs[i], b0[i]),
                                   rtol=0, atol=1e-6)
    # A channel axis (B, 1, X, Y, Z) with a (B, X, Y, Z) mask works too.
    out_c = METHODS[method](f[:, None], m, vs, b0)
    torch.testing.assert_close(out_c[:, 0], out, rtol=0, atol=1e-6)


def test_reference_to_mask_mean_per_sample():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4, 4)
    m = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    m[0, :2] = True
    m[1, 2:] = True
    out = reference_to_mask_mean(x, m)
    for i in range(2):
        assert abs(float(out[i][m[i]].mean())) < 1e-12
        assert torch.all(out[i][~m[i]] == 0)


def test_input_errors():
    f = torch.zeros(12, 12, 12)
    with pytest.raises(ValueError, match="empty"):
        tkd(f, torch.zeros(12, 12, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="threshold"):
        tkd(f, threshold=0.0)
    with pytest.raises(ValueError, match="voxel_size"):
        closed_form_l2(f, None, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="rows"):
        tv_admm(f, None, torch.ones(2, 3))
    with pytest.raises(ValueError, match="rho"):
        tv_admm(f, None, lam=0.0)
