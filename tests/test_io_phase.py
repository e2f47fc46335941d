"""Integer raw phase is rescaled to radians with the known linear map; radians are untouched."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from qsmnet.io import QSMInputError, integer_phase_range, phase_to_radians


def test_unsigned_12bit_maps_linearly_to_minus_pi_pi():
    raw = np.arange(4096, dtype=np.float32).reshape(16, 16, 16)
    rad, message = phase_to_radians(raw, "ph.nii.gz")
    # Known map for 0..4095: v * 2*pi/4096 - pi  (0 -> -pi, 2048 -> 0, 4095 -> pi - 2*pi/4096).
    expected = raw.astype(np.float64) * (2 * math.pi / 4096) - math.pi
    np.testing.assert_allclose(rad, expected, atol=2e-6)
    assert rad.dtype == np.float32
    assert rad.flat[2048] == 0.0
    assert rad.min() >= -math.pi - 1e-6 and rad.max() < math.pi
    assert message == "ph.nii.gz: phase looks like integers in [0, 4095]; rescaled to radians"


def test_signed_siemens_range_maps_to_v_pi_over_4096(caplog):
    raw = np.array([-4096, -2048, 0, 1, 2048, 4095], np.float32).reshape(1, 2, 3)
    with caplog.at_level(logging.INFO, logger="qsmnet"):
        rad, message = phase_to_radians(raw, "sub-01_echo-1_part-phase_MEGRE.nii.gz")
    np.testing.assert_allclose(rad.ravel(), raw.ravel() * math.pi / 4096, atol=1e-6)
    assert "integers in [-4096, 4095]; rescaled to radians" in message
    assert message in caplog.text


def test_partial_range_uses_nominal_range():
    # Data that does not reach the extremes still uses the 12-bit map.
    raw = np.array([3.0, 100.0, 4000.0])
    assert integer_phase_range(3, 4000) == (0, 4095)
    rad, _ = phase_to_radians(raw)
    np.testing.assert_allclose(rad, raw * 2 * math.pi / 4096 - math.pi, atol=1e-6)
    assert integer_phase_range(-4000, 4095) == (-4096, 4095)
    assert integer_phase_range(-2048, 2047) == (-2048, 2047)


def test_radians_untouched():
    phase = np.linspace(-math.pi, math.pi, 50, dtype=np.float32)
    rad, message = phase_to_radians(phase)
    assert message is None
    np.testing.assert_array_equal(rad, phase)


def test_integer_valued_small_phase_counts_as_radians():
    # {-3..3} is within [-pi, pi]: radians, not raw integers.
    phase = np.array([-3.0, 0.0, 3.0])
    rad, message = phase_to_radians(phase)
    assert message is None
    np.testing.assert_array_equal(rad, phase)


def test_float_out_of_range_is_an_error():
    with pytest.raises(QSMInputError, match=r"ph.nii.gz: .*not in radians"):
        phase_to_radians(np.array([0.5, 7.25, -1.0]), "ph.nii.gz")


def test_nan_phase_is_an_error():
    with pytest.raises(QSMInputError, match="ph.nii.gz"):
        phase_to_radians(np.array([0.0, np.nan]), "ph.nii.gz")
