"""Total-field inversion (qsmnet.transforms.tfi) against analytic fields and painted truths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsmnet.inference.options import ReconOptions
from qsmnet.inference.pipeline import reconstruct
from qsmnet.physics import forward_field
from qsmnet.transforms.background import BFR_TRANSFORMS, make_bfr_transform, pdf
from qsmnet.transforms.tfi import (
    NOISE_FLOOR_FRAC,
    TFIBackground,
    tfi_weights,
    total_field_inversion,
)

SHAPE = (48, 48, 48)
VS = (1.0, 1.0, 1.0)
B0 = (0.0, 0.0, 1.0)
# a short budget: the tests check the model, not the last digit of convergence
FAST = {"outer_iterations": 4, "cg_iterations": 40, "pad": 16}


def _coords():
    ax = [np.arange(n) - (n - 1) / 2.0 for n in SHAPE]
    return np.stack(np.meshgrid(*ax, indexing="ij"))


def _sphere_field(coords, centre, radius, chi, b0=B0):
    """Analytic field (ppm) of a uniform sphere, valid outside it: chi/3 (a/r)^3 (3cos^2 - 1)."""
    d = coords - np.asarray(centre, dtype=float).reshape(3, 1, 1, 1)
    r = np.sqrt((d ** 2).sum(0))
    cos_t = np.tensordot(np.asarray(b0) / np.linalg.norm(b0), d, axes=1) / np.maximum(r, 1e-9)
    return chi / 3.0 * (radius / np.maximum(r, radius)) ** 3 * (3 * cos_t ** 2 - 1)


@pytest.fixture(scope="module")
def problem():
    """A ball of 'brain' (radius 12) with two sources, and air spheres outside it."""
    c = _coords()
    r = np.sqrt((c ** 2).sum(0))
    mask = r <= 12.0
    chi = np.zeros(SHAPE)
    chi[np.sqrt(((c - np.array([4, 0, 2]).reshape(3, 1, 1, 1)) ** 2).sum(0)) <= 4] = 0.1
    chi[np.sqrt(((c - np.array([-4, 3, -3]).reshape(3, 1, 1, 1)) ** 2).sum(0)) <= 3] = -0.06
    chi = torch.from_numpy(chi * mask)
    local = forward_field(chi, VS, B0, pad="auto")
    # air (-9.4 ppm against tissue) 7-9 mm beyond the brain's edge, in the band TFI models
    background = (_sphere_field(c, (20, 0, 0), 4.0, -9.4)
                  + _sphere_field(c, (0, -13, 14), 4.0, -9.4))
    total = local + torch.from_numpy(background)
    return {"mask": torch.from_numpy(mask), "chi": chi, "local": local,
            "background": torch.from_numpy(background), "total": total}


def _rel(a, b, m):
    a, b = a[m] - a[m].mean(), b[m] - b[m].mean()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_background_is_far_stronger_than_the_local_field(problem):
    m = problem["mask"]
    # the test is only meaningful if the background dominates the brain's own field
    assert _rel(problem["total"], problem["local"], m) > 5.0


def test_tfi_recovers_the_local_field_and_chi(problem):
    m = problem["mask"]
    chi, local, background = total_field_inversion(problem["total"], m, VS, B0, **FAST)
    assert chi.shape == SHAPE and bool((chi[~m] == 0).all())
    assert abs(float(chi[m].mean())) < 1e-6
    # the analytic background field is what TFI's outside sources give, within a few %
    assert _rel(background, problem["background"], m) < 0.02
    # the local field it explains is close to the painted sources' field
    assert _rel(local, problem["local"], m) < 0.08
    # and chi to the painted chi (TV recovers the two spheres' contrast)
    assert _rel(chi, problem["chi"], m) < 0.15


def test_tfi_beats_pdf_on_the_same_total_field(problem):
    m = problem["mask"]
    _, local, _ = total_field_inversion(problem["total"], m, VS, B0, **FAST)
    pdf_local, pdf_mask = pdf(problem["total"], m, VS, B0)
    assert bool((pdf_mask == m).all())
    assert _rel(local, problem["local"], m) < 0.2 * _rel(pdf_local, problem["local"], m)


def test_background_alone_leaves_almost_no_chi_in_the_brain(problem):
    m = problem["mask"]
    chi, local, _ = total_field_inversion(problem["background"], m, VS, B0, **FAST)
    scale = float(problem["background"][m].abs().max())
    assert scale > 0.4
    # the field it attributes to the brain is a small part of the background's
    assert float(local[m].abs().max()) < 0.005 * scale
    assert float(chi[m].abs().max()) < 0.01


def test_weights_floor_zero_and_normalise():
    mask = torch.zeros(4, 1, 1, dtype=torch.bool)
    mask[:3] = True
    noise = torch.tensor([1.0, 2.0, 1e-6, 5.0]).reshape(4, 1, 1)
    reliable = torch.tensor([True, True, True, False]).reshape(4, 1, 1)
    w = tfi_weights(mask, noise, reliable)
    floor = NOISE_FLOOR_FRAC * 1.0          # the median noise in the mask is 1.0
    raw = torch.tensor([1.0, 0.5, 1.0 / floor, 0.0])
    expected = raw / raw[:3].pow(2).mean().sqrt()
    assert torch.allclose(w.reshape(-1), expected.to(w.dtype), rtol=1e-6)
    unreliable = tfi_weights(mask, noise, torch.tensor([False, True, True, True]).reshape(4, 1, 1))
    assert float(unreliable[0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="zero everywhere"):
        tfi_weights(mask, noise, torch.zeros(4, 1, 1))


def test_weights_follow_the_noise(problem):
    """Noise that is large in half the brain is fitted less there: with the inverse-noise
    weights the local field is closer to the truth than with uniform weights."""
    m = problem["mask"]
    g = torch.Generator().manual_seed(3)
    sigma = torch.full(SHAPE, 0.002, dtype=torch.float64)
    sigma[: SHAPE[0] // 2] = 0.03
    noisy = problem["total"] + sigma * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    errs = {}
    for name, w in (("uniform", None), ("weighted", tfi_weights(m, sigma))):
        _, local, _ = total_field_inversion(noisy, m, VS, B0, w, **FAST)
        errs[name] = _rel(local, problem["local"], m)
    assert errs["weighted"] < 0.3 * errs["uniform"], errs


def test_transform_is_registered_and_matches_the_function(problem):
    assert BFR_TRANSFORMS["tfi"] is TFIBackground
    t = make_bfr_transform("tfi", FAST)
    local, out_mask = t(problem["total"], problem["mask"], VS, B0)
    _, ref, _ = total_field_inversion(problem["total"], problem["mask"], VS, B0,
                                      tfi_weights(problem["mask"]), **FAST)
    assert bool((out_mask == problem["mask"]).all())
    assert _rel(local, ref, problem["mask"]) < 1e-4


def test_pipeline_from_total_field_keeps_the_whole_mask(problem):
    sample = {"total_field_ppm": problem["total"].float().numpy(), "mask": problem["mask"].numpy(),
              "voxel_size_mm": VS, "b0_dir": B0}
    rec = reconstruct(sample, ReconOptions(method="tv", bfr="tfi", bfr_params=FAST),
                      start="totalfield")
    m = problem["mask"]
    assert bool((rec.inversion_mask == m).all()) and bool((rec.chi_mask == m).all())
    assert _rel(rec.local_field_ppm.double(), problem["local"], m) < 0.08
    assert _rel(rec.chi_ppm.double(), problem["chi"], m) < 0.3
    assert rec.params["bfr"] == "tfi"


def test_bad_input():
    f = torch.zeros(SHAPE)
    m = torch.zeros(SHAPE, dtype=torch.bool)
    with pytest.raises(ValueError, match="empty"):
        total_field_inversion(f, m)
    m[20:28, 20:28, 20:28] = True
    bad = f.clone()
    bad[24, 24, 24] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        total_field_inversion(bad, m)
    with pytest.raises(ValueError, match="non-negative"):
        total_field_inversion(f, m, weights=-torch.ones(SHAPE))
    with pytest.raises(ValueError, match="pb"):
        TFIBackground(pb=0.0)


def test_pipeline_from_wrapped_phase_uses_the_noise_weights(problem):
    """From wrapped multi-echo phase: field mapping, its noise estimate and the reliability
    weights reach TFI, and the local field matches the painted sources' field."""
    from qsmnet.physics.units import ppm_to_phase, wrap_phase

    te_s = (0.004, 0.008, 0.012)
    b0_t = 3.0
    total = problem["total"].float()
    phase = torch.stack([wrap_phase(ppm_to_phase(total, te, b0_t)) for te in te_s])
    # strong wraps: the background alone turns the phase by several pi at the last echo
    assert float(ppm_to_phase(problem["background"].abs().max(), te_s[-1], b0_t)) > 3 * np.pi
    sample = {"phase": phase.numpy(), "magnitude": np.ones((3, *SHAPE), dtype=np.float32),
              "te_s": te_s, "b0_t": b0_t, "mask": problem["mask"].numpy(),
              "voxel_size_mm": VS, "b0_dir": B0}
    rec = reconstruct(sample, ReconOptions(method="tv", bfr="tfi", bfr_params=FAST,
                                           field_margin_mm=0.0), start="phase")
    m = problem["mask"]
    assert rec.field_noise_ppm is not None
    assert bool((rec.inversion_mask == m).all())
    assert _rel(rec.local_field_ppm.double(), problem["local"], m) < 0.08


