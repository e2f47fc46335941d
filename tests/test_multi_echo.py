"""Multi-echo field mapping: offset removal, temporal unwrapping, WLS fit, FieldMapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qsmnet.physics.units import GAMMA_BAR_MHZ_PER_T, wrap_phase
from qsmnet.transforms import (
    MultiEchoFit,
    PhaseOffsetRemoval,
    TemporalUnwrap,
    check_te_s,
    fit_field_wls,
    gaussian_smooth_mm,
    mcpc3ds_phase_offset,
    temporal_unwrap,
)
from qsmnet.transforms.base import Compose
from qsmnet.transforms.field_mapping import FieldMapping
from qsmnet.transforms.masking import BrainMask

TE = (0.004, 0.009, 0.014, 0.019)
B0 = 3.0


pytestmark = pytest.mark.usefixtures("single_thread")


def _grid(shape, vs, dtype=torch.float64):
    ax = [(torch.arange(n, dtype=dtype) - (n - 1) / 2.0) * h for n, h in zip(shape, vs)]
    return torch.meshgrid(*ax, indexing="ij")


def ppm_to_rad(te_s, b0_t=B0):
    return 2.0 * math.pi * GAMMA_BAR_MHZ_PER_T * b0_t * te_s


def make_acq(shape=(36, 32, 24), vs=(1.0, 1.0, 1.5), te=TE, b0=B0, noise=0.0,
             offset="quadratic", seed=0, background=0.02):
    """Smooth field (ppm) with a dipole, wrapped at every echo after the first; smooth phase
    offset; T2* decay; ``background`` signal outside the mask; optional complex Gaussian noise
    of std ``noise`` per channel."""
    x, y, z = _grid(shape, vs)
    mask = (x / 16) ** 2 + (y / 14) ** 2 + (z / 16) ** 2 <= 1
    r2 = (x - 2) ** 2 + (y + 1) ** 2 + z ** 2 + 16.0
    field = (0.004 * x ** 2 - 0.003 * y ** 2 + 0.02 * x + 0.01 * z
             + 60.0 * (3 * z ** 2 - r2) / r2 ** 2.5)
    field = field - field[mask].mean()
    if offset == "quadratic":
        phi0 = 0.9 - 0.004 * (x ** 2 + 0.5 * y ** 2) + 0.05 * z
    elif offset == "smooth":  # not a polynomial
        phi0 = 1.2 * torch.sin(x / 9.0 + 0.3) * torch.cos(y / 11.0) + 0.04 * z + 0.5
    else:
        phi0 = torch.zeros_like(x)
    te_t = torch.tensor(te, dtype=torch.float64).reshape(-1, 1, 1, 1)
    m0 = torch.where(mask, 1.0 + 0.1 * torch.cos(x / 3.0), torch.full_like(x, background))
    mag = m0 * torch.exp(-te_t / 0.04)
    sig = mag * torch.exp(1j * (phi0 + ppm_to_rad(te_t, b0) * field))
    if noise > 0:
        g = torch.Generator().manual_seed(seed)
        sig = sig + noise * torch.complex(torch.randn(sig.shape, generator=g, dtype=torch.float64),
                                          torch.randn(sig.shape, generator=g, dtype=torch.float64))
    return dict(phase=torch.angle(sig), magnitude=sig.abs(), te_s=te, b0_t=b0, mask=mask,
                voxel_size_mm=vs, field=field, phi0=phi0)


# ------------------------------------------------------------------------------------------
# Echo times
# ------------------------------------------------------------------------------------------

def test_te_in_milliseconds_raises_clear_error():
    with pytest.raises(ValueError, match="milliseconds"):
        check_te_s([4.0, 9.0, 14.0])
    a = make_acq(shape=(12, 12, 10))
    with pytest.raises(ValueError, match="milliseconds"):
        FieldMapping()(a["phase"], a["magnitude"], [4.0, 9.0, 14.0, 19.0], B0, a["mask"])
    with pytest.raises(ValueError, match="milliseconds"):
        MultiEchoFit()(a["phase"], [4.0, 9.0, 14.0, 19.0], B0)
    with pytest.raises(ValueError, match="echo times"):
        check_te_s([0.004, 0.008], n_echoes=3)
    with pytest.raises(ValueError, match="strictly increasing"):
        check_te_s([0.004, 0.004])
    with pytest.raises(ValueError, match="strictly increasing"):
        check_te_s([0.008, 0.004])
    with pytest.raises(ValueError, match="positive"):
        check_te_s([0.0, 0.004])


# ------------------------------------------------------------------------------------------
# Weighted least squares
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["magnitude2", "magnitude", "uniform"])
def test_wls_slope_equals_numpy_lstsq(weighting):
    rng = np.random.default_rng(0)
    te = np.array([0.003, 0.0071, 0.0124, 0.018, 0.026])
    phase = rng.normal(size=(5, 4, 5, 6)) * 3.0
    mag = rng.uniform(0.2, 2.0, size=phase.shape)
    field, _ = fit_field_wls(torch.from_numpy(phase), te, B0, torch.from_numpy(mag),
                             weighting=weighting, noise_std=1.0)
    w = {"magnitude2": mag ** 2, "magnitude": mag, "uniform": np.ones_like(mag)}[weighting]
    expected = np.empty(phase.shape[1:])
    for idx in np.ndindex(*phase.shape[1:]):
        sw = np.sqrt(w[(slice(None), *idx)])
        beta = np.linalg.lstsq((sw * te)[:, None], sw * phase[(slice(None), *idx)],
                               rcond=None)[0][0]
        expected[idx] = beta / (2 * math.pi * 42.57747892 * B0)
    np.testing.assert_allclose(field.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_fit_exact_on_noise_free_unwrapped_phase_and_phase_sign():
    a = make_acq(offset="none")
    te_t = torch.tensor(TE, dtype=torch.float64).reshape(-1, 1, 1, 1)
    unwrapped = ppm_to_rad(te_t) * a["field"]
    f, noise = MultiEchoFit()(unwrapped, TE, B0, a["magnitude"], a["mask"])
    torch.testing.assert_close(f, a["field"], atol=1e-12, rtol=0)
    assert float(noise.max()) < 1e-9  # no residual: the estimated noise is ~0
    f_neg, _ = MultiEchoFit(phase_sign=-1)(unwrapped, TE, B0, a["magnitude"], a["mask"])
    torch.testing.assert_close(f_neg, -a["field"], atol=1e-12, rtol=0)


def test_noise_map_matches_empirical_std():
    """Known complex noise: the field std and the noise map agree with the propagated value."""
    shape = (32, 32, 32)
    sigma = 0.02
    te = torch.tensor(TE, dtype=torch.float64).reshape(-1, 1, 1, 1)
    mag0 = torch.exp(-te / 0.03).expand(-1, *shape)
    field = torch.full(shape, 0.05, dtype=torch.float64)  # phase < 1 rad: no wraps
    g = torch.Generator().manual_seed(5)
    sig = mag0 * torch.exp(1j * ppm_to_rad(te) * field)
    sig = sig + sigma * torch.complex(torch.randn(sig.shape, generator=g, dtype=torch.float64),
                                      torch.randn(sig.shape, generator=g, dtype=torch.float64))
    phase, mag = torch.angle(sig), sig.abs()
    mask = torch.ones(shape, dtype=torch.bool)
    expected = sigma / math.sqrt(float((mag0[:, 0, 0, 0] ** 2 * te.reshape(-1) ** 2).sum()))
    expected /= 2 * math.pi * GAMMA_BAR_MHZ_PER_T * B0
    f, noise_est = fit_field_wls(phase, TE, B0, mag, mask)  # sigma estimated from residuals
    _, noise_known = fit_field_wls(phase, TE, B0, mag, mask, noise_std=sigma)
    empirical = float((f - field).std())
    assert abs(empirical / expected - 1) < 0.03, (empirical, expected)
    assert abs(float(noise_known.mean()) / expected - 1) < 0.03
    assert abs(float(noise_est.mean()) / expected - 1) < 0.03
    assert abs(float(f.mean()) - 0.05) < 3 * expected / math.sqrt(f.numel()) + 1e-6


# ------------------------------------------------------------------------------------------
# Temporal unwrapping and offset removal
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("progressive", [True, False])
def test_temporal_unwrap_exact(progressive):
    a = make_acq(offset="none")
    te_t = torch.tensor(TE, dtype=torch.float64).reshape(-1, 1, 1, 1)
    truth = ppm_to_rad(te_t) * a["field"]
    assert float(truth.abs().max()) > 3 * math.pi  # later echoes are wrapped
    got = temporal_unwrap(wrap_phase(truth), TE, truth[0], 0, a["magnitude"], progressive)
    torch.testing.assert_close(got, truth, atol=1e-9, rtol=0)
    # From a later reference echo too, and through the transform.
    got2 = TemporalUnwrap(ref_index=2, progressive=progressive)(wrap_phase(truth), TE, truth[2])
    torch.testing.assert_close(got2, truth, atol=1e-9, rtol=0)


@pytest.mark.parametrize("offset,tol_rad", [("quadratic", 1e-9), ("smooth", 0.12)])
def test_mcpc3ds_recovers_phase_offset(offset, tol_rad):
    a = make_acq(offset=offset)
    est, evolution = mcpc3ds_phase_offset(a["phase"], a["magnitude"], TE, a["mask"],
                                          a["voxel_size_mm"])
    m = a["mask"]
    err = wrap_phase(est - a["phi0"])[m]
    assert float(err.abs().max()) < tol_rad
    # The evolution is the field phase at TE1 (mean in the mask is ~0 here: no 2pi ambiguity).
    torch.testing.assert_close(evolution[m], (ppm_to_rad(TE[0]) * a["field"])[m],
                               atol=1e-9, rtol=0)
    corrected, off = PhaseOffsetRemoval()(a["phase"], a["magnitude"], TE, m, a["voxel_size_mm"])
    torch.testing.assert_close(off, est)
    torch.testing.assert_close(corrected, wrap_phase(a["phase"] - est))


def test_gaussian_smooth_matches_scipy():
    from scipy import ndimage

    x = torch.randn(20, 18, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    vs = (1.0, 1.5, 2.0)
    sigma_mm = 3.0
    ours = gaussian_smooth_mm(x, sigma_mm, vs)
    ref = ndimage.gaussian_filter(x.numpy(), [sigma_mm / h for h in vs], mode="constant",
                                  truncate=6.0)
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-3)


# ------------------------------------------------------------------------------------------
# The FieldMapping chain
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset,tol_ppm", [("none", 1e-10), ("quadratic", 1e-8),
                                            ("smooth", 0.02)])
def test_field_mapping_noise_free(offset, tol_ppm):
    a = make_acq(offset=offset)
    f, mask, noise = FieldMapping()(a["phase"], a["magnitude"], TE, B0, a["mask"],
                                    a["voxel_size_mm"])
    m = a["mask"]
    assert torch.equal(mask, m)
    err = (f - a["field"])[m]
    assert float(err.abs().max()) < tol_ppm
    assert float(f[~m].abs().max()) == 0.0 and float(noise[~m].abs().max()) == 0.0


def test_field_mapping_torch_dct_path(monkeypatch):
    """The device-agnostic torch DCT (used off the CPU) gives the same field as scipy's."""
    import qsmnet.transforms.unwrap as U

    a = make_acq(offset="smooth", noise=0.005, shape=(24, 22, 16))
    args = (a["phase"], a["magnitude"], TE, B0, a["mask"], a["voxel_size_mm"])
    ref, _, _ = FieldMapping()(*args)
    monkeypatch.setattr(U, "_SCIPY_DCT_ON_CPU", False)
    got, _, _ = FieldMapping()(*args)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_field_mapping_with_noise_std_as_predicted():
    a = make_acq(offset="smooth", noise=0.01, seed=3)
    f, _, noise = FieldMapping()(a["phase"], a["magnitude"], TE, B0, a["mask"],
                                 a["voxel_size_mm"])
    m = a["mask"]
    err = (f - a["field"])[m]
    predicted = float(noise[m].pow(2).mean().sqrt())
    # Noise plus a small smoothing bias of the (non-polynomial) offset; no wrong 2pi counts.
    assert float(err.abs().max()) < 0.03
    assert float(err.std()) < 2.0 * predicted + 0.002


