"""PNG preview: three orthogonal slices of a susceptibility map through the mask's centre."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from qsmnet.io.atomic import atomic_path


def orthogonal_slices(volume: np.ndarray, mask: np.ndarray | None = None,
                      voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0)):
    """The sagittal, coronal and axial slices through the mask's centre of mass, each transposed
    for display (first array axis horizontal), with their pixel aspect ratios."""
    if mask is not None and np.any(mask):
        centre = [int(round(c)) for c in np.argwhere(mask).mean(axis=0)]
    else:
        centre = [n // 2 for n in volume.shape]
    dx, dy, dz = voxel_size_mm
    return [
        (volume[centre[0], :, :].T, dz / dy, "sagittal"),
        (volume[:, centre[1], :].T, dz / dx, "coronal"),
        (volume[:, :, centre[2]].T, dy / dx, "axial"),
    ]


def save_preview(path: str | os.PathLike, chi_ppm: np.ndarray, mask: np.ndarray | None = None,
                 voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0), title: str = "",
                 window_ppm: float | None = None) -> None:
    """Write a PNG of three orthogonal chi slices (grey scale, symmetric window in ppm).

    The window defaults to the 99th percentile of |chi| inside the mask (at least 0.05 ppm).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inside = chi_ppm[mask > 0] if mask is not None and np.any(mask) else chi_ppm.ravel()
    if window_ppm is None:
        window_ppm = max(float(np.percentile(np.abs(inside), 99)), 0.05)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8), constrained_layout=True)
    for ax, (img, aspect, name) in zip(axes, orthogonal_slices(chi_ppm, mask, voxel_size_mm)):
        im = ax.imshow(img, cmap="gray", vmin=-window_ppm, vmax=window_ppm, origin="lower",
                       aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="chi (ppm)")
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