def test_background_start_alone_fits_the_outside_sources(problem):
    """The start (the PDF problem on the outside susceptibility) explains a field made only by
    sources outside the mask: after it and one joint CG step, the background field is the
    analytic spheres' field, which the joint step alone is far from."""
    m = problem["mask"]
    one_step = {**FAST, "outer_iterations": 1, "cg_iterations": 1}
    _, _, cold = total_field_inversion(problem["background"], m, VS, B0,
                                       **one_step, background_iterations=0)
    _, local, warm = total_field_inversion(problem["background"], m, VS, B0,
                                           **one_step, background_iterations=150)
    assert _rel(cold, problem["background"], m) > 0.2
    assert _rel(warm, problem["background"], m) < 0.02
    assert float(local[m].abs().max()) < 0.01 * float(problem["background"][m].abs().max())


def test_background_iterations_must_not_be_negative():
    with pytest.raises(ValueError, match="background_iterations"):
        TFIBackground(background_iterations=-1)


def test_inside_start_speeds_the_joint_solve_up_and_keeps_its_minimiser(problem):
    """The inside start (closed-form L2 of the field the background start leaves) gives the
    joint solve a whole-brain estimate: after one short joint solve chi is clearly closer to
    the painted spheres than from zero inside, and at the full budget both reach the same
    minimiser (the start changes the path, not the problem)."""
    m = problem["mask"]

    def err(alpha, **budget):
        chi, _, _ = total_field_inversion(problem["total"], m, VS, B0,
                                          **{**FAST, "background_iterations": 150, **budget},
                                          inside_start_alpha=alpha)
        return _rel(chi, problem["chi"], m)

    short = {"outer_iterations": 1, "cg_iterations": 20}
    assert err(0.1, **short) < 0.8 * err(0.0, **short)
    assert abs(err(0.1) - err(0.0)) < 0.02


def test_inside_start_alpha_must_not_be_negative():
    with pytest.raises(ValueError, match="inside_start_alpha"):
        TFIBackground(inside_start_alpha=-0.1)
