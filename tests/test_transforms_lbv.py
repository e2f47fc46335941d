"""Laplacian boundary value background removal (qsmnet.transforms.lbv) against exact truths.

The 7-point Laplacian annihilates harmonic polynomials up to degree three exactly (central
second differences are exact for cubics), so a background made of them is discrete-harmonic,
and LBV's answer for ``local + background`` with a local field that is zero on the boundary is
exactly ``local``, up to the conjugate-gradient tolerance.
"""

import numpy as np
import pytest
import torch

from qsmnet.transforms.background import BFR_TRANSFORMS, make_bfr_transform
from qsmnet.transforms.lbv import LBV, _interior, lbv

pytestmark = pytest.mark.usefixtures("single_thread")


def _ellipsoid(shape=(30, 26, 22), vs=(1.0, 1.0, 1.0)):
    g = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, vs)],
                    indexing="ij")
    mask = (g[0] / 12.0) ** 2 + (g[1] / 10.0) ** 2 + (g[2] / 8.0) ** 2 <= 1
    return mask, g


def _harmonic(g):
    x, y, z = g
    # harmonic cubic + quadratics + linear: its Laplacian is zero identically
    return 0.3 * (x ** 2 - y ** 2) + 0.2 * x * y * z + 0.05 * (x ** 3 - 3 * x * z ** 2) \
        + 0.4 * z + 1.5


@pytest.mark.parametrize("vs", [(1.0, 1.0, 1.0), (0.8, 1.0, 1.6)])
def test_harmonic_background_removed_and_boundary_free_local_field_kept(vs):
    mask, g = _ellipsoid(vs=vs)
    interior = _interior(torch.from_numpy(mask)).numpy()
    rng = np.random.default_rng(0)
    local = np.where(interior, rng.normal(0, 0.05, mask.shape), 0.0)
    total = local + _harmonic(g)
    out, out_mask = lbv(torch.from_numpy(total), torch.from_numpy(mask), vs, peel=0,
                        tol=1e-12, max_iter=5000)
    assert np.array_equal(out_mask.numpy(), interior)
    ref = local - local[interior].mean()
    # float64 CG to 1e-12 relative residual; the operator's condition number (~ grid size^2)
    # bounds the solution error by ~1e-12 * 1e3
    err = np.abs(out.numpy() - ref)[interior].max() / np.abs(ref).max()
    assert err < 1e-8
    assert float(out.numpy()[~interior].__abs__().max()) == 0.0


def test_a_purely_harmonic_field_leaves_nothing():
    mask, g = _ellipsoid()
    out, m = lbv(torch.from_numpy(_harmonic(g)).float(), torch.from_numpy(mask))
    # float32: the background (up to ~40 ppm here) is annihilated to its rounding
    assert float(out.abs().max()) < 1e-4 * float(np.abs(_harmonic(g)[mask]).max())


def test_peel_removes_layers_and_the_interior_is_the_six_neighbour_erosion():
    mask, _ = _ellipsoid()
    m = torch.from_numpy(mask)
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(3, 1)
    for peel in (0, 2):
        _, out_mask = lbv(torch.zeros(mask.shape), m, peel=peel)
        expected = ndimage.binary_erosion(mask, cross, iterations=1 + peel)
        assert np.array_equal(out_mask.numpy(), expected)


def test_registered_and_dict_twin_matches_the_function():
    assert BFR_TRANSFORMS["lbv"] is LBV
    mask, g = _ellipsoid()
    f = torch.from_numpy(_harmonic(g) + 0.1 * g[0] ** 2).float()
    t = make_bfr_transform("lbv", {"peel": 1})
    out = t.apply({"total_field_ppm": f, "mask": torch.from_numpy(mask),
                   "voxel_size_mm": (1.0, 1.0, 1.0)})
    ref, ref_mask = lbv(f, torch.from_numpy(mask), peel=1)
    assert torch.equal(out["mask"], ref_mask)
    torch.testing.assert_close(out["local_field_ppm"], ref)  # the same call, twice


def test_refusals():
    f = torch.zeros(10, 10, 10)
    with pytest.raises(ValueError, match="empty"):
        lbv(f, torch.zeros(10, 10, 10, dtype=torch.bool))
    thin = torch.zeros(10, 10, 10, dtype=torch.bool)
    thin[2:8, 2:8, 5] = True
    with pytest.raises(ValueError, match="interior"):
        lbv(f, thin)
    bad = f.clone()
    bad[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        lbv(bad, thin | True)
    with pytest.raises(ValueError, match="peel"):
        lbv(f, thin, peel=-1)
