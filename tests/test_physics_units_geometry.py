"""Unit conversions and the B0 direction from affines."""

import math

import numpy as np
import pytest
import torch

from qsmnet.physics import (
    GAMMA_BAR_MHZ_PER_T,
    affine_from_b0_dir,
    b0_dir_from_affine,
    hz_to_ppm,
    phase_to_ppm,
    ppm_to_hz,
    ppm_to_phase,
)
from qsmnet.physics.geometry import rotation_between, tilt_deg
from qsmnet.physics.units import wrap_phase


def test_gamma_bar_is_the_proton_gyromagnetic_ratio_over_two_pi():
    # CODATA 2014 proton gyromagnetic ratio gamma_p = 2.675 221 900e8 rad s^-1 T^-1; the constant
    # is gamma_p / (2 pi) in MHz/T, to the 10 significant digits it is written with
    gamma_p_rad_per_s_t = 2.675221900e8
    assert GAMMA_BAR_MHZ_PER_T == pytest.approx(gamma_p_rad_per_s_t / (2 * math.pi) / 1e6,
                                                rel=5e-10)
    # and within the 0.01 % the conventions allow of the 42.576 / 42.58 other tools use
    assert abs(GAMMA_BAR_MHZ_PER_T / 42.58 - 1) < 1e-4


def test_one_ppm_phase_at_3t():
    # 1 ppm at 3 T is 127.73 Hz; at TE = 10 ms that is 2 pi * 1.2773 rad.
    phase = ppm_to_phase(torch.tensor(1.0, dtype=torch.float64), 0.010, 3.0)
    assert float(phase) == pytest.approx(2 * math.pi * 42.57747892 * 3.0 * 0.010)
    assert float(ppm_to_hz(torch.tensor(1.0), 3.0)) == pytest.approx(127.73243676, rel=1e-7)


def test_round_trips_multi_echo():
    g = torch.Generator().manual_seed(0)
    field = torch.randn(5, 6, 7, generator=g, dtype=torch.float64).expand(4, 5, 6, 7)
    te = [0.004, 0.012, 0.020, 0.028]
    phase = ppm_to_phase(field, te, 7.0)
    # Each echo scales with its own TE.
    torch.testing.assert_close(phase[3] / phase[0], torch.full_like(phase[0], 7.0))
    torch.testing.assert_close(phase_to_ppm(phase, te, 7.0), field)
    torch.testing.assert_close(hz_to_ppm(ppm_to_hz(field, 3.0), 3.0), field)
    torch.testing.assert_close(phase_to_ppm(-phase, te, 7.0, phase_sign=-1), field)


def test_bad_units_raise():
    with pytest.raises(ValueError):
        phase_to_ppm(torch.zeros(2, 2, 2), 0.0, 3.0)
    with pytest.raises(ValueError):
        phase_to_ppm(torch.zeros(2, 2, 2), 0.01, -3.0)


def test_wrap_phase_range_and_congruence():
    x = torch.linspace(-20, 20, 1001, dtype=torch.float64)
    w = wrap_phase(x)
    assert float(w.min()) >= -math.pi and float(w.max()) < math.pi
    k = (x - w) / (2 * math.pi)
    torch.testing.assert_close(k, k.round())


def test_b0_axial_and_flipped_axes():
    np.testing.assert_allclose(b0_dir_from_affine(np.diag([1.0, 1.0, 1.0, 1.0])), [0, 0, 1])
    # Scaling (voxel size) does not matter.
    np.testing.assert_allclose(b0_dir_from_affine(np.diag([0.8, 0.8, 2.0, 1.0])), [0, 0, 1])
    # Flipping x (radiological) leaves b0 = +z; flipping z flips the sign of its component.
    np.testing.assert_allclose(b0_dir_from_affine(np.diag([-1.0, 1.0, 1.0, 1.0])), [0, 0, 1])
    np.testing.assert_allclose(b0_dir_from_affine(np.diag([1.0, 1.0, -1.0, 1.0])), [0, 0, -1])


def test_b0_oblique_affine():
    t = math.radians(20.0)
    rot_x = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3] = rot_x @ np.diag([1.0, 1.0, 2.0])
    b0 = b0_dir_from_affine(affine)
    # inv(R) e_z = R^T e_z = third row of R.
    np.testing.assert_allclose(b0, [0.0, math.sin(t), math.cos(t)], atol=1e-12)
    assert tilt_deg(b0) == pytest.approx(20.0)


def test_b0_sagittal_acquisition():
    # Array axes (x, y, z) -> scanner (y, z, x): array axis 1 points along scanner z.
    affine = np.zeros((4, 4))
    affine[1, 0] = affine[2, 1] = affine[0, 2] = 1.0
    affine[3, 3] = 1.0
    np.testing.assert_allclose(b0_dir_from_affine(affine), [0, 1, 0], atol=1e-12)


@pytest.mark.parametrize("b0", [(0, 0, 1), (0.3, -0.2, 0.93), (1, 0, 0), (0, 0, -1)])
def test_affine_from_b0_dir_round_trip(b0):
    affine = affine_from_b0_dir(b0, (0.8, 1.0, 2.0), shape=(10, 12, 14))
    np.testing.assert_allclose(b0_dir_from_affine(affine), np.array(b0) / np.linalg.norm(b0),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.8, 1.0, 2.0])


def test_rotation_between_is_proper_rotation():
    r = rotation_between([0.2, 0.3, 0.9], [0, 0, 1])
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
