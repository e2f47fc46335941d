"""qsmnet.training.metrics: the demeaned NRMSE by its formula and against qsm-ci's own functions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qsmnet.training import metrics
from qsmnet.training.metrics import nrmse_demeaned, volume_metrics


def _volumes(seed=0, shape=(12, 13, 14)):
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(shape)
    mask = np.zeros(shape, bool)
    mask[2:10, 3:11, 2:12] = True
    return truth, mask, rng


def test_nrmse_known_values():
    truth, mask, rng = _volumes()
    # an offset is removed by the demeaning; a scale error a gives exactly 100 |a - 1| %
    assert nrmse_demeaned(truth + 3.0, truth, mask) == pytest.approx(0.0, abs=1e-12)
    assert nrmse_demeaned(1.25 * truth - 0.7, truth, mask) == pytest.approx(25.0, rel=1e-12)
    # values outside the mask do not count
    outside = np.where(mask, truth, 1e3 * rng.standard_normal(truth.shape))
    assert nrmse_demeaned(outside, truth, mask) == pytest.approx(0.0, abs=1e-12)
    # the formula written out in numpy
    recon = truth + 0.3 * rng.standard_normal(truth.shape)
    r, t = recon[mask] - recon[mask].mean(), truth[mask] - truth[mask].mean()
    assert nrmse_demeaned(recon, truth, mask.astype(np.uint8)) == \
        pytest.approx(100 * np.linalg.norm(r - t) / np.linalg.norm(t), rel=1e-12)


def test_nrmse_is_nan_without_a_reference():
    truth, mask, _ = _volumes()
    assert math.isnan(nrmse_demeaned(truth, truth, np.zeros_like(mask)))
    assert math.isnan(nrmse_demeaned(truth, np.full(truth.shape, 2.0), mask))  # constant truth


def test_volume_metrics_are_qsm_ci_functions():
    qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")
    truth, mask, rng = _volumes(seed=1, shape=(20, 20, 20))
    recon = (0.9 * truth + 0.1 * rng.standard_normal(truth.shape)).astype(np.float32)
    out = volume_metrics(recon, truth, mask)
    r64 = recon.astype(np.float64)  # volume_metrics works in float64
    nrmse, nrmse_dt = qsm_eval.nrmse_challenge(r64, truth, mask)
    assert out["nrmse"] == pytest.approx(float(nrmse), rel=1e-12)
    assert out["nrmse_detrended"] == pytest.approx(float(nrmse_dt), rel=1e-12)
    assert out["hfen"] == pytest.approx(float(qsm_eval.hfen(r64, truth, mask)), rel=1e-12)
    assert out["xsim"] == pytest.approx(float(qsm_eval.xsim(r64, truth, mask)), rel=1e-12)
    # qsm-ci's demeaned NRMSE is the formula of nrmse_demeaned (the fallback without qsm-ci)
    assert out["nrmse"] == pytest.approx(nrmse_demeaned(recon, truth, mask), rel=1e-9)
    assert set(volume_metrics(recon, truth, mask, full=False)) == {"nrmse"}


def test_volume_metrics_without_qsm_ci_is_the_demeaned_nrmse(monkeypatch):
    truth, mask, rng = _volumes(seed=2)
    recon = truth + 0.2 * rng.standard_normal(truth.shape)
    monkeypatch.setattr(metrics, "_qsm_eval", None)
    assert volume_metrics(recon, truth, mask) == {"nrmse": nrmse_demeaned(recon, truth, mask)}
