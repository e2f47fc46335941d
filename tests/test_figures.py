"""Report figures: written atomically, with the requested panels."""

from __future__ import annotations

import numpy as np
import pytest

from qsmnet.metrics.figures import comparison_figure, metric_vs_tilt_figure


def _read_png(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_comparison_figure_size_and_error_colours(tmp_path):
    shape = (20, 24, 16)
    truth = np.zeros(shape)
    mask = np.zeros(shape, bool)
    mask[4:16, 4:20, 3:13] = True
    truth[mask] = 0.05
    # one prediction is exact, one is off by +0.1 ppm everywhere in the mask
    path = tmp_path / "cmp.png"
    comparison_figure(path, truth, {"exact": truth.copy(), "biased": truth + 0.1}, mask,
                      scores={"exact": 0.0, "biased": 200.0}, error_window_ppm=0.1)
    img = _read_png(path)
    # 3 columns x 2.3 in, 6 rows x 2.0 in at 80 dpi
    assert img.shape[0] == pytest.approx(6 * 2.0 * 80, abs=2)
    assert img.shape[1] == pytest.approx(3 * 2.3 * 80, abs=2)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    # the saturated +0.1 ppm error is drawn in the top colour of RdBu_r (dark red) somewhere,
    # the exact column's error map is white (zero error) inside the mask
    rgb = img[..., :3]
    dark_red = (rgb[..., 0] > 0.35) & (rgb[..., 0] < 0.8) & (rgb[..., 1] < 0.1) & (rgb[..., 2] < 0.2)
    assert dark_red.sum() > 100


def test_metric_vs_tilt_figure(tmp_path):
    path = tmp_path / "tilt.png"
    metric_vs_tilt_figure(path, [0, 30, 60], {"a": [10.0, 11.0, 12.0], "b": [20.0, 19.0, 25.0]})
    img = _read_png(path)
    assert img.shape[:2] == (round(3.8 * 90), round(5.5 * 90))
