"""Report figures: chi slices with error maps, and error against B0 tilt (PNG, matplotlib Agg).

Both functions write atomically, so a killed benchmark never leaves a truncated PNG.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from qsmnet.inference.preview import orthogonal_slices
from qsmnet.io.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def comparison_figure(path: str | os.PathLike, truth_ppm: np.ndarray,
                      predictions_ppm: Mapping[str, np.ndarray], mask: np.ndarray,
                      voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                      scores: Mapping[str, float] | None = None, title: str = "",
                      window_ppm: float = 0.15, error_window_ppm: float = 0.1) -> None:
    """Orthogonal slices of the truth and each prediction (top rows) and of each error
    ``prediction - truth`` (bottom rows), all masked, in ppm.

    Parameters
    ----------
    truth_ppm, predictions_ppm : (X, Y, Z) arrays, ppm (each referenced to its mask mean).
    mask : (X, Y, Z) bool, the region shown (outside is blanked).
    scores : optional method -> NRMSE (%), printed in the column titles.
    window_ppm, error_window_ppm : symmetric grey-scale windows of chi and of the error.
    """
    plt = _pyplot()
    m = mask.astype(bool)
    cols = {"truth": truth_ppm, **predictions_ppm}
    names = list(cols)
    n_views = 3
    fig, axes = plt.subplots(2 * n_views, len(names), figsize=(2.3 * len(names), 2.0 * 2 * n_views),
                             constrained_layout=True, squeeze=False)
    for j, name in enumerate(names):
        vol = np.where(m, cols[name], 0.0)
        err = np.where(m, cols[name] - truth_ppm, 0.0)
        label = name if not scores or name not in scores else f"{name}\nNRMSE {scores[name]:.1f} %"
        for i, (img, aspect, view) in enumerate(orthogonal_slices(vol, m, voxel_size_mm)):
            ax = axes[i, j]
            im_chi = ax.imshow(img, cmap="gray", vmin=-window_ppm, vmax=window_ppm, origin="lower",
                               aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
            if j == 0:
                ax.set_ylabel(view, fontsize=9)
        for i, (img, aspect, view) in enumerate(orthogonal_slices(err, m, voxel_size_mm)):
            ax = axes[n_views + i, j]
            if name == "truth":
                ax.axis("off")
                continue
            im_err = ax.imshow(img, cmap="RdBu_r", vmin=-error_window_ppm, vmax=error_window_ppm,
                               origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 1:
                ax.set_ylabel(f"error, {view}", fontsize=9)
    fig.colorbar(im_chi, ax=axes[:n_views, :], shrink=0.6, label="chi (ppm)")
    if len(names) > 1:
        fig.colorbar(im_err, ax=axes[n_views:, :], shrink=0.6, label="error (ppm)")
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def metric_vs_tilt_figure(path: str | os.PathLike, tilts_deg: Sequence[float],
                          values: Mapping[str, Sequence[float]], ylabel: str = "NRMSE (%)",
                          title: str = "") -> None:
    """One line per method: a metric (e.g. NRMSE %) against the B0 tilt angle (degrees)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    for name, ys in values.items():
        ax.plot(list(tilts_deg), list(ys), marker="o", label=name)
    ax.set_xlabel("B0 tilt from the slice normal (deg)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
