"""qsmnet.inference.preview: slice positions and aspect ratios, and the PNG written."""

from __future__ import annotations

import numpy as np
import pytest

from qsmnet.inference.preview import orthogonal_slices, save_preview


def test_slices_pass_through_the_mask_centre_with_voxel_aspect():
    vol = np.arange(10 * 12 * 14, dtype=np.float64).reshape(10, 12, 14)
    mask = np.zeros(vol.shape, bool)
    mask[2:5, 6:11, 1:4] = True  # centre of mass (3, 8, 2)
    (sag, a_sag, n_sag), (cor, a_cor, n_cor), (ax, a_ax, n_ax) = orthogonal_slices(
        vol, mask, voxel_size_mm=(0.5, 1.0, 2.0))
    assert (n_sag, n_cor, n_ax) == ("sagittal", "coronal", "axial")
    # transposed for display: rows are the later array axis
    assert np.array_equal(sag, vol[3].T) and np.array_equal(cor, vol[:, 8].T)
    assert np.array_equal(ax, vol[:, :, 2].T)
    # pixel height / width in mm
    assert (a_sag, a_cor, a_ax) == (2.0 / 1.0, 2.0 / 0.5, 1.0 / 0.5)


def test_without_a_mask_the_slices_are_central():
    vol = np.random.default_rng(0).standard_normal((9, 8, 7))
    for mask in (None, np.zeros(vol.shape, bool)):
        slices = orthogonal_slices(vol, mask)
        assert np.array_equal(slices[0][0], vol[4].T) and np.array_equal(slices[1][0], vol[:, 4].T)
        assert np.array_equal(slices[2][0], vol[:, :, 3].T)


def test_save_preview_writes_one_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    chi = np.random.default_rng(1).standard_normal((16, 16, 16)) * 0.05
    mask = np.zeros(chi.shape, bool)
    mask[3:13, 3:13, 3:13] = True
    path = tmp_path / "chimap.png"
    save_preview(path, chi, mask, (1.0, 1.0, 1.5), title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = image.imread(path)
    # 10.5 x 3.8 inches at 80 dpi
    assert img.shape[:2] == (round(3.8 * 80), round(10.5 * 80))
    assert [p.name for p in tmp_path.iterdir()] == ["chimap.png"]  # written atomically
