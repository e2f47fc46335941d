"""Source primitives of the simulator checked against geometry and physics truths: volumes of
painted shapes on anisotropic grids, tube volumes, texture statistics, exact distances, harmonic
backgrounds and the analytic sphere field against the forward model."""

import math

import pytest
import torch

from qsmnet.physics import forward_field
from qsmnet.simulation.masks import distant_sphere_field, ellipsoid_distance, harmonic_polynomial
from qsmnet.simulation.sampling import grid_axes, make_generator, random_rotations
from qsmnet.simulation.sources import (
    BOX,
    ELLIPSOID,
    Shape,
    paint_shapes,
    random_textures,
    random_voxel_indices,
    vessel_tubes,
)

IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


pytestmark = pytest.mark.usefixtures("single_thread")


def _rotation(seed):
    r = random_rotations(make_generator(seed), 1, dtype=torch.float64)[0]
    return tuple(tuple(float(v) for v in row) for row in r)


@pytest.mark.parametrize("kind,radii,volume", [
    (ELLIPSOID, (6.0, 6.0, 6.0), 4 / 3 * math.pi * 216),
    (ELLIPSOID, (7.0, 4.0, 3.0), 4 / 3 * math.pi * 84),
    (BOX, (5.0, 3.0, 2.0), 8 * 30.0),
])
def test_painted_volume_and_position_on_anisotropic_grid(kind, radii, volume):
    vs = (0.7, 1.0, 1.6)
    shape = (48, 34, 22)
    centre = (1.3, -2.1, 0.7)
    s = Shape(kind, centre, radii, _rotation(3) if radii[0] != radii[1] else IDENTITY, 1.0)
    vol = paint_shapes(torch.zeros(shape, dtype=torch.float64), [s], vs, edge_mm=0.7)
    assert float(vol.sum()) * math.prod(vs) == pytest.approx(volume, rel=0.03)
    ax = grid_axes(shape, vs, "cpu", torch.float64)
    w = vol / vol.sum()
    com = [float((w.sum(dim=tuple(j for j in range(3) if j != i)) * ax[i]).sum()) for i in range(3)]
    assert com == pytest.approx(list(centre), abs=0.1)
    assert float(vol.max()) == 1.0 and float(vol.min()) == 0.0


def test_paint_over_and_add():
    vs = (1.0, 1.0, 1.0)
    big = Shape(ELLIPSOID, (0.0, 0.0, 0.0), (6.0, 6.0, 6.0), IDENTITY, 0.2)
    small = Shape(BOX, (0.0, 0.0, 0.0), (2.0, 2.0, 2.0), IDENTITY, -0.5)
    over = paint_shapes(torch.zeros(16, 16, 16), [big, small], vs, 1.0, mode="over")
    add = paint_shapes(torch.zeros(16, 16, 16), [big, small], vs, 1.0, mode="add")
    c = (slice(7, 9),) * 3
    assert torch.allclose(over[c], torch.tensor(-0.5))          # the later shape hides the earlier
    assert torch.allclose(add[c], torch.tensor(0.2 - 0.5))      # or adds to it
    assert float(over[0, 0, 0]) == 0.0


@pytest.mark.parametrize("vs", [(1.0, 1.0, 1.0), (0.7, 0.9, 1.4)])
def test_straight_vessel_is_a_capsule_of_the_right_volume(vs):
    r, length, delta = 1.5, 18.0, 0.4
    shape = (int(40 / vs[0]), int(40 / vs[1]), int(40 / vs[2]))
    g = make_generator(1)
    vol = vessel_tubes(g, shape, vs, torch.zeros(1, 3), torch.tensor([r]), torch.tensor([delta]),
                       torch.tensor([length]), edge_mm=min(vs), curvature=0.0, taper=0.0)
    assert float(vol.max()) == pytest.approx(delta)
    capsule = math.pi * r * r * length + 4 / 3 * math.pi * r ** 3
    assert float(vol.sum()) / delta * math.prod(vs) == pytest.approx(capsule, rel=0.05)
    # Nothing farther than radius + edge from the centre line; the line passes through 0.
    ax = grid_axes(shape, vs, "cpu")
    pts = torch.stack(torch.meshgrid(*ax, indexing="ij"), -1)[vol > 0]
    centred = pts - pts.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    dist = (centred - (centred @ direction)[:, None] * direction).norm(dim=1)
    assert float(dist.max()) <= r + min(vs) + 1e-4
    assert float(pts.mean(0).norm()) < 0.5


