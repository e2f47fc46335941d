"""The head-like evaluation phantom and its qsm-forward acquisition, cross-checked against
qsmnet's own forward model (two independent implementations of the same physics)."""

import numpy as np
import pytest
import torch

from qsmnet.physics import forward_field, phase_to_ppm
from qsmnet.simulation.head_phantom import LABELS, head_phantom
from qsmnet.simulation.qsmforward_acquisition import (
    QSMFORWARD_GAMMA_BAR_MHZ_PER_T,
    simulate_acquisition,
    tilted_b0,
)

pytest.importorskip("qsm_forward")


@pytest.fixture(scope="module")
def small_head():
    return head_phantom(voxel_size_mm=(2.0, 2.0, 2.0), scale=0.6, seed=0)


def test_phantom_anatomy(small_head):
    p = small_head
    assert p.brain_mask.sum() > 1000
    # Air outside the head is +9.4 ppm, bone negative, deep grey matter paramagnetic.
    assert p.chi_ppm[0, 0, 0] == pytest.approx(9.4)
    assert p.chi_ppm[p.seg == LABELS["skull"]].mean() < -1.5
    assert p.chi_ppm[p.seg == LABELS["globus_pallidus"]].mean() > 0.1
    # Referenced chi has zero mean in the brain and is zero outside.
    c = p.chi_brain_ppm
    assert abs(c[p.brain_mask].mean()) < 1e-12 and np.all(c[~p.brain_mask] == 0)


def test_same_head_at_any_voxel_size():
    iso = head_phantom(voxel_size_mm=(1.0, 1.0, 1.0), scale=0.5)
    aniso = head_phantom(voxel_size_mm=(1.0, 1.0, 2.0), scale=0.5)
    vol_iso = iso.brain_mask.sum() * 1.0
    vol_aniso = aniso.brain_mask.sum() * 2.0
    assert vol_aniso == pytest.approx(vol_iso, rel=0.02)


@pytest.mark.parametrize("tilt", [0.0, 25.0])
def test_qsmforward_local_field_matches_qsmnet_forward(small_head, tilt):
    b0 = tilted_b0(tilt)
    acq = simulate_acquisition(small_head, b0_dir=b0, peak_snr=np.inf, shim=False,
                               phase_offset=False, te_s=(0.004, 0.008))
    ours = forward_field(torch.from_numpy(acq.chi_ppm), small_head.voxel_size_mm, b0).numpy()
    m = acq.mask
    ours = (ours - ours[m].mean()) * m
    rel = np.linalg.norm(ours[m] - acq.local_field_ppm[m]) / np.linalg.norm(acq.local_field_ppm[m])
    assert rel < 0.02, rel


def test_phase_encodes_total_field(small_head):
    acq = simulate_acquisition(small_head, peak_snr=np.inf, phase_offset=False,
                               te_s=(0.001,), b0_t=3.0)
    m = acq.mask
    # At TE = 1 ms the phase is not wrapped inside the brain for fields below ~1.3 ppm.
    small = m & (np.abs(acq.total_field_ppm) < 1.0)
    field = phase_to_ppm(torch.from_numpy(acq.phase[0].astype(np.float64)), 0.001, 3.0).numpy()
    ratio = QSMFORWARD_GAMMA_BAR_MHZ_PER_T / 42.57747892
    np.testing.assert_allclose(field[small], acq.total_field_ppm[small] * ratio, atol=1e-5)


