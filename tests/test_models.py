"""U-Net, input builder and QSMNet: shapes, parameter counts, residual/zero-init, geometry."""

from __future__ import annotations

import pytest
import torch

from qsmnet.models import InputBuilder, QSMNet, UNet3D
from qsmnet.physics import forward_field
from qsmnet.transforms.inversion import closed_form_l2, tkd, tv_admm


def _expected_params(in_ch: int, out_ch: int, features, norm_affine: bool, upsample: str = "deconv") -> int:
    """Parameter count of the documented architecture, written out independently."""

    def conv(ci, co, k):
        return ci * co * k ** 3 + co

    def block(ci, co):
        n = conv(ci, co, 3) + conv(co, co, 3)
        return n + (4 * co if norm_affine else 0)

    total, prev = 0, in_ch
    for f in features:
        total += block(prev, f)
        prev = f
    for lvl in range(len(features) - 2, -1, -1):
        up = conv(features[lvl + 1], features[lvl], 2) if upsample == "deconv" else \
            conv(features[lvl + 1], features[lvl], 1)
        total += up + block(2 * features[lvl], features[lvl])
    return total + conv(features[0], out_ch, 1)


def _phantom(batch=2, shape=(16, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    chi = torch.zeros(batch, 1, *shape)
    for b in range(batch):
        for _ in range(4):
            lo = torch.randint(0, shape[0] - 5, (3,), generator=g)
            chi[b, 0, lo[0]:lo[0] + 4, lo[1]:lo[1] + 5, lo[2]:lo[2] + 3] += 0.1 * (1 + b)
    mask = torch.zeros_like(chi)
    mask[..., 2:-2, 3:-3, 2:-2] = 1
    chi = chi * mask
    vs = torch.tensor([[1.0, 1.0, 1.0], [0.7, 0.9, 2.0]])[:batch]
    b0 = torch.tensor([[0.0, 0.0, 1.0], [0.3, -0.4, 0.866]])[:batch]
    field = forward_field(chi, vs, b0) * mask
    return chi, field, mask, vs, b0


@pytest.mark.parametrize("features,shape", [((8, 16), (4, 6, 10)), ((4, 8, 16), (8, 12, 4)),
                                            ((4, 8, 8, 8), (8, 16, 8))])
def test_unet_output_shape_and_divisor(features, shape):
    net = UNet3D(2, 3, features=features, norm="instance")
    assert net.size_divisor == 2 ** (len(features) - 1)
    assert all(n % net.size_divisor == 0 for n in shape)
    out = net(torch.randn(1, 2, *shape))
    assert out.shape == (1, 3, *shape)


def test_unet_rejects_indivisible_size():
    net = UNet3D(1, 1, features=(4, 8, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 1, 8, 8, 6))


@pytest.mark.parametrize("norm,affine", [(None, False), ("instance", True), ("batch", True),
                                         (("group", {"num_groups": 4}), True)])
@pytest.mark.parametrize("upsample", ["deconv", "trilinear"])
def test_unet_parameter_count(norm, affine, upsample):
    features = (8, 16, 32)
    net = UNet3D(3, 1, features=features, norm=norm, upsample=upsample)
    n = sum(p.numel() for p in net.parameters())
    assert n == _expected_params(3, 1, features, affine, upsample)


def test_default_qsmnet_parameter_count():
    net = QSMNet()  # features (8, 16, 32, 64), instance norm, 4 input channels (field, TKD, L2, mask)
    assert sum(p.numel() for p in net.parameters()) == _expected_params(4, 1, (8, 16, 32, 64), True)
    assert sum(p.numel() for p in net.parameters()) == 351_809
    wide = QSMNet(unet={"features": [16, 32, 64, 128]})  # experiment=shipped
    assert sum(p.numel() for p in wide.parameters()) == 1_403_265


def test_unet_residual_flag_with_zero_init_is_identity():
    x = torch.randn(2, 3, 8, 8, 8)
    net = UNet3D(3, 1, features=(4, 8), residual=True, zero_init_output=True)
    assert torch.equal(net(x), x[:, :1])
    plain = UNet3D(3, 1, features=(4, 8), residual=False, zero_init_output=True)
    assert torch.equal(plain(x), torch.zeros(2, 1, 8, 8, 8))


def test_unet_norm_act_specs():
    net = UNet3D(1, 1, features=(4, 8), norm=["group", {"num_groups": 2}], act=["leakyrelu", {"negative_slope": 0.2}])
    assert isinstance(net.encoders[0][1], torch.nn.GroupNorm) and net.encoders[0][1].num_groups == 2
    assert net.encoders[0][2].negative_slope == 0.2
    with pytest.raises(ValueError):
        UNet3D(1, 1, norm="layer")
    with pytest.raises(ValueError):
        UNet3D(1, 1, act="nope")


def test_input_builder_channels_scale_and_per_sample_geometry():
    chi, field, mask, vs, b0 = _phantom()
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


@pytest.mark.parametrize("base", ["tkd", "l2"])
def test_qsmnet_zero_init_residual_returns_first_estimate_exactly(base):
    chi, field, mask, vs, b0 = _phantom()
    net = QSMNet(channels=["local_field", base, "mask"], residual_from=base, unet={"features": [4, 8]})
    out, est = net.predict(field, mask, vs, b0)
    assert torch.equal(out, est[base])
    fn = (lambda f, m, v, b: closed_form_l2(f, m, v, b, alpha=0.02, pad=12)) if base == "l2" else \
        (lambda f, m, v, b: tkd(f, m, v, b, threshold=0.15, pad=12))
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


def test_qsmnet_config_round_trip():
    net = QSMNet(channels=["local_field", "tkd", "mask"], residual_from="tkd", scale=5.0,
                 unet={"features": [4, 8], "norm": ["group", {"num_groups": 2}], "upsample": "trilinear"})
    cfg = net.get_config()
    assert cfg["channels"] == ["local_field", "tkd", "mask"] and cfg["scale"] == 5.0
    clone = QSMNet.from_config(cfg)
    clone.load_state_dict(net.state_dict())
    chi, field, mask, vs, b0 = _phantom(batch=1)
    with torch.no_grad():
        for p in net.unet.head.parameters():
            p.normal_(0, 0.1)
        clone.load_state_dict(net.state_dict())
        assert torch.equal(net(field, mask, vs, b0), clone(field, mask, vs, b0))


@pytest.mark.parametrize("residual_from", ["tkd", None])
def test_rms_normalised_qsmnet_is_scale_equivariant(residual_from):
    """The dipole inversion is linear: with normalize='rms' scaling the field by a scales the
    prediction by a exactly (TKD first estimate is linear too); the fixed-scale network with
    instance norm is not (the defect the option removes)."""
    chi, field, mask, vs, b0 = _phantom(batch=2)
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


def _nrmse(a, b, m):
    a, b = a[m > 0], b[m > 0]
    a, b = a - a.mean(), b - b.mean()
    return float(100 * (a - b).norm() / b.norm())


def test_tv_estimate_is_mask_data_tv_and_beats_tkd():
    chi, field, mask, vs, b0 = _phantom()
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


def test_provided_estimates_are_used_as_given():
    chi, field, mask, vs, b0 = _phantom()
    net = QSMNet(channels=["local_field", "tv", "mask"], residual_from="tv", unet={"features": [4, 8]})
    given = {"tv": chi.clone()}  # an "estimate" that is the truth itself: impossible to compute
    out, est = net.predict(field, mask, vs, b0, provided=given)
    assert torch.equal(est["tv"], chi)
    torch.testing.assert_close(out, chi)  # zero-initialised correction + the provided base
    assert net.get_config()["tv_iterations"] == 100 and net.get_config()["tv_lam"] == 5e-5