def test_single_echo():
    a = make_acq(offset="none", te=(0.006,))
    f, _, noise = FieldMapping()(a["phase"], a["magnitude"], (0.006,), B0, a["mask"],
                                 a["voxel_size_mm"])
    m = a["mask"]
    torch.testing.assert_close(f[m], a["field"][m], atol=1e-10, rtol=0)
    assert bool(torch.all(noise[m] >= 0))
    # Single-echo noise level comes from the background (Rayleigh) outside the mask.
    a = make_acq(offset="none", te=(0.006,), noise=0.01, seed=2, background=0.0)
    _, _, noise = FieldMapping()(a["phase"], a["magnitude"], (0.006,), B0, a["mask"],
                                 a["voxel_size_mm"])
    expected = 0.01 / (a["magnitude"][0][m] * ppm_to_rad(0.006))
    ratio = float((noise[m] / expected).median())
    assert abs(ratio - 1) < 0.15


def test_batch_and_per_sample_te():
    a = make_acq(offset="quadratic", shape=(24, 22, 16))
    b = make_acq(offset="smooth", shape=(24, 22, 16))
    phase = torch.stack([a["phase"], b["phase"]])
    mag = torch.stack([a["magnitude"], b["magnitude"]])
    mask = torch.stack([a["mask"], b["mask"]])
    fm = FieldMapping()
    f, m, _ = fm(phase, mag, TE, B0, mask, a["voxel_size_mm"])
    for i, s in enumerate((a, b)):
        fi, _, _ = fm(s["phase"], s["magnitude"], TE, B0, s["mask"], s["voxel_size_mm"])
        torch.testing.assert_close(f[i], fi, atol=1e-9, rtol=0)
    # (B, E) echo times: the second sample has its echoes scaled by 1.1.
    te2 = tuple(1.1 * t for t in TE)
    c = make_acq(offset="quadratic", shape=(24, 22, 16), te=te2)
    f2, _, _ = fm(torch.stack([a["phase"], c["phase"]]),
                  torch.stack([a["magnitude"], c["magnitude"]]),
                  torch.tensor([TE, te2], dtype=torch.float64), B0,
                  torch.stack([a["mask"], c["mask"]]), a["voxel_size_mm"])
    for i, s in enumerate((a, c)):
        sel = s["mask"]
        torch.testing.assert_close(f2[i][sel], s["field"][sel], atol=1e-8, rtol=0)


