"""qsmnet.models.unet: shapes, size divisor, parameter counts, residual/zero-init, norm/act specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qsmnet.models import QSMNet, UNet3D

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    assert _n_params(net) == _expected_params(3, 1, features, affine, upsample)


@pytest.mark.parametrize("overrides", [[], ["model=qsmnet_small"], ["experiment=shipped"],
                                       ["experiment=field_only_input"]])
def test_model_config_parameter_count_is_that_of_its_architecture(overrides, tmp_path):
    """Each model config builds a network whose parameter count is the sum over the layers its
    ``channels`` and ``unet`` settings describe (the wrapper adds no parameters)."""
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    net = instantiate(cfg.model)
    assert isinstance(net, QSMNet)
    unet = cfg.model.unet
    assert unet.norm in ("instance", "batch", None)  # affine norms: 2 parameters per channel
    expected = _expected_params(len(cfg.model.channels), 1, list(unet.features),
                                norm_affine=unet.norm is not None, upsample=unet.upsample)
    assert _n_params(net) == expected
    assert _n_params(net) == _n_params(net.unet)
    if not overrides:
        # QSMNet's Python defaults are the default model config's architecture
        assert _n_params(QSMNet()) == expected == _expected_params(4, 1, (8, 16, 32, 64), True)


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
