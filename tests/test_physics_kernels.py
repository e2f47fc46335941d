"""Dipole and SMV kernels, Laplacian spectra and finite-difference operators."""

import math

import numpy as np
import pytest
import torch

from qsmnet.physics import (
    dipole_kernel,
    divergence,
    gradient,
    laplacian,
    laplacian_eigenvalues,
    smv_kernel,
    sphere_mask,
)


def test_dipole_kernel_values_and_dc():
    d = dipole_kernel((16, 18, 15), (1.0, 1.2, 2.0), (0.0, 0.0, 1.0), dtype=torch.float64)
    assert d[0, 0, 0] == 0.0
    assert d.max() <= 1 / 3 + 1e-12 and d.min() >= -2 / 3 - 1e-12
    # Along k_z (parallel to B0): 1/3 - 1 = -2/3; along k_x: 1/3.
    assert float(d[0, 0, 1]) == pytest.approx(-2 / 3)
    assert float(d[1, 0, 0]) == pytest.approx(1 / 3)


def test_dipole_kernel_matches_numpy_formula_anisotropic_oblique():
    shape, vs, b = (12, 10, 9), (0.8, 1.0, 1.5), np.array([0.3, -0.4, 0.8])
    b = b / np.linalg.norm(b)
    kx, ky, kz = np.meshgrid(*[np.fft.fftfreq(n, d) for n, d in zip(shape, vs)], indexing="ij")
    k2 = kx ** 2 + ky ** 2 + kz ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = 1 / 3 - (kx * b[0] + ky * b[1] + kz * b[2]) ** 2 / k2
    ref[0, 0, 0] = 0.0
    d = dipole_kernel(shape, vs, b.tolist(), dtype=torch.float64).numpy()
    # Off the Nyquist planes of the even axes (x: 12, y: 10) the kernel is the plain formula.
    off = np.ones(shape, bool)
    off[6], off[:, 5] = False, False
    np.testing.assert_allclose(d[off], ref[off], atol=1e-14)


def test_dipole_kernel_point_symmetric_and_half_layout():
    # Odd sizes: every frequency has its negative on the grid (even sizes alias the Nyquist plane).
    d = dipole_kernel((11, 13, 9), (1.0, 0.9, 1.3), (0.2, 0.5, 0.8), dtype=torch.float64)
    flipped = torch.roll(torch.flip(d, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))
    torch.testing.assert_close(d, flipped)  # D(k) = D(-k): real, even kernel
    half = dipole_kernel((11, 13, 9), (1.0, 0.9, 1.3), (0.2, 0.5, 0.8), half=True,
                         dtype=torch.float64)
    torch.testing.assert_close(half, d[..., :5])


def test_dipole_kernel_sign_of_b0_irrelevant():
    a = dipole_kernel((8, 8, 8), b0_dir=(0.3, 0.2, 0.9))
    b = dipole_kernel((8, 8, 8), b0_dir=(-0.3, -0.2, -0.9))
    torch.testing.assert_close(a, b)


def test_dipole_kernel_batched():
    vs = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
    b0 = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.8]])
    d = dipole_kernel((8, 9, 10), vs, b0, dtype=torch.float64)
    assert d.shape == (2, 8, 9, 10)
    for i in range(2):
        torch.testing.assert_close(d[i], dipole_kernel((8, 9, 10), vs[i], b0[i],
                                                       dtype=torch.float64))


def test_dipole_kernel_rejects_bad_input():
    with pytest.raises(ValueError):
        dipole_kernel((8, 8, 8), b0_dir=(0, 0, 0))
    with pytest.raises(ValueError):
        dipole_kernel((8, 8, 8), voxel_size=(1, 0, 1))


def test_sphere_mask_radius_in_mm_on_anisotropic_grid():
    m = sphere_mask((32, 32, 32), (1.0, 1.0, 2.0), 4.0)
    # Extent along x: |i| <= 4 voxels; along z: |k| <= 2 voxels (2 mm voxels).
    assert bool(m[4, 0, 0]) and not bool(m[5, 0, 0])
    assert bool(m[0, 0, 2]) and not bool(m[0, 0, 3])
    # Volume close to 4/3 pi r^3 / voxel volume.
    assert float(m.sum()) == pytest.approx(4 / 3 * math.pi * 64 / 2, rel=0.15)


def test_smv_kernel_dc_one_and_mean_filter():
    s = smv_kernel((16, 16, 16), (1.0, 1.0, 1.0), 2.0, dtype=torch.float64)
    assert float(s[0, 0, 0]) == pytest.approx(1.0)
    # Applying it to a constant returns the constant; to an impulse, the normalised sphere.
    imp = torch.zeros(16, 16, 16, dtype=torch.float64)
    imp[0, 0, 0] = 1.0
    out = torch.fft.ifftn(torch.fft.fftn(imp) * s).real
    sph = sphere_mask((16, 16, 16), (1.0, 1.0, 1.0), 2.0).double()
    torch.testing.assert_close(out, sph / sph.sum())


def test_gradient_divergence_adjoint():
    g = torch.Generator().manual_seed(0)
    vs = (0.8, 1.0, 1.7)
    x = torch.randn(9, 10, 11, generator=g, dtype=torch.float64)
    y = torch.randn(3, 9, 10, 11, generator=g, dtype=torch.float64)
    lhs = (gradient(x, vs) * y).sum()
    rhs = -(x * divergence(y, vs)).sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)


def test_gradient_of_linear_ramp_is_slope():
    vs = (0.5, 1.0, 2.0)
    x = torch.arange(10, dtype=torch.float64).reshape(10, 1, 1).expand(10, 4, 4) * vs[0] * 3.0
    grad = gradient(x, vs)
    assert torch.allclose(grad[0, :-1], torch.full_like(grad[0, :-1], 3.0))
    assert grad[1].abs().max() == 0 and grad[2].abs().max() == 0


def test_laplacian_consistency_with_div_grad_and_spectrum():
    g = torch.Generator().manual_seed(1)
    vs = (0.9, 1.1, 1.6)
    x = torch.randn(8, 10, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(laplacian(x, vs), divergence(gradient(x, vs), vs))
    lam = laplacian_eigenvalues((8, 10, 12), vs, dtype=torch.float64)
    spectral = torch.fft.ifftn(torch.fft.fftn(x) * lam).real
    torch.testing.assert_close(laplacian(x, vs), spectral)
    half = laplacian_eigenvalues((8, 10, 12), vs, half=True, dtype=torch.float64)
    torch.testing.assert_close(half, lam[..., :7])
    assert float(lam[0, 0, 0]) == 0.0 and float(lam.max()) <= 0.0


def test_dipole_kernel_even_in_k_on_even_grids_with_oblique_b0():
    """Nyquist planes of even axes: the kernel is the average over the sign of the Nyquist
    component, so it is exactly even in k (real impulse response, no ringing from strong sources)."""
    d = dipole_kernel((10, 12, 8), (1.0, 0.9, 1.3), (0.3, 0.5, 0.8), dtype=torch.float64)
    flipped = torch.roll(torch.flip(d, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))
    torch.testing.assert_close(d, flipped)
    impulse_response = torch.fft.ifftn(d)
    assert float(impulse_response.imag.abs().max()) < 1e-15
    # Away from the Nyquist planes it is the plain formula.
    b = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)
    b = b / b.norm()
    k = torch.tensor([1 / 10, 2 / (12 * 0.9), 1 / (8 * 1.3)], dtype=torch.float64)
    assert float(d[1, 2, 1]) == pytest.approx(1 / 3 - float((k @ b) ** 2 / (k @ k)))
