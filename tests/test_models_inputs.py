"""qsmnet.models.inputs: network input channels against the inversions called directly.

Truths: each first-estimate channel equals :func:`~qsmnet.transforms.inversion.tkd`,
:func:`~qsmnet.transforms.inversion.closed_form_l2` or
:func:`~qsmnet.transforms.inversion.tv_brain_data` called on the single sample with its own
geometry (those are checked against numpy references in test_inversion.py); the field and mask
channels are the masked field times the scale and the mask; shapes and channel order are exact.
"""

from __future__ import annotations

import pytest
import torch

from qsmnet.models import InputBuilder
from qsmnet.models.inputs import (
    CHANNELS,
    ESTIMATE_PARAMS,
    ESTIMATES,
    as_batch_geometry,
    classical_estimate,
)
from qsmnet.transforms.inversion import closed_form_l2, tkd, tv_admm, tv_brain_data

pytestmark = pytest.mark.usefixtures("single_thread")


def _nrmse(a, b, m):
    a, b = a[m > 0], b[m > 0]
    a, b = a - a.mean(), b - b.mean()
    return float(100 * (a - b).norm() / b.norm())


def test_input_builder_channels_scale_and_per_sample_geometry(dipole_blocks_batch):
    chi, field, mask, vs, b0 = dipole_blocks_batch()
    builder = InputBuilder(["local_field", "tkd", "l2", "mask"], scale=10.0, l2_alpha=0.02)
    x, est = builder(field, mask, vs, b0)
    assert x.shape == (2, 4, 16, 16, 16)
    torch.testing.assert_close(x[:, 0:1], field * mask * 10.0)
    assert torch.equal(x[:, 3:4], mask)
    for i in range(2):
        # each sample's estimate equals the single-sample inversion with its own geometry
        l2_i = closed_form_l2(field[i:i + 1], mask[i:i + 1], vs[i], b0[i], alpha=0.02, pad=builder.pad)
        tkd_i = tkd(field[i:i + 1], mask[i:i + 1], vs[i], b0[i], threshold=0.15, pad=builder.pad)
        torch.testing.assert_close(est["l2"][i:i + 1], l2_i, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(x[i:i + 1, 2:3], l2_i * 10.0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x[i:i + 1, 1:2], tkd_i * 10.0, rtol=1e-5, atol=1e-6)
    # the geometry matters: swapping the two samples' geometry changes the L2 channel
    x_swapped, _ = builder(field, mask, vs.flip(0), b0.flip(0))
    assert (x_swapped[:, 2] - x[:, 2]).abs().max() > 0.05


def test_tv_estimate_is_mask_data_tv_and_beats_tkd(dipole_blocks_batch):
    chi, field, mask, vs, b0 = dipole_blocks_batch()
    builder = InputBuilder(["local_field", "tv", "mask"], tv_lam=5e-5, tv_iterations=40)
    x, est = builder(field, mask, vs, b0)
    for i in range(2):
        ref = tv_admm(field[i:i + 1], mask[i:i + 1], vs[i], b0[i], lam=5e-5, max_iter=40,
                      weights=mask[i:i + 1], pad=builder.pad)
        torch.testing.assert_close(est["tv"][i:i + 1], ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(x[i:i + 1, 1:2], ref * 10.0, rtol=1e-4, atol=1e-5)
        # against the truth: the TV estimate is far closer than TKD on these piecewise-constant blocks
        t = tkd(field[i:i + 1], mask[i:i + 1], vs[i], b0[i])
        assert _nrmse(est["tv"][i:i + 1], chi[i:i + 1], mask[i:i + 1]) < 0.8 * _nrmse(t, chi[i:i + 1], mask[i:i + 1])


@pytest.mark.parametrize("name", ESTIMATES)
def test_classical_estimate_is_the_inversion_with_its_settings(name, dipole_blocks_batch):
    chi, field, mask, vs, b0 = dipole_blocks_batch(batch=1)
    settings = {"l2_alpha": 0.05, "tkd_threshold": 0.2, "tv_lam": 1e-4, "tv_iterations": 5, "pad": 6}
    out = classical_estimate(name, field, mask, vs[0], b0[0], **settings)
    direct = {"tkd": lambda: tkd(field, mask, vs[0], b0[0], threshold=0.2, pad=6),
              "l2": lambda: closed_form_l2(field, mask, vs[0], b0[0], alpha=0.05, pad=6),
              "tv": lambda: tv_brain_data(field, mask, vs[0], b0[0], lam=1e-4, max_iter=5, pad=6)}
    # the same computation on the same input and thread count: bit for bit
    assert torch.equal(out, direct[name]())
    # each estimate depends on the settings ESTIMATE_PARAMS lists for it, and on no other
    for key, value in settings.items():
        changed = {**settings, key: value * 2}
        moved = not torch.equal(classical_estimate(name, field, mask, vs[0], b0[0], **changed), out)
        assert moved == (key in ESTIMATE_PARAMS[name]), key
    with pytest.raises(ValueError, match="unknown estimate 'medi'"):
        classical_estimate("medi", field, mask, vs[0], b0[0])


def test_channel_order_follows_the_config_and_extra_estimates_stay_out(dipole_blocks_batch):
    chi, field, mask, vs, b0 = dipole_blocks_batch()
    order = ["mask", "l2", "local_field"]
    builder = InputBuilder(order, scale=3.0)
    x, est = builder(field, mask, vs, b0, extra=["tkd"])
    assert builder.num_channels == 3 and x.shape == (2, 3, 16, 16, 16)
    assert sorted(est) == ["l2", "tkd"]  # tkd computed for the caller, not a channel
    for i in range(2):
        one = lambda n: classical_estimate(n, field[i:i + 1], mask[i:i + 1], vs[i], b0[i],  # noqa: E731
                                           **builder.estimate_params)
        # batched and single-sample FFTs round differently: float32 eps * log2(N) * max|chi| with
        # N < 2**16 voxels on the padded grid
        tkd_i, l2_i = one("tkd"), one("l2")
        torch.testing.assert_close(est["tkd"][i:i + 1], tkd_i, rtol=0,
                                   atol=1.2e-7 * 16 * float(tkd_i.abs().max()))
        torch.testing.assert_close(x[i:i + 1, 1:2], 3.0 * l2_i, rtol=0,
                                   atol=3.0 * 1.2e-7 * 16 * float(l2_i.abs().max()))
    assert torch.equal(x[:, 0:1], mask)
    assert torch.equal(x[:, 2:3], 3.0 * field * mask)


def test_field_outside_the_mask_is_ignored(dipole_blocks_batch):
    chi, field, mask, vs, b0 = dipole_blocks_batch()
    builder = InputBuilder(["local_field", "tkd", "l2", "mask"])
    noisy = field + 5.0 * (1 - mask) * torch.randn(field.shape, generator=torch.Generator().manual_seed(1))
    x, est = builder(field, mask, vs, b0)
    x_noisy, est_noisy = builder(noisy, mask.bool(), vs, b0)  # boolean mask converted too
    assert torch.equal(x_noisy, x)
    assert all(torch.equal(est_noisy[k], est[k]) for k in est)


def test_scale_multiplies_field_and_estimates_not_the_mask(dipole_blocks_batch):
    chi, field, mask, vs, b0 = dipole_blocks_batch()
    channels = ["local_field", "tkd", "mask"]
    x1, est1 = InputBuilder(channels, scale=1.0)(field, mask, vs, b0)
    x4, est4 = InputBuilder(channels, scale=4.0)(field, mask, vs, b0)
    assert torch.equal(est4["tkd"], est1["tkd"])  # estimates are returned in ppm
    assert torch.equal(x4[:, :2], 4.0 * x1[:, :2])  # a power of two: exact in floating point
    assert torch.equal(x4[:, 2], x1[:, 2])


def test_geometry_broadcast():
    one = as_batch_geometry((1.0, 2.0, 3.0), 4, "voxel_size_mm", "cpu")
    assert one.shape == (4, 3) and one.dtype == torch.float64
    assert torch.equal(one, torch.tensor([[1.0, 2.0, 3.0]] * 4, dtype=torch.float64))
    per = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(as_batch_geometry(per, 2, "b0_dir", "cpu"), per.double())
    for bad in (torch.zeros(3, 3), torch.zeros(2, 3, 1), torch.zeros(2, 2)):
        with pytest.raises(ValueError, match="b0_dir must be"):
            as_batch_geometry(bad, 2, "b0_dir", "cpu")


def test_builder_refuses_bad_settings_and_inputs():
    for channels in (["phase"], [], ["mask", "mask"]):
        with pytest.raises(ValueError):
            InputBuilder(channels)
    with pytest.raises(ValueError, match="scale must be positive"):
        InputBuilder(scale=0.0)
    builder = InputBuilder(["local_field", "mask"])
    with pytest.raises(ValueError, match=r"must be \(B, 1, X, Y, Z\)"):
        builder(torch.zeros(8, 8, 8), torch.ones(8, 8, 8), (1, 1, 1), (0, 0, 1))
    with pytest.raises(ValueError, match="voxel_size_mm must be"):
        builder(torch.zeros(2, 1, 8, 8, 8), torch.ones(2, 1, 8, 8, 8), torch.ones(3, 3), (0, 0, 1))
    assert set(CHANNELS) == {"local_field", "mask", *ESTIMATES}


def test_estimate_params_are_the_constructor_settings():
    b = InputBuilder(["tv"], l2_alpha=0.07, tkd_threshold=0.11, pad=3, tv_lam=2e-5, tv_iterations=9)
    assert b.estimate_params == {"l2_alpha": 0.07, "tkd_threshold": 0.11, "tv_lam": 2e-5,
                                 "tv_iterations": 9, "pad": 3}
    assert set(b.estimate_params) == {p for ps in ESTIMATE_PARAMS.values() for p in ps}
