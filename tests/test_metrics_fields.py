"""Field errors of the per-stage attribution (qsmnet.metrics.fields)."""

import numpy as np
import pytest

from qsmnet.metrics.fields import field_error


def _fields():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(6, 5, 4))
    region = np.zeros(truth.shape, bool)
    region[1:5, 1:4, :3] = True
    return truth, region


def test_a_constant_offset_is_no_error():
    truth, region = _fields()
    out = field_error(truth + 0.7, truth, region)
    # the offset cancels once both are demeaned: only float64 rounding of 0.7 is left
    assert out["nrmse"] < 1e-12 and out["rms_ppb"] < 1e-9 and out["voxels"] == 36


def test_known_error_against_the_definition():
    truth, region = _fields()
    err = np.zeros_like(truth)
    err[region] = np.tile([1.0, -1.0], 18)  # zero mean on the region, RMS exactly 1 ppm
    out = field_error(truth + err + 5.0, truth, region)
    r = truth[region] - truth[region].mean()
    assert out["rms_ppb"] == pytest.approx(1000.0, rel=1e-12)
    assert out["nrmse"] == pytest.approx(100.0 * 6.0 / np.linalg.norm(r), rel=1e-12)
    # outside the region nothing counts
    wild = truth + err
    wild[~region] = 1e6
    assert field_error(wild, truth, region)["nrmse"] == pytest.approx(out["nrmse"], rel=1e-12)


def test_relative_to_another_reference():
    truth, region = _fields()
    ref = 2.0 * truth
    # the same error relative to a reference twice as large is half as large
    a = field_error(truth * 1.1, truth, region)["nrmse"]
    b = field_error(truth * 1.1, truth, region, reference_ppm=ref)["nrmse"]
    assert a == pytest.approx(10.0, rel=1e-12) and b == pytest.approx(5.0, rel=1e-12)


@pytest.mark.parametrize("case, message", [("empty", "empty"), ("shape", "shapes"),
                                           ("nan", "non-finite"), ("flat", "constant")])
def test_refusals(case, message):
    truth, region = _fields()
    est = truth.copy()
    if case == "empty":
        region[:] = False
    elif case == "shape":
        est = est[:-1]
    elif case == "nan":
        est[2, 2, 1] = np.nan
    elif case == "flat":
        truth = np.ones_like(truth)
    with pytest.raises(ValueError, match=message):
        field_error(est, truth, region)
