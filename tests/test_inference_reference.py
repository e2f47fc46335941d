"""How chi is referenced (qsmnet.inference.reference, ``--reference``): the R2* fit against
exponential decays of known rate, the CSF region against the ventricle a phantom was built with,
and the referenced chi against the constants numpy computes on the same voxels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qsmnet.inference.options import ReconOptions
from qsmnet.inference.pipeline import reconstruct
from qsmnet.inference.reference import (
    CSF_EROSION_MM,
    REFERENCES,
    apply_reference,
    csf_mask,
    r2star_per_s,
)
from qsmnet.io.errors import QSMInputError
from qsmnet.physics.forward import forward_field
from qsmnet.physics.units import GAMMA_BAR_MHZ_PER_T
from qsmnet.transforms.inversion import reference_to_mask_mean

pytestmark = pytest.mark.usefixtures("single_thread")

N, C = 32, 16
TE_S = (0.005, 0.010, 0.015, 0.020)
B0_T = 3.0


def _phantom():
    """A spherical brain (radius 14 mm, 1 mm voxels) with a central ventricle (radius 4 mm,
    R2* 2 1/s, chi -0.02 ppm), tissue R2* 25 1/s, a low-R2* blob at the brain's edge, outside
    the central box, and a single low-R2* voxel inside the central box (too small to keep)."""
    idx = np.indices((N, N, N)).astype(np.float64)
    r = np.sqrt(((idx - C) ** 2).sum(axis=0))
    brain = r <= 14
    ventricle = r <= 4
    edge_blob = np.sqrt((idx[0] - (C + 12)) ** 2 + (idx[1] - C) ** 2 + (idx[2] - C) ** 2) <= 3
    r2s = np.where(brain, 25.0, 0.0)
    r2s[ventricle | (edge_blob & brain)] = 2.0
    speck = (C - 4, C + 4, C)  # distance 5.7 mm from the centre: apart from the ventricle
    r2s[speck] = 2.0
    te = np.asarray(TE_S)[:, None, None, None]
    magnitude = np.where(brain, 1.0, 0.0)[None] * np.exp(-te * r2s[None])
    chi = np.where(brain, 0.01 * np.sin(idx[0] / 3.0), 0.0)
    chi[ventricle] = -0.02
    return magnitude, brain, ventricle, edge_blob, speck, chi, r2s


def test_r2star_fit_recovers_the_decay_rate():
    magnitude, brain, *_, r2s = _phantom()
    fit = r2star_per_s(magnitude * 3.7, TE_S, brain)  # any scale: S0 drops out
    # float64 log-linear least squares of an exact exponential: error ~ eps64 * |log S| / dTE
    assert np.max(np.abs(fit[brain] - r2s[brain])) < 1e-9
    assert np.all(np.isinf(fit[~brain]))
    with pytest.raises(QSMInputError, match="at least 2 echoes"):
        r2star_per_s(magnitude[:1], TE_S[:1], brain)


def test_csf_region_is_the_central_ventricle():
    magnitude, brain, ventricle, edge_blob, speck, _, _ = _phantom()
    found = csf_mask(magnitude, TE_S, brain, (1.0, 1.0, 1.0))
    # the R2* values are 2 and 25 1/s against a threshold of 5: masks far from rounding
    assert np.array_equal(found, ventricle)
    assert not found[speck] and not (found & edge_blob).any()
    # the edge blob alone (its part deeper than the erosion) is not central: no CSF at all
    no_ventricle = magnitude.copy()
    no_ventricle[:, ventricle] = np.exp(-np.asarray(TE_S) * 25.0)[:, None]
    with pytest.raises(QSMInputError, match=rf"no CSF found .* eroded by {CSF_EROSION_MM:g} mm"):
        csf_mask(no_ventricle, TE_S, brain, (1.0, 1.0, 1.0))


def test_apply_reference_subtracts_the_mean_over_the_region():
    g = torch.Generator().manual_seed(0)
    chi = torch.randn((N, N, N), generator=g) * 0.05 + 0.3
    _, brain, ventricle, *_ = _phantom()
    m, v = torch.from_numpy(brain), torch.from_numpy(ventricle)
    ref = chi.double().numpy()
    mm, info = apply_reference(chi, m, "mask-mean")
    assert torch.equal(mm, reference_to_mask_mean(chi, m))  # the same call, bit for bit
    # float64 means of float32 values: the two sums differ in order only (< 1e-12 ppm)
    assert abs(info["value_ppm"] - ref[brain].mean()) < 1e-12 and info["voxels"] == brain.sum()
    csf, info = apply_reference(chi, m, "csf", v)
    assert info["voxels"] == ventricle.sum()
    assert abs(info["value_ppm"] - ref[ventricle].mean()) < 1e-12
    # float32 subtraction of a 0.3 ppm constant: error <= eps32 * 0.5 ppm
    assert np.max(np.abs(csf.numpy()[brain] - (ref[brain] - ref[ventricle].mean()))) < 1e-7
    assert float(csf.double()[v].mean()) == pytest.approx(0.0, abs=1e-7)
    assert torch.all(csf[~m] == 0)
    none, info = apply_reference(chi, m, "none")
    assert info["value_ppm"] == 0.0 and info["voxels"] == 0
    assert torch.equal(none, chi * m)
    with pytest.raises(QSMInputError, match="outside the voxels chi is reported on"):
        apply_reference(chi, m, "csf", torch.from_numpy(~brain))
    assert REFERENCES == ("mask-mean", "csf", "none")
    with pytest.raises(QSMInputError, match="--reference: unknown reference 'whole-brain'"):
        ReconOptions(reference="whole-brain")


def _phase_sample():
    magnitude, brain, ventricle, _, _, chi, _ = _phantom()
    field = forward_field(torch.from_numpy(chi), (1.0, 1.0, 1.0), (0.0, 0.0, 1.0)).numpy()
    te = np.asarray(TE_S)[:, None, None, None]
    phase = 2 * math.pi * GAMMA_BAR_MHZ_PER_T * B0_T * te * field[None]
    phase = np.angle(np.exp(1j * phase)) * brain
    sample = {"phase": torch.from_numpy(phase).float(),
              "magnitude": torch.from_numpy(magnitude).float(),
              "mask": torch.from_numpy(brain), "te_s": torch.tensor(TE_S),
              "b0_t": B0_T, "voxel_size_mm": torch.ones(3), "b0_dir": torch.tensor([0.0, 0, 1])}
    return sample, brain, ventricle


def test_reconstruct_references_chi_as_asked():
    """The three references differ by constants: the one each records, computed by numpy on the
    mask-mean chi over the region (the CSF one over the phantom's ventricle)."""
    sample, brain, ventricle = _phase_sample()
    recs = {ref: reconstruct(sample, ReconOptions(method="tkd", bfr="vsharp", reference=ref,
                                                  field_margin_mm=0))
            for ref in REFERENCES}
    base = recs["mask-mean"]
    where = base.chi_mask.numpy()
    assert np.array_equal(recs["csf"].chi_mask.numpy(), where)
    info = recs["csf"].params["reference"]
    region = recs["csf"].reference_mask.numpy()
    assert np.array_equal(region, ventricle) and info["voxels"] == int((region & where).sum())
    chi_mm = base.chi_ppm.double().numpy()
    # the csf chi is the mask-mean chi less its mean over the ventricle; float32 maps of
    # |chi| < 0.1 ppm: differences within a few eps32 * 0.1 ppm
    shift = chi_mm[region & where].mean()
    assert np.max(np.abs(recs["csf"].chi_ppm.double().numpy()[where] - (chi_mm[where] - shift))) \
        < 1e-7
    assert abs(info["value_ppm"] - base.params["reference"]["value_ppm"] - shift) < 1e-7
    # none: the inversion's own output; the mask-mean chi is it less its recorded mean
    none = recs["none"].chi_ppm.double().numpy()
    assert recs["none"].params["reference"]["value_ppm"] == 0.0
    assert abs(none[where].mean() - base.params["reference"]["value_ppm"]) < 1e-7
    assert np.max(np.abs(none[where] - base.params["reference"]["value_ppm"] - chi_mm[where])) \
        < 1e-7
    assert np.all(recs["none"].chi_ppm.numpy()[~where] == 0)


def test_csf_reference_needs_the_magnitude():
    sample, brain, _ = _phase_sample()
    local = {"local_field_ppm": torch.zeros((N, N, N)), "mask": sample["mask"],
             "voxel_size_mm": sample["voxel_size_mm"], "b0_dir": sample["b0_dir"]}
    with pytest.raises(QSMInputError, match="--reference csf: needs the multi-echo magnitude"):
        reconstruct(local, ReconOptions(method="tkd", reference="csf"), start="localfield")
