"""Brain masks without BET: magnitude thresholding with morphology, and SMV erosion.

* :class:`BrainMask` returns the user's mask when one is given; otherwise it builds one from the
  magnitude (root-sum-of-squares over echoes, or the first echo): threshold (Otsu, or the
  robust-mask rule of MriResearchTools, reference section 2), morphological opening (breaks the
  thin bridges between brain and scalp across the dark skull), the largest connected component,
  closing, and hole filling. The largest component is chosen after an erosion by
  ``separation_mm`` (a Euclidean distance transform in mm), which cuts bridges narrower than
  ``2 * separation_mm`` (optic nerves into the eyes, a thin temporal bone into the muscle and
  scalp); the kept core is then grown back inside the thresholded mask, to the voxels within
  ``separation_mm`` plus one (smallest) voxel side of it and connected to it, so that the brain's
  own edge returns and a cut bridge returns only as a stub of that length. Morphology radii are
  in mm (ellipsoidal structuring elements on anisotropic grids). This step runs on the CPU with
  scipy/scikit-image (integer decisions, no gradient) and returns a bool tensor on the input's
  device.
* :class:`SMVErode` erodes a mask by a sphere of radius ``radius_mm`` (an ellipsoid in voxels on
  an anisotropic grid): a voxel survives when the whole sphere around it is inside the mask. It
  is computed by FFT convolution with the SMV kernel of :func:`qsmnet.physics.kernels.smv_kernel`
  on a zero-padded grid, thresholded half a voxel below the full count, which is exact in
  float32 (FFT round-off is far below ``0.5 / n_sphere``) and identical to
  ``scipy.ndimage.binary_erosion`` with the same ellipsoidal structuring element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from qsmnet.physics.geometry import as_voxel_size_mm
from qsmnet.physics.kernels import smv_kernel, sphere_mask
from qsmnet.transforms.base import OptionalKeysTransform, Transform

__all__ = ["BrainMask", "SMVErode", "ellipsoid_structure", "robust_threshold", "smv_erode"]

_DIMS = (-3, -2, -1)


def ellipsoid_structure(radius_mm: float, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Boolean structuring element: voxel offsets ``d`` with ``sum (d_i h_i)^2 <= r^2``.

    The same rule (with the same ``1e-9`` relative tolerance) as
    :func:`qsmnet.physics.kernels.sphere_mask`, centred; shape ``(2 n_i + 1)`` with
    ``n_i = floor(r / h_i)``.
    """
    vs = as_voxel_size_mm(voxel_size_mm)
    if radius_mm <= 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    n = [int(math.floor(radius_mm / h * (1.0 + 1e-9))) for h in vs]
    ax = [np.arange(-k, k + 1) * h for k, h in zip(n, vs)]
    x, y, z = np.meshgrid(*ax, indexing="ij", sparse=True)
    return (x * x + y * y + z * z) <= radius_mm * radius_mm * (1.0 + 1e-9)


# --------------------------------------------------------------------------------------------
# SMV erosion
# --------------------------------------------------------------------------------------------

