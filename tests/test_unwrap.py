"""Laplacian phase unwrapping: exact on known wraps, agrees with scikit-image, keeps slopes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from qsmnet.physics.operators import laplacian
from qsmnet.physics.units import wrap_phase
from qsmnet.transforms import unwrap as U
from qsmnet.transforms.base import Compose
from qsmnet.transforms.unwrap import (
    LaplacianUnwrap,
    dct_poisson_solve,
    integer_unwrap_correction,
    unwrap_laplacian,
    wrapped_laplacian,
)

TWO_PI = 2.0 * math.pi


pytestmark = pytest.mark.usefixtures("single_thread")


def _grid(shape, vs, dtype=torch.float64):
    ax = [(torch.arange(n, dtype=dtype) - (n - 1) / 2.0) * h for n, h in zip(shape, vs)]
    return torch.meshgrid(*ax, indexing="ij")


def smooth_phase(shape=(40, 36, 30), vs=(1.0, 1.2, 1.5), dtype=torch.float64):
    """Quadratic + dipole-like phase with many wraps; neighbour differences stay below pi."""
    x, y, z = _grid(shape, vs, dtype)
    r2 = (x - 3) ** 2 + (y + 2) ** 2 + (z - 2) ** 2 + 25.0
    dipole = 400.0 * (3 * (z - 2) ** 2 - r2) / r2 ** 2.5
    return 0.035 * x ** 2 + 0.02 * y ** 2 - 0.03 * z ** 2 + 0.6 * x + 0.4 * z + dipole


def ellipsoid(shape, vs, semi):
    x, y, z = _grid(shape, vs)
    return (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0


def max_neighbour_diff(phi: torch.Tensor) -> float:
    return max(float(torch.diff(phi, dim=d).abs().max()) for d in (-3, -2, -1))


def global_offset_ok(result, truth, mask, frac=1.0, atol=1e-6):
    """``result == truth + 2 pi n`` (one global n) on at least ``frac`` of the mask."""
    d = (result - truth)[mask]
    n = torch.round(d / TWO_PI)
    n0 = torch.mode(n).values
    exact = (d - TWO_PI * n0).abs() <= atol
    assert float(exact.double().mean()) >= frac, float(exact.double().mean())
    return n0


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 15, 16])
def test_torch_dct_matches_scipy(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    for dim in (-1, -3):
        ref = scipy.fft.dct(x.numpy(), type=2, axis=dim)
        got = U._dct_ii(x, dim)
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)
        np.testing.assert_allclose(U._idct_ii(got, dim).numpy(), x.numpy(), atol=1e-12)


@pytest.mark.parametrize("scipy_path", [True, False])
def test_dct_poisson_solve_inverts_neumann_laplacian(monkeypatch, scipy_path):
    monkeypatch.setattr(U, "_SCIPY_DCT_ON_CPU", scipy_path)
    vs = (1.0, 1.3, 2.0)
    u = torch.randn(2, 12, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = u - u.mean(dim=(-3, -2, -1), keepdim=True)
    # Neumann 7-point Laplacian written out independently: mirror-pad by one voxel.
    p = torch.nn.functional.pad(u, (1, 1, 1, 1, 1, 1), mode="replicate")
    core = p[..., 1:-1, 1:-1, 1:-1]
    lap = ((p[..., 2:, 1:-1, 1:-1] - 2 * core + p[..., :-2, 1:-1, 1:-1]) / vs[0] ** 2
           + (p[..., 1:-1, 2:, 1:-1] - 2 * core + p[..., 1:-1, :-2, 1:-1]) / vs[1] ** 2
           + (p[..., 1:-1, 1:-1, 2:] - 2 * core + p[..., 1:-1, 1:-1, :-2]) / vs[2] ** 2)
    got = dct_poisson_solve(lap, vs)
    torch.testing.assert_close(got, u, atol=1e-10, rtol=0)


def test_wrapped_laplacian_periodic_equals_physics_laplacian():
    """Without wraps the wrapped-difference Laplacian is the physics operator (same scaling)."""
    vs = (1.0, 1.2, 2.0)
    x, y, z = _grid((10, 11, 12), vs)
    phi = 0.3 * torch.sin(2 * math.pi * x / 10) + 0.2 * torch.cos(2 * math.pi * z / 24)
    torch.testing.assert_close(wrapped_laplacian(phi, vs, periodic=True), laplacian(phi, vs))
    # Wrapping the input changes nothing (differences are below pi).
    torch.testing.assert_close(wrapped_laplacian(wrap_phase(phi + 5.0), vs, periodic=True),
                               laplacian(phi, vs), atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------
# Known wraps
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_known_wraps_no_mask_exact(dtype):
    vs = (1.0, 1.2, 1.5)
    truth = smooth_phase(vs=vs)
    assert max_neighbour_diff(truth) < math.pi
    assert float(truth.max() - truth.min()) > 9 * TWO_PI  # many wraps
    got = unwrap_laplacian(wrap_phase(truth).to(dtype), None, vs)
    assert got.dtype == dtype
    global_offset_ok(got.double(), truth, torch.ones_like(truth, dtype=torch.bool),
                     atol=1e-4 if dtype == torch.float32 else 1e-9)


def test_known_wraps_masked_exact_and_outside_untouched():
    vs = (1.0, 1.2, 1.5)
    shape = (40, 36, 30)
    truth = smooth_phase(shape, vs)
    mask = ellipsoid(shape, vs, (17.0, 19.0, 20.0))
    psi = wrap_phase(truth)
    got = unwrap_laplacian(psi, mask, vs)
    global_offset_ok(got, truth, mask, frac=0.999, atol=1e-9)
    torch.testing.assert_close(got[~mask], psi[~mask])
    # The global multiple puts the mask mean within [-pi, pi).
    assert -math.pi <= float(got[mask].mean()) < math.pi


def test_known_wraps_two_components_each_exact():
    vs = (1.0, 1.0, 1.0)
    shape = (40, 24, 24)
    truth = smooth_phase(shape, vs)
    x, _, _ = _grid(shape, vs)
    mask = ellipsoid(shape, vs, (19.0, 11.0, 11.0)) & (x.abs() > 3)
    got = unwrap_laplacian(wrap_phase(truth), mask, vs)
    for side in (x < 0, x > 0):
        global_offset_ok(got, truth, mask & side, atol=1e-9)


def test_batch_matches_individual_calls():
    vs = (1.0, 1.0, 1.0)
    shape = (24, 20, 16)
    t1 = smooth_phase(shape, vs)
    t2 = -0.7 * t1 + 3.0
    m1 = ellipsoid(shape, vs, (10, 9, 7))
    m2 = ellipsoid(shape, vs, (11, 8, 7.5))
    batch = unwrap_laplacian(wrap_phase(torch.stack([t1, t2])), torch.stack([m1, m2]), vs,
                             max_iter=50, tol=1e-8)
    for i, (t, m) in enumerate(((t1, m1), (t2, m2))):
        single = unwrap_laplacian(wrap_phase(t), m, vs, max_iter=50, tol=1e-8)
        torch.testing.assert_close(batch[i], single)
        global_offset_ok(batch[i], t, m, atol=1e-9)


def test_fft_method_on_periodic_phase():
    shape = (32, 24, 16)
    i, j, k = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape],
                             indexing="ij")
    truth = (9.0 * torch.sin(2 * math.pi * i / 32) + 6.0 * torch.cos(2 * math.pi * j / 24)
             + 3.0 * torch.sin(4 * math.pi * k / 16))
    assert max_neighbour_diff(truth) < math.pi
    got = unwrap_laplacian(wrap_phase(truth), None, (1, 1, 1), method="fft")
    global_offset_ok(got, truth, torch.ones(shape, dtype=torch.bool), atol=1e-9)
    with pytest.raises(ValueError, match="mask"):
        unwrap_laplacian(wrap_phase(truth), truth > 0, (1, 1, 1), method="fft")


# ------------------------------------------------------------------------------------------
# Slope (reference section 3.1: the sin/cos form gives 0.744 at g = 1.5)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("integer_correction", [True, False])
def test_steep_ramp_slope_is_one(masked, integer_correction):
    g = 1.5  # rad / voxel
    shape = (48, 12, 10)
    i = torch.arange(shape[0], dtype=torch.float64).reshape(-1, 1, 1).expand(shape)
    truth = g * i
    mask = ellipsoid(shape, (1, 1, 1), (22.0, 5.5, 4.5)) if masked else None
    got = unwrap_laplacian(wrap_phase(truth), mask, (1, 1, 1),
                           integer_correction=integer_correction, max_iter=50, tol=1e-9)
    sel = mask if masked else torch.ones(shape, dtype=torch.bool)
    slope = np.polyfit(i[sel].numpy(), got[sel].numpy(), 1)[0]
    assert abs(slope / g - 1.0) < 1e-3, slope / g


# ------------------------------------------------------------------------------------------
# Against scikit-image on noisy data
# ------------------------------------------------------------------------------------------

def test_agrees_with_skimage_on_noisy_phase():
    from skimage.restoration import unwrap_phase

    vs = (1.0, 1.0, 1.0)
    shape = (40, 36, 30)
    truth = smooth_phase(shape, vs)
    mask = ellipsoid(shape, vs, (17.0, 15.0, 13.0))
    gen = torch.Generator().manual_seed(3)
    noisy = wrap_phase(truth + 0.3 * torch.randn(shape, dtype=torch.float64, generator=gen))
    ours = unwrap_laplacian(noisy, mask, vs)
    ma = np.ma.masked_array(noisy.numpy(), mask=~mask.numpy())
    ref = unwrap_phase(ma, rng=0)
    theirs = torch.from_numpy(np.ma.getdata(ref))
    d = (ours - theirs)[mask]
    n = torch.round(d / TWO_PI)
    # Both are exact integer unwraps of the same data: identical up to one global 2 pi k.
    assert float((d - TWO_PI * n).abs().max()) < 1e-9
    assert float((n == torch.mode(n).values).double().mean()) >= 0.999
    # And they match the truth (noise only, no wrong 2 pi counts).
    resid = (ours - truth)[mask]
    k = torch.round((resid - resid.median()) / TWO_PI)
    assert float((k == 0).double().mean()) >= 0.999


# ------------------------------------------------------------------------------------------
# Integer correction, transform and dict twin
# ------------------------------------------------------------------------------------------

def test_integer_correction_is_integer_and_follows_reference():
    truth = smooth_phase((20, 18, 16), (1, 1, 1))
    psi = wrap_phase(truth)
    smooth = truth + 1.234  # arbitrary constant: the alignment must absorb it
    out = integer_unwrap_correction(psi, smooth, None, reference_rad=truth)
    torch.testing.assert_close(out, truth, atol=1e-9, rtol=0)
    k = (out - psi) / TWO_PI
    torch.testing.assert_close(k, torch.round(k), atol=1e-9, rtol=0)
    out2 = integer_unwrap_correction(psi, smooth, None, reference_rad=truth + 4 * math.pi)
    torch.testing.assert_close(out2, truth + 4 * math.pi, atol=1e-9, rtol=0)


def test_transform_and_dict_twin():
    vs = (1.0, 1.2, 1.5)
    shape = (24, 20, 16)
    truth = smooth_phase(shape, vs).to(torch.float32)
    mask = ellipsoid(shape, vs, (11, 10, 10))
    t = LaplacianUnwrap()
    direct = t(wrap_phase(truth), mask, vs)
    sample = {"phase": wrap_phase(truth), "mask": mask, "voxel_size_mm": vs, "other": 1}
    out = Compose([t])(sample)
    torch.testing.assert_close(out["phase"], direct)
    assert out["other"] == 1 and out["mask"] is mask
    global_offset_ok(direct.double(), truth.double(), mask, atol=2e-4)
    # The mask is optional in the dict twin.
    no_mask = t.apply({"phase": wrap_phase(truth), "voxel_size_mm": vs})
    torch.testing.assert_close(no_mask["phase"], t(wrap_phase(truth), None, vs))
    with pytest.raises(ValueError):
        LaplacianUnwrap(method="bogus")


def test_empty_and_full_masks():
    truth = smooth_phase((16, 14, 12), (1, 1, 1))
    psi = wrap_phase(truth)
    empty = torch.zeros(truth.shape, dtype=torch.bool)
    torch.testing.assert_close(unwrap_laplacian(psi, empty), psi)
    full = torch.ones(truth.shape, dtype=torch.bool)
    torch.testing.assert_close(unwrap_laplacian(psi, full), unwrap_laplacian(psi, None))
