"""Unreliable-phase voxels: flagged where a wrong 2pi count is possible, kept out of background
removal, filled from reliable neighbours."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from qsmnet.physics.units import GAMMA_BAR_MHZ_PER_T, ppm_to_phase
from qsmnet.transforms.reliability import fill_unreliable, phase_step_ppm, unreliable_phase_mask

pytestmark = pytest.mark.usefixtures("single_thread")

TE1, B0 = 0.004, 3.0
#: field that winds the phase by 2pi at TE1 (a wrong 2pi count of the reference echo)
JUMP_PPM = 1.0 / (GAMMA_BAR_MHZ_PER_T * B0 * TE1)


def _smooth_field(shape=(40, 40, 40)):
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    # a harmonic background: up to 0.3 ppm across the box, far below the step limit per voxel
    return (0.15 * x - 0.1 * y + 0.05 * (x ** 2 - z ** 2)).astype(np.float64)


def test_phase_step_ppm_is_the_field_of_that_phase_at_that_echo():
    assert phase_step_ppm(TE1, B0, 2 * math.pi) == pytest.approx(JUMP_PPM, rel=1e-12)
    assert phase_step_ppm(TE1, B0) == pytest.approx(JUMP_PPM / 4, rel=1e-12)
    # the step is the field whose phase at TE1 is exactly one turn (the forward phase model)
    assert float(ppm_to_phase(torch.tensor(JUMP_PPM, dtype=torch.float64), TE1, B0)) == \
        pytest.approx(2 * math.pi, rel=1e-12)
    with pytest.raises(ValueError):
        phase_step_ppm(0.0, B0)


def test_wrong_2pi_cluster_is_flagged_and_a_smooth_field_is_not():
    f = _smooth_field()
    mask = np.zeros(f.shape, bool)
    mask[4:36, 4:36, 4:36] = True
    clean = unreliable_phase_mask(torch.from_numpy(f), torch.from_numpy(mask), TE1, B0)
    assert not bool(clean.any())
    wrong = np.zeros_like(mask)
    wrong[18:21, 10:13, 20:22] = True           # 18 voxels off by exactly one 2pi count
    flagged = unreliable_phase_mask(torch.from_numpy(f - JUMP_PPM * wrong),
                                    torch.from_numpy(mask), TE1, B0).numpy()
    assert flagged[wrong].all()
    # the cluster and its 6-neighbour shell (one dilation) and nothing else
    expected = ndi.binary_dilation(ndi.binary_dilation(wrong)) & mask
    assert np.array_equal(flagged, expected)
    no_dilation = unreliable_phase_mask(torch.from_numpy(f - JUMP_PPM * wrong),
                                        torch.from_numpy(mask), TE1, B0, dilate_voxels=0).numpy()
    assert np.array_equal(no_dilation, ndi.binary_dilation(wrong) & mask)
    # never outside the mask
    edge = np.zeros_like(mask)
    edge[4, 20:23, 20:23] = True
    out = unreliable_phase_mask(torch.from_numpy(f + JUMP_PPM * edge), torch.from_numpy(mask),
                                TE1, B0).numpy()
    assert out[edge].all() and not out[~mask].any()


def test_fill_is_exact_for_constant_and_symmetric_linear_fields_and_leaves_the_rest():
    shape = (30, 30, 30)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:27, 3:27, 3:27] = True
    bad = torch.zeros_like(mask)
    bad[14:17, 14:17, 14:17] = True              # a hole centred on voxel (15, 15, 15)
    const = torch.full(shape, 0.37, dtype=torch.float64)
    filled = fill_unreliable(const.masked_fill(bad, 99.0), mask, bad, sigma_mm=2.0)
    torch.testing.assert_close(filled[mask], const[mask], rtol=0, atol=1e-9)
    assert float(filled[~mask].abs().max()) == 0.0
    x = torch.arange(30, dtype=torch.float64).reshape(30, 1, 1).expand(shape)
    lin = 0.01 * (x - 15.0)
    filled = fill_unreliable(lin.masked_fill(bad, -5.0), mask, bad, sigma_mm=2.0)
    # by symmetry the hole's centre is exact; elsewhere in the hole within a fraction of a step
    assert float(filled[15, 15, 15]) == pytest.approx(0.0, abs=1e-9)
    assert float((filled - lin)[bad].abs().max()) < 0.01
    keep = mask & ~bad
    assert torch.equal(filled[keep], lin[keep])


def test_reconstruct_keeps_aliased_voxels_out_of_pdf():
    """A field step that aliases at TE1 (phase jump 2.6 pi between neighbours) leaves a wrong 2pi
    count in the fitted field. Without the reliability test the spike stays in PDF's local field
    and disturbs its fit; with it the background (a harmonic field: true local field 0) is
    removed everywhere."""
    from qsmnet.inference.options import ReconOptions
    from qsmnet.inference.pipeline import reconstruct

    shape = (40, 40, 40)
    f = _smooth_field(shape)
    cube = np.zeros(shape, bool)
    cube[18:21, 18:21, 18:21] = True
    true = f + 1.3 * JUMP_PPM * cube
    te = (TE1, 0.008, 0.012)
    phase = np.stack([np.angle(np.exp(2j * np.pi * GAMMA_BAR_MHZ_PER_T * B0 * t * true))
                      for t in te]).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[4:36, 4:36, 4:36] = True
    sample = {"phase": phase, "magnitude": np.ones_like(phase), "te_s": te, "b0_t": B0,
              "voxel_size_mm": (1.0, 1.0, 1.0), "b0_dir": (0.0, 0.0, 1.0), "mask": mask}
    ident = lambda f, *a: f  # noqa: E731
    on = reconstruct(sample, ReconOptions(bfr="pdf"), inverter=ident)
    off = reconstruct(sample, ReconOptions(bfr="pdf", max_phase_step_rad=None), inverter=ident)
    fitted = on.total_field_ppm.numpy()
    err = fitted - true
    err -= np.median(err[mask])
    # the test is meaningful: the fitted field is one 2pi count off in the cube
    np.testing.assert_allclose(err[cube], -JUMP_PPM, atol=0.02)
    assert on.unreliable_mask.numpy()[cube].all()
    assert on.params["unreliable_voxels"] == int(on.unreliable_mask.sum())
    # without the test the spike stays in the local field (and every inversion makes dipole
    # streaks of it); with it the cube is filled from its reliable surroundings
    spike_off = float(np.abs(off.local_field_ppm.numpy()[cube]).max())
    spike_on = float(np.abs(on.local_field_ppm.numpy()[cube]).max())
    far = mask & ~ndi.binary_dilation(cube, iterations=4)
    rms_on = float(np.sqrt(np.mean(on.local_field_ppm.numpy()[far] ** 2)))
    rms_off = float(np.sqrt(np.mean(off.local_field_ppm.numpy()[far] ** 2)))
    assert spike_off > 0.4 and spike_on < 0.01
    assert rms_on < 0.6 * rms_off < 0.002
    assert off.unreliable_mask is None
