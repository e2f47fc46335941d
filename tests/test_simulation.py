"""The training-sample simulator: physics (fields recomputed independently), noise level against
the SNR model, value ranges, probabilities, geometry coverage and seed reproducibility."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from qsmnet.physics import GAMMA_BAR_MHZ_PER_T, forward_field, pad_amount, voxel_averaged_field
from qsmnet.simulation import QSMSimulator, SimulationConfig, make_config, simulate_sample
from qsmnet.simulation.acquisition import field_noise_std_ppm
from qsmnet.simulation.masks import AIR, CSF, SKULL
from qsmnet.simulation.sampling import make_generator, scalars
from qsmnet.transforms import resharp


pytestmark = pytest.mark.usefixtures("single_thread")


# Oblique and anisotropic by construction, noise-free, all outputs.
OBLIQUE = dict(voxel_size_range_mm=(0.7, 1.8), isotropic_prob=0.0, inplane_iso_prob=0.0,
               axial_prob=0.0, max_tilt_deg=60.0, noise_free_prob=1.0, with_total_field=True,
               full_mask_prob=0.0)


def _expected_std(snr, te, b0):
    # Independent of the implementation: CRLB of a through-origin phase fit, unit magnitude.
    return 1.0 / (snr * 2.0 * math.pi * GAMMA_BAR_MHZ_PER_T * b0 * math.sqrt(sum(t * t for t in te)))


def test_sample_format():
    s = simulate_sample((24, 20, 16), seed=3)
    for key in ("chi_ppm", "local_field_ppm", "mask"):
        assert s[key].shape == (1, 24, 20, 16) and s[key].dtype == torch.float32
    assert s["voxel_size_mm"].shape == (3,) and s["b0_dir"].shape == (3,)
    assert s["voxel_size_mm"].dtype == torch.float32 and s["b0_dir"].dtype == torch.float32
    assert set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
    assert float(s["b0_dir"].norm()) == pytest.approx(1.0, abs=1e-6)
    # Truth and input vanish outside the mask.
    out = s["mask"] == 0
    assert torch.all(s["chi_ppm"][out] == 0) and torch.all(s["local_field_ppm"][out] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_field_is_forward_model_with_carried_geometry(seed):
    sim = QSMSimulator(**OBLIQUE)
    s, info = sim(28, seed=seed, return_info=True)
    vs, b0 = s["voxel_size_mm"].double(), s["b0_dir"].double()
    assert len(set(round(v, 6) for v in vs.tolist())) == 3  # anisotropic
    assert float(b0[2]) < 0.999                               # oblique
    chi, mask = s["chi_ppm"][0].double(), s["mask"][0].double()
    # Recomputed in float64 from the truth and the geometry the sample carries.
    expected = forward_field(chi, vs, b0) * mask
    scale = float(expected.abs().max())
    assert scale > 1e-3
    assert torch.allclose(s["local_field_ppm"][0].double(), expected, atol=1e-5 * scale)
    # The geometry matters: another direction or voxel size gives a clearly different field.
    other = forward_field(chi, vs, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)) * mask
    assert float((other - expected).abs().max()) > 0.05 * scale
    other = forward_field(chi, vs.flip(0), b0) * mask
    assert float((other - expected).abs().max()) > 0.05 * scale
    # total = local + background, exactly; background is non-zero (outside sources exist).
    assert torch.equal(s["total_field_ppm"], s["local_field_ppm"] + s["background_field_ppm"])
    assert float(s["background_field_ppm"].abs().max()) > 1e-3


def test_background_field_is_field_of_outside_sources():
    sim = QSMSimulator(**OBLIQUE, distant_sources_max=0, shim_residual_ppm=(0.0, 0.0))
    s, info = sim(28, seed=5, return_info=True)
    mask = s["mask"][0].double()
    bg_chi = info["chi_background_ppm"].double()
    assert torch.all(bg_chi[mask > 0] == 0)
    vs, b0 = s["voxel_size_mm"].double(), s["b0_dir"].double()
    expected = voxel_averaged_field(bg_chi, vs, b0, 2, pad=None) * mask
    scale = float(expected.abs().max())
    assert torch.allclose(s["background_field_ppm"][0].double(), expected, atol=1e-5 * scale)
    # background_supersample=1: the voxel-grid field, as before
    s1 = QSMSimulator(**OBLIQUE, distant_sources_max=0, shim_residual_ppm=(0.0, 0.0),
                      background_supersample=1)(28, seed=5)
    # The local field is the same either way, but not the same computation: with 1 it is one of
    # a batched FFT (with the background), with 2 a single one, and the FFT library may round
    # those differently (4e-8 ppm on 6,523 of 21,952 voxels on one machine), so both are
    # compared with the float64 field of their (identical) chi. A float32 FFT convolution of N
    # points is within about eps32 * log2(N) * max|field| of it (N = 60^3 padded: 4.4e-7 ppm,
    # measured 4.8e-8); 1 % more chi in one voxel moves the field by 1.2e-3 ppm.
    assert torch.equal(s1["chi_ppm"], s["chi_ppm"])  # same draws and code: repeats exactly
    local = forward_field(s["chi_ppm"][0].double(), vs, b0) * mask
    n = math.prod(a + b + d for (a, b), d in zip(pad_amount(mask.shape), mask.shape))
    tol = torch.finfo(torch.float32).eps * math.log2(n) * float(local.abs().max())
    for x in (s, s1):
        torch.testing.assert_close(x["local_field_ppm"][0].double(), local, rtol=0, atol=tol)
    grid = forward_field(bg_chi, vs, b0) * mask
    assert torch.allclose(s1["background_field_ppm"][0].double(), grid, atol=1e-5 * scale)


def test_background_field_is_harmonic_in_the_brain_for_oblique_b0():
    # A physical background field is harmonic inside the mask, so RESHARP removes it entirely.
    # With B0 tilted 25 deg the voxel-grid field of the +9.4 ppm air around the head is not
    # (0.019-0.022 ppm left, as large as the local field); averaged over 2x2x2 sub-voxels < 1e-4.
    tilt = math.radians(25.0)
    kw = dict(voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(math.sin(tilt), 0.0, math.cos(tilt)),
              full_mask_prob=0.0, head_air_prob=1.0, skull_prob=1.0, mask_radius_frac=(0.6, 0.7),
              mask_center_jitter=0.0, noise_free_prob=1.0, with_total_field=True,
              distant_sources_max=0, shim_residual_ppm=(0.0, 0.0))
    left = {}
    for k in (1, 2):
        s = QSMSimulator(**kw, background_supersample=k)(64, seed=0)
        mask = s["mask"][0] > 0
        out, out_mask = resharp(s["background_field_ppm"][0], mask, (1.0, 1.0, 1.0))
        left[k] = float(out[out_mask].pow(2).mean().sqrt())
        local = s["local_field_ppm"][0][mask]
        local_rms = float((local - local.mean()).pow(2).mean().sqrt())
    assert left[2] < 1e-4 < 0.01 < left[1]
    assert left[2] < 0.01 * local_rms


def test_noise_std_matches_snr():
    snr = 40.0
    sim = QSMSimulator(snr_range=(snr, snr), noise_free_prob=0.0, full_mask_prob=1.0)
    s, info = sim(32, seed=11, return_info=True)
    clean = forward_field(s["chi_ppm"][0], s["voxel_size_mm"], s["b0_dir"])
    noise = s["local_field_ppm"][0] - clean
    expected = _expected_std(snr, info["te_s"], info["b0_t"])
    assert float(s["noise_std_ppm"]) == pytest.approx(expected, rel=1e-5)
    assert float(noise.std()) == pytest.approx(expected, rel=0.1)
    assert abs(float(noise.mean())) < 0.1 * expected


def test_field_noise_model_matches_monte_carlo_phase_fit():
    """The SNR -> field-noise formula against a simulated complex-noise multi-echo fit."""
    g = torch.Generator().manual_seed(0)
    te = torch.tensor([0.004, 0.010, 0.016, 0.022], dtype=torch.float64)
    b0, snr, n = 3.0, 50.0, 200_000
    mag = torch.exp(-te * 30.0)
    field = 0.02
    phase = 2 * math.pi * GAMMA_BAR_MHZ_PER_T * b0 * te * field
    sig = torch.polar(mag, phase).reshape(-1, 1).expand(-1, n)
    noise = torch.complex(torch.randn(4, n, generator=g, dtype=torch.float64),
                          torch.randn(4, n, generator=g, dtype=torch.float64)) / snr
    ph = torch.angle(sig + noise)
    # Weighted least squares through the origin (known phase offset), weights m^2.
    w = mag.reshape(-1, 1) ** 2
    slope = (w * te.reshape(-1, 1) * ph).sum(0) / (w * te.reshape(-1, 1) ** 2).sum(0)
    est = slope / (2 * math.pi * GAMMA_BAR_MHZ_PER_T * b0)
    model = field_noise_std_ppm(snr, te.tolist(), b0, mag.reshape(-1, 1, 1, 1).float())
    assert float(est.std()) == pytest.approx(float(model.reshape(-1)[0]), rel=0.05)
    assert float(est.mean()) == pytest.approx(field, rel=0.01)


def test_chi_ranges_and_truth_zero_outside_mask():
    cfg = make_config(strong_prob=0.0, chi_scale_prob=0.0)
    lo, hi = cfg.tissue_range_ppm
    for seed in range(6):
        s = simulate_sample(20, seed, cfg)
        chi = s["chi_ppm"]
        assert float(chi.min()) >= lo - 1e-6 and float(chi.max()) <= hi + 1e-6
    scaled = make_config(strong_prob=1.0, chi_scale_prob=1.0, chi_scale_range=(1.8, 2.0),
                         haemorrhage_ppm=(1.4, 1.5), chi_limits_ppm=(-2.5, 2.5))
    peaks = []
    for seed in range(4):
        s = simulate_sample(20, seed, scaled, voxel_size_mm=(1, 1, 1))
        assert float(s["chi_ppm"].min()) >= -2.5 - 1e-6 and float(s["chi_ppm"].max()) <= 2.5 + 1e-6
        peaks.append(float(s["chi_ppm"].abs().max()))
    assert max(peaks) > 1.5 * hi  # the scaling widens the range


def test_strong_sources_appear_with_configured_probability():
    p = 0.3
    cfg = make_config(strong_prob=p, chi_scale_prob=0.0, voxel_size_mm=(1.0, 1.0, 1.0),
                      strong_radius_mm_log=(2.0, 3.0), haemorrhage_ppm=(0.9, 1.5),
                      calcification_ppm=(-1.5, -0.8), shapes_count=(0, 2), vessels_count=(0, 0))
    sim = QSMSimulator(cfg)
    n, hits, signs = 200, 0, []
    for seed in range(n):
        s, info = sim(12, seed=seed, return_info=True)
        strong_visible = float(s["chi_ppm"].abs().max()) > 0.75
        assert strong_visible == (info["n_strong"] > 0)
        hits += info["n_strong"] > 0
        signs += [v > 0 for v in info["strong_values"]]
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) < 3.5 * sd
    assert 0.15 < np.mean(signs) < 0.85  # both haemorrhage- and calcification-like


def test_air_and_skull_outside_mask():
    sim = QSMSimulator(full_mask_prob=0.0, head_air_prob=1.0, skull_prob=1.0,
                       mask_radius_frac=(0.35, 0.45), mask_center_jitter=0.0,
                       voxel_size_mm=(1.5, 1.5, 1.5), with_total_field=True,
                       air_ppm=(9.3, 9.5))
    s, info = sim(40, seed=2, return_info=True)
    labels, bg = info["labels"], info["chi_background_ppm"]
    mask = s["mask"][0] > 0
    air = (labels == AIR) & ~mask
    assert int(air.sum()) > 100 and int((labels == SKULL).sum()) > 100
    assert float(bg[air].median()) == pytest.approx(9.4, abs=0.1)
    assert -2.5 <= float(bg[labels == SKULL].median()) <= -1.5
    assert torch.all(bg[mask] == 0)
    # Air next to the head gives a background field far larger than the tissue field.
    assert float(s["background_field_ppm"].abs().max()) > 5 * float(s["local_field_ppm"].abs().max())


def test_seeds_reproduce_exactly():
    sim = QSMSimulator(acquisition=True, with_total_field=True)
    a = sim(20, seed=7)
    b = sim(20, seed=7)
    c = sim(20, seed=8)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["chi_ppm"], c["chi_ppm"])
    # A generator passed in gives the same sample as its seed.
    d = sim(20, generator=make_generator(7))
    assert torch.equal(a["local_field_ppm"], d["local_field_ppm"])


def test_b0_tilt_and_voxel_sizes_within_range_and_covering_it():
    max_tilt, vr = 50.0, (0.6, 2.0)
    sim = QSMSimulator(max_tilt_deg=max_tilt, axial_prob=0.0, voxel_size_range_mm=vr)
    tilts, coss, sizes = [], [], []
    for seed in range(600):
        vs, b0 = sim.draw_geometry(scalars(make_generator(seed), 8))
        assert math.isclose(math.hypot(*b0), 1.0, rel_tol=1e-9)
        coss.append(b0[2])
        tilts.append(math.degrees(math.acos(min(1.0, b0[2]))))
        sizes.extend(vs)
    assert max(tilts) <= max_tilt + 1e-9 and max(tilts) > 0.97 * max_tilt
    # Uniform on the cap: cos(theta) uniform on [cos(max), 1].
    cmin = math.cos(math.radians(max_tilt))
    assert np.mean(coss) == pytest.approx((1 + cmin) / 2, abs=0.02)
    assert np.mean(np.array(coss) < (1 + cmin) / 2) == pytest.approx(0.5, abs=0.06)
    assert min(sizes) >= vr[0] and max(sizes) <= vr[1]
    assert min(sizes) < vr[0] + 0.05 and max(sizes) > vr[1] - 0.05
    # Full samples carry the geometry they drew.
    for seed in range(3):
        s, info = sim(12, seed=seed, return_info=True)
        assert s["b0_dir"].tolist() == pytest.approx(list(info["b0_dir"]), abs=1e-7)
        assert s["voxel_size_mm"].tolist() == pytest.approx(list(info["voxel_size_mm"]), abs=1e-6)
        assert info["tilt_deg"] <= max_tilt + 1e-6


def test_fixed_geometry_and_axial_probability():
    s = simulate_sample(12, 0, voxel_size_mm=(0.8, 0.8, 2.0), b0_dir=(0.0, 0.6, 0.8))
    assert s["voxel_size_mm"].tolist() == pytest.approx([0.8, 0.8, 2.0])
    assert s["b0_dir"].tolist() == pytest.approx([0.0, 0.6, 0.8])
    sim = QSMSimulator(axial_prob=1.0)
    assert sim.draw_geometry(scalars(make_generator(1), 8))[1] == (0.0, 0.0, 1.0)


def test_masks_vary_full_small_and_touching_border():
    sim = QSMSimulator(full_mask_prob=0.25)
    fracs, border = [], []
    for seed in range(24):
        s = sim(24, seed=seed)
        m = s["mask"][0] > 0
        assert int(m.sum()) > 0
        fracs.append(float(m.float().mean()))
        faces = [m[0], m[-1], m[:, 0], m[:, -1], m[:, :, 0], m[:, :, -1]]
        border.append(any(bool(f.any()) for f in faces))
    fracs = np.array(fracs)
    assert np.any(fracs == 1.0) and np.any(fracs < 0.15) and np.any((fracs > 0.15) & (fracs < 1))
    assert any(b for b, f in zip(border, fracs) if f < 1.0)          # partial masks touching
    assert any(not b for b in border)                                 # and masks inside


def test_acquisition_sample():
    te = (0.004, 0.009, 0.014)
    sim = QSMSimulator(acquisition=True, with_total_field=True, te_s=te, noise_free_prob=1.0,
                       full_mask_prob=0.0, b0_t_choices=(7.0,))
    s, info = sim(24, seed=4, return_info=True)
    assert s["phase"].shape == (3, 24, 24, 24) and s["magnitude"].shape == (3, 24, 24, 24)
    assert s["te_s"].tolist() == pytest.approx(list(te)) and float(s["b0_t"]) == 7.0
    ph = s["phase"]
    assert float(ph.min()) >= -math.pi - 1e-6 and float(ph.max()) < math.pi
    # Echo differences encode the total field inside the mask (phi0 cancels), modulo 2 pi.
    m = s["mask"][0] > 0
    dphi = (ph[2] - ph[0])[m].double()
    expected = 2 * math.pi * GAMMA_BAR_MHZ_PER_T * 7.0 * (te[2] - te[0]) * s["total_field_ppm"][0][m].double()
    resid = torch.remainder(dphi - expected + math.pi, 2 * math.pi) - math.pi
    assert float(resid.abs().max()) < 2e-3
    # R2* decay: later echoes are darker inside the brain.
    mag = s["magnitude"][:, m]
    assert torch.all(mag[1] < mag[0]) and torch.all(mag[2] < mag[1])
    # The noise-free local field is the forward model (acquisition does not change it).
    expected = forward_field(s["chi_ppm"][0], s["voxel_size_mm"], s["b0_dir"]) * s["mask"][0]
    assert torch.allclose(s["local_field_ppm"][0], expected, atol=1e-5 * float(expected.abs().max()))


def test_acquisition_noise_at_peak_snr():
    sim = QSMSimulator(acquisition=True, snr_range=(25.0, 25.0), noise_free_prob=0.0,
                       full_mask_prob=0.0, head_air_prob=1.0, mask_radius_frac=(0.3, 0.35),
                       mask_center_jitter=0.0, voxel_size_mm=(2.0, 2.0, 2.0), air_blobs_max=0)
    s, info = sim(32, seed=1, return_info=True)
    sigma = info["signal_sigma"]
    peak = float((info["m0"] * torch.exp(-float(s["te_s"][0]) * info["r2star"])).max())
    assert sigma == pytest.approx(peak / 25.0, rel=1e-4)
    # In air the magnitude is pure noise: Rayleigh with mean sigma * sqrt(pi / 2).
    air = info["labels"] == AIR
    assert int(air.sum()) > 500
    assert float(s["magnitude"][0][air].mean()) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.1)


def test_config_validation_and_overrides():
    with pytest.raises(TypeError, match="max_tilt"):
        make_config(max_tilt=30)
    with pytest.raises(ValueError):
        make_config(voxel_size_range_mm=(2.0, 1.0))
    with pytest.raises(ValueError):
        make_config(te_s=(4.0, 12.0))  # milliseconds
    with pytest.raises(ValueError):
        make_config(strong_prob=1.5)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="background_supersample"):
            make_config(background_supersample=bad)
    cfg = make_config({"_target_": "x", "max_tilt_deg": 30, "snr_range": [10, 20]})
    assert cfg.max_tilt_deg == 30 and cfg.snr_range == (10, 20)
    assert isinstance(SimulationConfig().replace(acquisition=True), SimulationConfig)


def test_field_support_is_the_csf_rim_with_the_field_measured_on_it():
    """``field_margin_mm``: the mask and the CSF within the margin, the field of the mask's chi
    and of the head around it on that region (recomputed independently), and every other
    output exactly as without it (the random draws do not change)."""
    kw = dict(OBLIQUE, voxel_size_range_mm=(1.0, 1.0), head_air_prob=1.0, skull_prob=1.0,
              mask_radius_frac=(0.6, 0.7), mask_center_jitter=0.0, csf_mm=(3.0, 4.0),
              background_supersample=1, distant_sources_max=0, shim_residual_ppm=(0.0, 0.0))
    plain = QSMSimulator(**kw)(40, seed=4)
    s, info = QSMSimulator(**kw, field_margin_mm=2.0)(40, seed=4, return_info=True)
    for key in ("chi_ppm", "local_field_ppm", "mask", "background_field_ppm"):
        assert torch.equal(s[key], plain[key]), key
    mask, support = s["mask"][0] > 0, s["field_support"][0] > 0
    rim = support & ~mask
    assert torch.all(support[mask]) and int(rim.sum()) > 0.1 * int(mask.sum())
    # the rim is the CSF within 2 mm of the mask, as qsmnet predict picks it from magnitude
    assert torch.all(info["labels"][rim] == CSF)
    dist = torch.from_numpy(ndimage.distance_transform_edt(~mask.numpy()))
    assert float(dist[rim].max()) <= 2.0
    assert torch.all(support[(info["labels"] == CSF) & (dist <= 1.0)])
    vs, b0 = s["voxel_size_mm"].double(), s["b0_dir"].double()
    local = forward_field(s["chi_ppm"][0].double(), vs, b0)
    total = forward_field(s["chi_ppm"][0].double() + info["chi_background_ppm"].double(), vs, b0)
    scale = float(local[support].abs().max())
    sup = support.double()
    assert torch.allclose(s["local_field_support_ppm"][0].double(), local * sup,
                          atol=1e-5 * scale)
    assert torch.allclose(s["total_field_ppm"][0].double(), total * sup,
                          atol=1e-4 * float(total[support].abs().max()))
    with pytest.raises(ValueError, match="with_total_field"):
        SimulationConfig(field_margin_mm=2.0)
    with pytest.raises(ValueError, match="field_margin_mm"):
        SimulationConfig(field_margin_mm=-1.0, with_total_field=True)