def smv_erode(mask: torch.Tensor, radius_mm: float,
              voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Erode ``mask`` by a sphere of ``radius_mm`` (mm; an ellipsoid in voxels).

    Parameters
    ----------
    mask : (..., X, Y, Z) bool (or 0/1) tensor
    radius_mm : float
        Sphere radius in mm.
    voxel_size_mm : (3,)

    Returns
    -------
    (..., X, Y, Z) bool tensor on the mask's device: voxels whose whole sphere lies inside the
    mask (outside the array counts as outside the mask). Equals
    ``scipy.ndimage.binary_erosion(mask, ellipsoid_structure(radius_mm, voxel_size_mm))``.
    """
    vs = as_voxel_size_mm(voxel_size_mm)
    if radius_mm <= 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    if mask.ndim < 3:
        raise ValueError(f"mask must be (..., X, Y, Z), got shape {tuple(mask.shape)}")
    m = mask.to(torch.float32)
    pad = [int(math.floor(radius_mm / h * (1.0 + 1e-9))) + 1 for h in vs]
    mp = F.pad(m, [pad[2], pad[2], pad[1], pad[1], pad[0], pad[0]])
    shape = tuple(mp.shape[-3:])
    n_sphere = float(sphere_mask(shape, vs, radius_mm, device=m.device).sum())
    kern = smv_kernel(shape, vs, radius_mm, half=True, dtype=torch.float32, device=m.device)
    conv = torch.fft.irfftn(torch.fft.rfftn(mp, dim=_DIMS) * kern, s=shape, dim=_DIMS)
    # Full count is 1 (normalised kernel); one missing voxel drops it by 1 / n_sphere.
    eroded = conv > 1.0 - 0.5 / n_sphere
    eroded = eroded[..., pad[0]:pad[0] + m.shape[-3], pad[1]:pad[1] + m.shape[-2],
                    pad[2]:pad[2] + m.shape[-1]]
    return eroded & mask.to(torch.bool)


class SMVErode(Transform):
    """Spherical (mm) erosion of a mask; see :func:`smv_erode`.

    Parameters
    ----------
    radius_mm : float
        Sphere radius in mm.

    Call
    ----
    ``SMVErode(radius_mm)(mask (..., X, Y, Z), voxel_size_mm)`` -> eroded bool mask.
    Sample dict: ``mask, voxel_size_mm`` -> ``mask``.
    """

    input_keys = {"mask": "mask", "voxel_size_mm": "voxel_size_mm"}
    output_keys = ("mask",)

    def __init__(self, radius_mm: float = 1.0) -> None:
        if radius_mm <= 0:
            raise ValueError(f"radius_mm must be positive, got {radius_mm}")
        self.radius_mm = float(radius_mm)

    def __call__(self, mask: torch.Tensor,
                 voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
        return smv_erode(mask, self.radius_mm, voxel_size_mm)

    def __repr__(self) -> str:
        return f"SMVErode(radius_mm={self.radius_mm})"


# --------------------------------------------------------------------------------------------
# Automatic brain mask
# --------------------------------------------------------------------------------------------

def robust_threshold(weight: np.ndarray, factor: float = 1.0) -> float:
    """Threshold of MriResearchTools ``robustmask`` (reference section 2).

    ``high = mean(w in [q80, q99])``, ``noise = mean(w <= q15)`` (or ``<= q05``, or 0, when the
    background is not clearly darker than ``high / 10``); threshold
    ``max(5 noise, high / 5) * factor``.
    """
    w = np.asarray(weight, dtype=np.float64).ravel()
    w = w[np.isfinite(w)]
    if w.size > 100_000:
        w = w[np.linspace(0, w.size - 1, 100_000).astype(np.int64)]
    q05, q15, q80, q99 = np.quantile(w, [0.05, 0.15, 0.8, 0.99])
    sel = w[(w >= q80) & (w <= q99)]
    high = sel.mean() if sel.size else q99
    noise = w[w <= q15].mean()
    if noise > high / 10:
        noise = w[w <= q05].mean()
        if noise > high / 10:
            noise = 0.0
    return float(max(5 * noise, high / 5) * factor)


def _largest(m: np.ndarray) -> np.ndarray:
    """The largest connected component (face connectivity, ``ndimage.label``'s default)."""
    lab, n = ndimage.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(np.argmax(sizes))
    return m


def _separated_component(m: np.ndarray, vs, separation_mm: float) -> np.ndarray:
    """Largest component of ``m`` after cutting bridges narrower than ``2 * separation_mm``.

    Core: voxels of ``m`` farther than ``separation_mm`` (mm, Euclidean, outside the array counts
    as outside ``m``) from its outside, largest component. Result: the voxels of ``m`` within
    ``separation_mm + min(vs)`` of the core and connected to it inside that set. Falls back to
    the plain largest component of ``m`` when the core is empty (objects thinner than
    ``2 * separation_mm``).
    """
    depth_mm = ndimage.distance_transform_edt(np.pad(m, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    core = depth_mm > separation_mm
    if not core.any():
        return _largest(m)
    core = _largest(core)
    near = m & (ndimage.distance_transform_edt(~core, sampling=vs)
                <= separation_mm + float(min(vs)))
    lab, _ = ndimage.label(near)
    keep = np.unique(lab[core])
    return np.isin(lab, keep[keep > 0])


def _auto_mask_one(mag: np.ndarray, vs, threshold: str, factor: float, opening_mm: float,
                   closing_mm: float, fill_holes: bool, largest_component: bool,
                   separation_mm: float = 0.0) -> np.ndarray:
    finite = np.isfinite(mag)
    mag = np.where(finite, mag, 0.0)
    if threshold == "otsu":
        from skimage.filters import threshold_otsu

        t = float(threshold_otsu(mag[finite])) * factor
    else:
        t = robust_threshold(mag[finite], factor)
    m = mag > t
    if opening_mm > 0:
        m = ndimage.binary_opening(m, ellipsoid_structure(opening_mm, vs))
    if largest_component:
        m = _separated_component(m, vs, separation_mm) if separation_mm > 0 else _largest(m)
    if closing_mm > 0:
        st = ellipsoid_structure(closing_mm, vs)
        pad = [(s // 2 + 1,) * 2 for s in st.shape]
        m = ndimage.binary_closing(np.pad(m, pad), st)[
            tuple(slice(p[0], p[0] + n) for p, n in zip(pad, m.shape))]
    if fill_holes:
        m = ndimage.binary_fill_holes(m)
    return m


class BrainMask(OptionalKeysTransform):
    """The user's mask, or an automatic brain mask from the magnitude.

    Parameters
    ----------
    threshold : {"otsu", "robust"}
        Otsu threshold (``skimage.filters.threshold_otsu``) or the robust-mask rule
        (:func:`robust_threshold`).
    factor : float
        Multiplies the threshold.
    combine : {"rss", "first"}
        Multi-echo magnitude -> one image: root sum of squares over echoes, or the first echo.
    multi_echo : bool
        Whether the magnitude has an echo axis at dim -4 (``(..., E, X, Y, Z)``, the sample-dict
        layout) or is a single image ``(..., X, Y, Z)``.
    opening_mm, closing_mm : float
        Radii (mm) of the morphological opening (before the largest component) and closing
        (after it); 0 disables.
    fill_holes, largest_component : bool
    separation_mm : float
        With ``largest_component``: erosion radius (mm) before the component is chosen, which
        cuts bright bridges narrower than twice this between brain and scalp (see the module
        docstring); 0 takes the largest component of the opened mask as it is.

    Call
    ----
    ``BrainMask()(magnitude, mask=None, voxel_size_mm=(1, 1, 1))`` -> bool mask
    (..., X, Y, Z) on the magnitude's device. A given ``mask`` is returned (as bool) unchanged.
    Sample dict: ``magnitude, mask (optional), voxel_size_mm`` -> ``mask``.
    """

    input_keys = {"magnitude": "magnitude", "voxel_size_mm": "voxel_size_mm"}
    optional_input_keys = {"mask": "mask"}
    output_keys = ("mask",)

    def __init__(self, threshold: str = "otsu", factor: float = 1.0, combine: str = "rss",
                 multi_echo: bool = True, opening_mm: float = 2.0, closing_mm: float = 2.0,
                 fill_holes: bool = True, largest_component: bool = True,
                 separation_mm: float = 4.0) -> None:
        if threshold not in ("otsu", "robust"):
            raise ValueError(f"threshold must be 'otsu' or 'robust', got {threshold!r}")
        if combine not in ("rss", "first"):
            raise ValueError(f"combine must be 'rss' or 'first', got {combine!r}")
        if not (factor > 0 and opening_mm >= 0 and closing_mm >= 0 and separation_mm >= 0):
            raise ValueError("factor must be positive and radii non-negative")
        self.threshold = threshold
        self.factor = float(factor)
        self.combine = combine
        self.multi_echo = bool(multi_echo)
        self.opening_mm = float(opening_mm)
        self.closing_mm = float(closing_mm)
        self.fill_holes = bool(fill_holes)
        self.largest_component = bool(largest_component)
        self.separation_mm = float(separation_mm)

    def magnitude_image(self, magnitude: torch.Tensor) -> torch.Tensor:
        """The single image (..., X, Y, Z) the threshold is applied to."""
        mag = magnitude if magnitude.is_floating_point() else magnitude.to(torch.float32)
        if not self.multi_echo:
            return mag.abs()
        if mag.ndim < 4:
            raise ValueError(f"multi-echo magnitude must be (..., E, X, Y, Z), "
                             f"got {tuple(mag.shape)}")
        if self.combine == "first":
            return mag[..., 0, :, :, :].abs()
        return torch.sqrt((mag * mag).sum(dim=-4))

    def __call__(self, magnitude: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
        if mask is not None:
            return torch.as_tensor(mask).to(torch.bool)
        if magnitude is None:
            raise ValueError("BrainMask needs a magnitude image when no mask is given")
        vs = as_voxel_size_mm(voxel_size_mm)
        img = self.magnitude_image(torch.as_tensor(magnitude))
        arr = img.detach().cpu().to(torch.float64).numpy()
        lead = arr.shape[:-3]
        flat = arr.reshape(-1, *arr.shape[-3:])
        out = np.stack([_auto_mask_one(a, vs, self.threshold, self.factor, self.opening_mm,
                                       self.closing_mm, self.fill_holes, self.largest_component,
                                       self.separation_mm)
                        for a in flat])
        return torch.from_numpy(out.reshape(*lead, *arr.shape[-3:])).to(img.device)

    def __repr__(self) -> str:
        return (f"BrainMask(threshold={self.threshold!r}, factor={self.factor}, "
                f"combine={self.combine!r}, opening_mm={self.opening_mm}, "
                f"closing_mm={self.closing_mm}, separation_mm={self.separation_mm})")