def test_textures_unit_variance_and_smoothness_order():
    vs = (1.0, 1.0, 1.0)
    tex = random_textures(make_generator(0), (32, 32, 32), vs, [(4.0, None), (0.7, 1.5)])
    assert torch.allclose(tex.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(tex.std(dim=(1, 2, 3)), torch.ones(2), atol=1e-4)

    def lag1(t):
        return float((t[1:] * t[:-1]).mean() / (t * t).mean())
    assert lag1(tex[0]) > 0.9 and lag1(tex[1]) < 0.5
    coarse = random_textures(make_generator(0), (32, 32, 32), vs, [(4.0, None)], downsample=2)[0]
    assert coarse.shape == (32, 32, 32)
    assert 0.7 < float(coarse.std()) <= 1.01 and lag1(coarse) > 0.9


def test_random_voxel_indices_uniform_over_mask():
    mask = torch.zeros(5, 6, 7, dtype=torch.bool)
    mask[1, 2, 3] = mask[4, 5, 6] = mask[0, 0, 0] = True
    idx = random_voxel_indices(make_generator(0), mask, 3000)
    assert bool(mask.reshape(-1)[idx].all())
    counts = torch.bincount(idx, minlength=mask.numel())[mask.reshape(-1)]
    assert torch.all((counts > 900) & (counts < 1100))


def test_ellipsoid_distance_exact_for_a_sphere():
    ax = grid_axes((20, 16, 12), (1.0, 1.5, 2.0), "cpu", torch.float64)
    d = ellipsoid_distance(*ax, (1.0, -0.5, 2.0), (5.0, 5.0, 5.0), _rotation(2))
    x, y, z = torch.meshgrid(ax[0] - 1.0, ax[1] + 0.5, ax[2] - 2.0, indexing="ij")
    assert torch.allclose(d, torch.sqrt(x * x + y * y + z * z) - 5.0, atol=1e-9)


def test_harmonic_shim_has_zero_laplacian():
    ax = grid_axes((12, 12, 12), (1.0, 1.0, 1.0), "cpu", torch.float64)
    f = harmonic_polynomial(ax, [0.3, -0.2, 0.1, 0.5, -0.4, 0.25, 0.6, -0.35], half_fov_mm=6.0)
    lap = (f[2:, 1:-1, 1:-1] + f[:-2, 1:-1, 1:-1] + f[1:-1, 2:, 1:-1] + f[1:-1, :-2, 1:-1]
           + f[1:-1, 1:-1, 2:] + f[1:-1, 1:-1, :-2] - 6 * f[1:-1, 1:-1, 1:-1])
    assert float(lap.abs().max()) < 1e-12
    assert float(f.abs().max()) > 0.1


@pytest.mark.parametrize("b0,tol", [((0.0, 0.0, 1.0), 0.03), ((0.3, -0.2, 0.93), 0.08)])
def test_distant_sphere_field_matches_forward_model(b0, tol):
    """The analytic field used for sources outside the patch agrees with the discrete forward
    model of a painted sphere, away from it. (Oblique B0: the k-space kernel on a cubic grid has
    a few % of cubic anisotropy at this resolution (radius 5 voxels), hence the wider tolerance.)"""
    vs = (1.0, 1.0, 1.0)
    shape = (48, 48, 48)
    a, chi = 5.0, 1.0
    sphere = paint_shapes(torch.zeros(shape, dtype=torch.float64),
                          [Shape(ELLIPSOID, (0.0, 0.0, 0.0), (a, a, a), IDENTITY, chi)], vs, 1.0)
    numeric = forward_field(sphere, vs, b0)
    ax = grid_axes(shape, vs, "cpu", torch.float64)
    analytic = distant_sphere_field(ax, [(0.0, 0.0, 0.0)], [a], [chi], b0)
    x, y, z = torch.meshgrid(*ax, indexing="ij")
    r = torch.sqrt(x * x + y * y + z * z)
    shell = (r > 2.5 * a) & (r < 4 * a)
    err = (numeric - analytic)[shell].abs().max()
    assert float(err) < tol * float(analytic[shell].abs().max())
    # Sign and orientation: positive along B0, negative across it.
    b = torch.tensor(b0, dtype=torch.float64) / torch.tensor(b0, dtype=torch.float64).norm()
    p0 = torch.stack([ax[0][24], ax[1][24], ax[2][24]])
    perp = torch.linalg.cross(b, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    perp = perp / perp.norm()
    along = distant_sphere_field(ax, [tuple((p0 - 15 * b).tolist())], [a], [chi], b0)
    across = distant_sphere_field(ax, [tuple((p0 - 15 * perp).tolist())], [a], [chi], b0)
    assert float(along[24, 24, 24]) == pytest.approx(2 / 3 * (a / 15) ** 3, rel=1e-9)
    assert float(across[24, 24, 24]) == pytest.approx(-1 / 3 * (a / 15) ** 3, rel=1e-9)
