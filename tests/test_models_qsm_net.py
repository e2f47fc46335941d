"""qsmnet.models.qsm_net: residual/zero-init, padding, config round trips, scale equivariance."""

from __future__ import annotations

import pytest
import torch

from qsmnet.models import QSMNet
from qsmnet.transforms.inversion import DEFAULT_INVERSION_PAD, closed_form_l2, tkd


@pytest.mark.parametrize("base", ["tkd", "l2"])
def test_qsmnet_zero_init_residual_returns_first_estimate_exactly(base, dipole_blocks_batch):
    chi, field, mask, vs, b0 = dipole_blocks_batch()
    net = QSMNet(channels=["local_field", base, "mask"], residual_from=base, unet={"features": [4, 8]})
    out, est = net.predict(field, mask, vs, b0)
    assert torch.equal(out, est[base])
    pad = DEFAULT_INVERSION_PAD
    fn = (lambda f, m, v, b: closed_form_l2(f, m, v, b, alpha=0.02, pad=pad)) if base == "l2" else \
        (lambda f, m, v, b: tkd(f, m, v, b, threshold=0.15, pad=pad))
    ref = torch.cat([fn(field[i:i + 1], mask[i:i + 1], vs[i], b0[i]) for i in range(2)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
    # once the output layer is non-zero the network adds a correction, still masked and referenced
    with torch.no_grad():
        net.unet.head.bias.fill_(0.3)
        net.unet.head.weight.normal_(0, 0.1)
    out2 = net(field, mask, vs, b0)
    assert (out2 - out).abs().max() > 1e-3
    assert torch.all(out2[mask == 0] == 0)
    means = (out2 * mask).sum(dim=(2, 3, 4)) / mask.sum(dim=(2, 3, 4))
    assert means.abs().max() < 1e-6


def test_qsmnet_without_residual_pads_any_size():
    net = QSMNet(channels=["local_field", "mask"], residual_from=None, unet={"features": [4, 8, 8]})
    field = torch.randn(1, 1, 10, 7, 9) * 0.01
    mask = torch.ones_like(field)
    out = net(field, mask, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0))
    assert out.shape == field.shape
    # zero-initialised head and no residual: exactly zero
    assert torch.equal(out, torch.zeros_like(out))


def test_qsmnet_config_round_trip(dipole_blocks_batch):
    net = QSMNet(channels=["local_field", "tkd", "mask"], residual_from="tkd", scale=5.0,
                 unet={"features": [4, 8], "norm": ["group", {"num_groups": 2}], "upsample": "trilinear"})
    cfg = net.get_config()
    assert cfg["channels"] == ["local_field", "tkd", "mask"] and cfg["scale"] == 5.0
    clone = QSMNet.from_config(cfg)
    clone.load_state_dict(net.state_dict())
    chi, field, mask, vs, b0 = dipole_blocks_batch(batch=1)
    with torch.no_grad():
        for p in net.unet.head.parameters():
            p.normal_(0, 0.1)
        clone.load_state_dict(net.state_dict())
        assert torch.equal(net(field, mask, vs, b0), clone(field, mask, vs, b0))
    # the config records the settings of the first estimates, so a rebuilt network computes the same
    settings = {"l2_alpha": 0.05, "tkd_threshold": 0.2, "tv_lam": 3e-5, "tv_iterations": 7, "pad": 5}
    custom = QSMNet(channels=["local_field", "tv", "mask"], residual_from="tv",
                    unet={"features": [4, 8]}, **settings)
    assert QSMNet.from_config(custom.get_config()).inputs.estimate_params == settings


@pytest.mark.parametrize("residual_from", ["tkd", None])
def test_rms_normalised_qsmnet_is_scale_equivariant(residual_from, dipole_blocks_batch):
    """The dipole inversion is linear: with normalize='rms' scaling the field by a scales the
    prediction by a exactly (TKD first estimate is linear too); the fixed-scale network with
    instance norm is not (the defect the option removes)."""
    chi, field, mask, vs, b0 = dipole_blocks_batch(batch=2)
    field, mask = field.double(), mask.double()
    channels = ["local_field", "tkd", "mask"] if residual_from else ["local_field", "mask"]
    outs = {}
    for normalize in ("rms", None):
        torch.manual_seed(3)
        net = QSMNet(channels=channels, residual_from=residual_from, normalize=normalize,
                     unet={"features": [4, 8], "zero_init_output": False}).double()
        with torch.no_grad():
            a, b = net(field, mask, vs, b0), net(3.7 * field, mask, vs, b0)
        outs[normalize] = float((b - 3.7 * a).abs().max() / (3.7 * a).abs().max())
    assert outs["rms"] < 1e-12
    assert outs[None] > 0.1
    # an all-zero field stays finite (amplitude floor)
    net_zero = QSMNet(channels=channels, residual_from=residual_from, normalize="rms",
                      unet={"features": [4, 8]})
    assert torch.isfinite(net_zero(torch.zeros(1, 1, 8, 8, 8), torch.ones(1, 1, 8, 8, 8),
                                   (1.0, 1.0, 1.0), (0.0, 0.0, 1.0))).all()
    assert net_zero.get_config()["normalize"] == "rms"


def test_qsmnet_config_without_normalize_key_keeps_fixed_scale():
    """Checkpoints written before the option existed rebuild as fixed-scale networks."""
    cfg = QSMNet(channels=["local_field", "tkd", "mask"], unet={"features": [4, 8]}).get_config()
    assert cfg.pop("normalize") is None
    assert QSMNet.from_config(cfg).normalize is None


def test_qsmnet_rejects_bad_config():
    with pytest.raises(ValueError):
        QSMNet(channels=["phase"])
    with pytest.raises(ValueError):
        QSMNet(residual_from="medi")
    with pytest.raises(ValueError):
        QSMNet(unet={"in_channels": 4})
    with pytest.raises(ValueError):
        QSMNet(normalize="std")


def test_provided_estimates_are_used_as_given(dipole_blocks_batch):
    chi, field, mask, vs, b0 = dipole_blocks_batch()
    net = QSMNet(channels=["local_field", "tv", "mask"], residual_from="tv", unet={"features": [4, 8]})
    given = {"tv": chi.clone()}  # an "estimate" that is the truth itself: impossible to compute
    out, est = net.predict(field, mask, vs, b0, provided=given)
    assert torch.equal(est["tv"], chi)
    torch.testing.assert_close(out, chi)  # zero-initialised correction + the provided base


def test_rms_normalisation_leaves_the_magnitude_prior_unscaled(dipole_blocks_batch):
    """With a magnitude channel, scaling the field by a still scales the prediction by a
    exactly: the magnitude (normalised to mean 1 in the mask on its own) is not divided by the
    field's amplitude, so the network sees the same magnitude for both fields."""
    chi, field, mask, vs, b0 = dipole_blocks_batch(batch=2)
    field, mask = field.double(), mask.double()
    magnitude = {"magnitude": (1.0 + chi.abs()).double()}
    torch.manual_seed(3)
    net = QSMNet(channels=["local_field", "magnitude", "mask"], normalize="rms",
                 unet={"features": [4, 8], "zero_init_output": False}).double()
    with torch.no_grad():
        a = net.predict(field, mask, vs, b0, provided=magnitude)[0]
        b = net.predict(3.7 * field, mask, vs, b0, provided=magnitude)[0]
    # float64 throughout: only rounding separates b from 3.7 a
    assert float((b - 3.7 * a).abs().max() / (3.7 * a).abs().max()) < 1e-12