def test_harmonic_shim_is_harmonic_on_anisotropic_grids():
    from qsmnet.physics import laplacian
    from qsmnet.simulation.qsmforward_acquisition import harmonic_shim_residual

    shape, vs = (20, 22, 12), (1.0, 1.0, 2.0)
    axes = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, vs)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    harmonic = 0.3 + 0.01 * x - 0.02 * z + 1e-3 * (2 * z * z - x * x - y * y) + 2e-3 * x * y
    mask = np.zeros(shape, bool)
    mask[3:-3, 3:-3, 2:-2] = True
    # A harmonic field is removed exactly; a local bump is (almost) untouched.
    assert np.abs(harmonic_shim_residual(harmonic, mask, vs)[mask]).max() < 1e-10
    bump = np.exp(-((x / 3) ** 2 + (y / 3) ** 2 + (z / 3) ** 2))
    res = harmonic_shim_residual(harmonic + bump, mask, vs)
    lap_in = laplacian(torch.from_numpy(res), vs).numpy()
    lap_bump = laplacian(torch.from_numpy(bump), vs).numpy()
    inner = np.zeros(shape, bool)
    inner[1:-1, 1:-1, 1:-1] = True
    np.testing.assert_allclose(lap_in[inner], lap_bump[inner], atol=1e-10)


def test_total_field_is_qsmforward_field_of_whole_head(small_head):
    """Without sub-voxels, local + background is qsm-forward's field of the whole head."""
    import qsm_forward

    b0 = tilted_b0(25.0)
    acq = simulate_acquisition(small_head, b0_dir=b0, peak_snr=np.inf, shim=False,
                               phase_offset=False, te_s=(0.004,))
    m = small_head.brain_mask
    whole = qsm_forward.generate_field(small_head.chi_ppm, mask=m,
                                       voxel_size=list(small_head.voxel_size_mm), B0_dir=list(b0))
    scale = np.abs(whole[m]).max()
    assert np.abs(acq.total_field_ppm - whole).max() < 1e-9 * scale


def test_voxel_averaged_field_of_smooth_source_matches_voxel_grid():
    """On a smooth (band-limited) source, sub-voxels change nothing the voxel grid resolves."""
    import qsm_forward

    from qsmnet.simulation.qsmforward_acquisition import supersample_factors, voxel_averaged_field

    shape, vs, b0 = (24, 26, 20), (1.0, 1.0, 2.0), tilted_b0(30.0)
    axes = [(np.arange(n) - n / 2) * d for n, d in zip(shape, vs)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    chi = 0.1 * np.exp(-(x ** 2 + y ** 2 + z ** 2) / (2 * 4.0 ** 2))
    assert supersample_factors(vs, 0.5) == (2, 2, 4)
    plain = qsm_forward.generate_field(chi, voxel_size=list(vs), B0_dir=list(b0))
    np.testing.assert_array_equal(voxel_averaged_field(chi, vs, b0, 1), plain)
    fine = voxel_averaged_field(chi, vs, b0, (2, 2, 4))
    rel = np.linalg.norm(fine - plain) / np.linalg.norm(plain)
    assert rel < 0.05, rel
    with pytest.raises(ValueError, match="factors"):
        voxel_averaged_field(chi, vs, b0, (2, 0, 1))


def test_sub_voxel_background_is_harmonic_in_the_brain_for_oblique_b0(small_head):
    """The field of sources outside the brain is harmonic inside it: SHARP-type removal must
    leave (almost) nothing. On the voxel grid, the sampled kernel's ringing at the +9 ppm air
    step breaks this for oblique B0; computed on sub-voxels it holds again."""
    from qsmnet.simulation.qsmforward_acquisition import voxel_averaged_field
    from qsmnet.transforms import resharp

    p, b0 = small_head, tilted_b0(25.0)
    vs = p.voxel_size_mm
    mask = torch.from_numpy(p.brain_mask)
    outside = p.chi_ppm - p.chi_brain_ppm
    local = simulate_acquisition(p, b0_dir=b0, peak_snr=np.inf, phase_offset=False,
                                 te_s=(0.004,)).local_field_ppm
    residual = {}
    for k in (1, 2):
        bg = voxel_averaged_field(outside, vs, b0, k).astype(np.float32)
        out, m = resharp(torch.from_numpy(bg), mask, vs)
        residual[k] = float(out[m].std())
    local_rms = float(local[m.numpy()].std())
    assert residual[2] < 0.25 * residual[1], residual
    assert residual[2] < 0.1 * local_rms, (residual, local_rms)