def test_float32_and_auto_mask_and_dict_twin():
    a = make_acq(offset="quadratic")
    sample = {"phase": a["phase"].float(), "magnitude": a["magnitude"].float(), "te_s": TE,
              "b0_t": B0, "voxel_size_mm": a["voxel_size_mm"], "subject": "x"}
    out = Compose([FieldMapping()])(sample)
    assert out["subject"] == "x" and out["total_field_ppm"].dtype == torch.float32
    auto = BrainMask()(sample["magnitude"], None, a["voxel_size_mm"])
    assert torch.equal(out["mask"], auto)
    sel = out["mask"] & a["mask"]
    assert float((out["total_field_ppm"] - a["field"])[sel].abs().max()) < 1e-4
    # With a mask in the sample, it is used as is.
    sample["mask"] = a["mask"]
    out = FieldMapping().apply(sample)
    assert torch.equal(out["mask"], a["mask"])
    assert float((out["total_field_ppm"] - a["field"])[a["mask"]].abs().max()) < 1e-4
    # The step transforms' dict twins.
    s2 = PhaseOffsetRemoval().apply(sample)
    assert s2["phase"].shape == sample["phase"].shape and "phase_offset_rad" in s2
    no_mask = {k: v for k, v in sample.items() if k != "mask"}
    assert PhaseOffsetRemoval().apply(no_mask)["phase_offset_rad"].shape == a["mask"].shape
    te_t = torch.tensor(TE).reshape(-1, 1, 1, 1)
    s3 = MultiEchoFit().apply({**sample, "phase": (ppm_to_rad(te_t) * a["field"]).float()})
    assert float((s3["total_field_ppm"] - a["field"]).abs().max()) < 1e-5


def test_field_mapping_with_an_automatic_mask_transform_recovers_the_field():
    fm = FieldMapping(mask_transform=BrainMask(threshold="otsu", combine="rss"))
    a = make_acq(shape=(20, 18, 14), offset="quadratic")
    f, _, _ = fm(a["phase"], a["magnitude"], TE, B0, a["mask"], a["voxel_size_mm"])
    assert float((f - a["field"])[a["mask"]].abs().max()) < 1e-6
