"""Crop-to-mask and pad-to-divisor round trips."""

import pytest
import torch

from qsmnet.inference.cropping import mask_bbox, plan_crop_pad


def test_bbox_with_margin_and_clipping():
    m = torch.zeros(20, 30, 25, dtype=torch.bool)
    m[5:9, 10:20, 0:3] = True
    box = mask_bbox(m, margin=2)
    assert box == (slice(3, 11), slice(8, 22), slice(0, 5))


@pytest.mark.parametrize("divisor", [1, 8, 16])
def test_crop_pad_round_trip_inside_box(divisor):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 23, 31, 17, generator=g)
    m = torch.zeros(23, 31, 17, dtype=torch.bool)
    m[4:15, 6:29, 3:12] = True
    plan = plan_crop_pad(m, divisor=divisor, margin=3)
    y = plan.apply(x)
    assert all(n % divisor == 0 for n in y.shape[-3:]) and y.shape[-3:] == plan.shape
    back = plan.restore(y)
    assert back.shape == x.shape
    inside = torch.zeros_like(m)
    inside[plan.crop] = True
    torch.testing.assert_close(back[:, inside], x[:, inside], rtol=0, atol=0)
    assert back[:, ~inside].abs().max() == 0


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        plan_crop_pad(torch.zeros(4, 4, 4, dtype=torch.bool))
