"""A deterministic head-like susceptibility phantom for evaluation.

Independent of the training simulator (:mod:`qsmnet.simulation.sources`): anatomy is drawn from
fixed structures — an irregular brain with cortex, white matter, ventricles, paired deep-grey
nuclei, venous sinuses and cortical veins, a calcification and a microbleed, inside a skull and
scalp, surrounded by air and with air-filled sinuses and ear canals — defined in millimetres so
that any voxel size samples the *same* head. ``seed`` only perturbs shapes and values a little,
to make a small set of distinct subjects.

Susceptibility values are in ppm relative to CSF (water); air is +9.4 ppm, cortical bone -2.0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: Tissue labels of the segmentation returned with the phantom.
LABELS = {
    "air": 0, "scalp": 1, "skull": 2, "csf": 3, "grey_matter": 4, "white_matter": 5,
    "caudate": 6, "putamen": 7, "globus_pallidus": 8, "thalamus": 9, "substantia_nigra": 10,
    "red_nucleus": 11, "dentate": 12, "vein": 13, "calcification": 14, "microbleed": 15,
    "sinus_air": 16,
}

# label: (chi ppm, M0, R2* 1/s)
_TISSUE = {
    "air": (9.4, 0.0, 0.0), "scalp": (0.0, 0.9, 30.0), "skull": (-2.0, 0.1, 300.0),
    "csf": (0.0, 1.0, 4.0), "grey_matter": (0.015, 0.8, 16.0), "white_matter": (-0.03, 0.7, 21.0),
    "caudate": (0.06, 0.8, 25.0), "putamen": (0.05, 0.8, 28.0),
    "globus_pallidus": (0.16, 0.7, 45.0), "thalamus": (0.025, 0.75, 22.0),
    "substantia_nigra": (0.13, 0.7, 40.0), "red_nucleus": (0.10, 0.7, 38.0),
    "dentate": (0.11, 0.7, 35.0), "vein": (0.40, 0.5, 60.0), "calcification": (-0.45, 0.3, 80.0),
    "microbleed": (0.9, 0.3, 120.0), "sinus_air": (9.4, 0.0, 0.0),
}


@dataclass
class HeadPhantom:
    """Arrays of one phantom, all ``(X, Y, Z)`` on the requested grid.

    Attributes
    ----------
    chi_ppm : float64, susceptibility of everything (head and air), ppm relative to CSF.
    brain_mask : bool, the brain (the region QSM reconstructs).
    seg : int16, tissue labels (:data:`LABELS`).
    m0 : float64, proton density (a.u.).
    r2star_hz : float64, R2* in 1/s.
    voxel_size_mm : (3,) voxel size.
    """

    chi_ppm: np.ndarray
    brain_mask: np.ndarray
    seg: np.ndarray
    m0: np.ndarray
    r2star_hz: np.ndarray
    voxel_size_mm: tuple[float, float, float]
    meta: dict = field(default_factory=dict)

    @property
    def chi_brain_ppm(self) -> np.ndarray:
        """Susceptibility inside the brain, referenced to its mean there; 0 outside."""
        chi = np.where(self.brain_mask, self.chi_ppm, 0.0)
        chi[self.brain_mask] -= chi[self.brain_mask].mean()
        return chi


def default_shape(voxel_size_mm: Sequence[float], fov_mm: Sequence[float] = (176, 208, 176),
                  multiple: int = 8) -> tuple[int, int, int]:
    """Grid size covering ``fov_mm`` at ``voxel_size_mm``, rounded up to ``multiple``."""
    return tuple(int(multiple * np.ceil(f / v / multiple)) for f, v in zip(fov_mm, voxel_size_mm))


def _ellipsoid(x, y, z, centre, semi, rot=None):
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    if rot is not None:
        dx, dy, dz = (rot[0, 0] * dx + rot[0, 1] * dy + rot[0, 2] * dz,
                      rot[1, 0] * dx + rot[1, 1] * dy + rot[1, 2] * dz,
                      rot[2, 0] * dx + rot[2, 1] * dy + rot[2, 2] * dz)
    return (dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2


def _rot_z(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _tube(x, y, z, points: np.ndarray, radius_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` of the polyline through ``points`` (N, 3) in mm."""
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
    for p0, p1 in zip(points[:-1], points[1:]):
        seg = p1 - p0
        length2 = float(seg @ seg)
        t = ((x - p0[0]) * seg[0] + (y - p0[1]) * seg[1] + (z - p0[2]) * seg[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        d2 = ((x - p0[0] - t * seg[0]) ** 2 + (y - p0[1] - t * seg[1]) ** 2
              + (z - p0[2] - t * seg[2]) ** 2)
        out |= d2 <= radius_mm ** 2
    return out


def _paint_structures(put: Callable, x, y, z, brain_semi: np.ndarray,
                      rng: np.random.Generator, jit: Callable) -> None:
    """Paint ventricles, deep grey matter, veins, a calcification and a microbleed with ``put``."""
    # Lateral ventricles (CSF), midline.
    for side in (-1, 1):
        put(_ellipsoid(x, y, z, (side * 9.0, 4.0, 18.0), (6, 24, 7), _rot_z(side * 8)) <= 1, "csf")
    # Deep grey matter, paired.
    for side in (-1, 1):
        put(_ellipsoid(x, y, z, (side * 13.0, 16.0, 14.0), (5, 10, 7)) <= 1, "caudate")
        put(_ellipsoid(x, y, z, (side * 25.0, 6.0, 4.0), (6, 15, 9), _rot_z(side * 10)) <= 1,
            "putamen")
        put(_ellipsoid(x, y, z, (side * 18.5, 4.0, 2.0), (4, 9, 6), _rot_z(side * 10)) <= 1,
            "globus_pallidus")
        put(_ellipsoid(x, y, z, (side * 10.0, -10.0, 8.0), (8, 12, 8)) <= 1, "thalamus")
        put(_ellipsoid(x, y, z, (side * 9.0, -10.0, -12.0), (5, 8, 3), _rot_z(side * 25)) <= 1,
            "substantia_nigra")
        put(_ellipsoid(x, y, z, (side * 5.0, -13.0, -8.0), (3, 3, 3)) <= 1, "red_nucleus")
        put(_ellipsoid(x, y, z, (side * 14.0, -52.0, -30.0), (6, 7, 5), _rot_z(side * 30)) <= 1,
            "dentate")
    # Veins: superior sagittal sinus along the top midline, straight sinus, cortical veins.
    top = brain_semi[2] + 6.0
    sss = np.array([[0, 70, top - 30], [0, 40, top - 6], [0, 0, top], [0, -40, top - 6],
                    [0, -70, top - 28], [0, -82, -5]])
    put(_tube(x, y, z, sss, 3.0 * jit(0.1)), "vein")
    put(_tube(x, y, z, np.array([[0, -20, 12], [0, -50, 22], [0, -75, 0]]), 2.0), "vein")
    for _ in range(6):
        a = rng.uniform(0, 2 * np.pi)
        el = rng.uniform(0.1, 1.0)
        direction = np.array([np.cos(a) * np.cos(el), np.sin(a) * np.cos(el), np.sin(el)])
        start = direction * brain_semi * 0.55
        end = direction * brain_semi * 0.97
        mid = (start + end) / 2 + rng.normal(0, 4, 3)
        put(_tube(x, y, z, np.stack([start, mid, end]), rng.uniform(0.8, 1.4)), "vein")
    # One calcification and one microbleed.
    put(_ellipsoid(x, y, z, (-30.0, 30.0, 20.0), (3, 3, 3)) <= 1, "calcification")
    put(_ellipsoid(x, y, z, (32.0, -30.0, 25.0), (2, 2, 2)) <= 1, "microbleed")


def _tissue_maps(seg: np.ndarray, shape: tuple[int, ...], vs: np.ndarray,
                 rng: np.random.Generator, jit: Callable
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(chi, m0, r2s)`` per tissue label (jittered), with fine texture in grey and white
    matter."""
    chi = np.zeros(shape)
    m0 = np.zeros(shape)
    r2s = np.zeros(shape)
    for name, (c, m, r2) in _TISSUE.items():
        sel = seg == LABELS[name]
        if name not in ("air", "sinus_air", "csf"):
            c = c * jit(0.1)
        chi[sel], m0[sel], r2s[sel] = c, m, r2

    # Fine texture in grey and white matter (smooth, +-0.01 ppm), in mm so the grid does not matter.
    tissue = (seg == LABELS["grey_matter"]) | (seg == LABELS["white_matter"])
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0 / vs)
    noise *= 0.01 / (noise[tissue].std() + 1e-12)
    chi[tissue] += noise[tissue]

    return chi, m0, r2s


def head_phantom(shape: Sequence[int] | None = None,
                 voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                 seed: int = 0, scale: float = 1.0) -> HeadPhantom:
    """Build the head-like phantom on a grid.

    Parameters
    ----------
    shape : (X, Y, Z), optional
        Grid size; defaults to :func:`default_shape` (a 176 x 208 x 176 mm field of view times
        ``scale``). The head is centred in the field of view.
    voxel_size_mm : (3,)
        Voxel size in mm; the anatomy is in mm, so 1x1x2 mm samples the same head coarser in z.
    seed : int
        Small perturbations of shapes and values (distinct subjects, same anatomy plan).
    scale : float
        Isotropic size factor of the head (1.0: an adult brain of about 140 x 170 x 120 mm).

    Returns
    -------
    HeadPhantom
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    if shape is None:
        shape = default_shape(vs, fov_mm=tuple(scale * f for f in (176, 208, 176)))
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    jit = lambda s=0.04: 1.0 + s * rng.uniform(-1, 1)  # noqa: E731 - tiny local helper

    # Physical coordinates (mm) centred in the field of view; s scales the anatomy.
    s = scale
    axes = [(np.arange(n) - (n - 1) / 2.0) * d for n, d in zip(shape, vs)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    x = x / s
    y = y / s
    z = z / s

    # Irregular brain: an ellipsoid whose radius is modulated by low-order angular harmonics.
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2) + 1e-9
    cos_t, phi = z / r, np.arctan2(y, x)
    wobble = (1.0 + 0.035 * rng.uniform(0.5, 1) * np.cos(2 * phi + rng.uniform(0, 6.3))
              + 0.03 * rng.uniform(0.5, 1) * cos_t * np.sin(3 * phi + rng.uniform(0, 6.3))
              + 0.02 * rng.uniform(0.5, 1) * (3 * cos_t ** 2 - 1))
    brain_semi = np.array([68.0, 84.0, 58.0]) * np.array([jit(), jit(), jit()])
    brain_e = _ellipsoid(x, y, z, (0, 2.0, 6.0), brain_semi) / wobble ** 2
    brain = brain_e <= 1.0
    head = _ellipsoid(x, y, z, (0, 0, 0), brain_semi + [16, 16, 22]) / wobble ** 2 <= 1.0
    skull_in = _ellipsoid(x, y, z, (0, 2.0, 6.0), brain_semi + [4, 4, 4]) / wobble ** 2 <= 1.0
    skull_out = _ellipsoid(x, y, z, (0, 1.0, 3.0), brain_semi + [11, 11, 12]) / wobble ** 2 <= 1.0

    seg = np.full(shape, LABELS["air"], dtype=np.int16)
    seg[np.broadcast_to(head, shape)] = LABELS["scalp"]
    seg[np.broadcast_to(skull_out, shape)] = LABELS["skull"]
    seg[np.broadcast_to(skull_in, shape)] = LABELS["csf"]
    # Cortex: the outer ~4 mm of the brain is grey matter, the rest white matter.
    wm_core = brain_e <= (1.0 - 4.5 / brain_semi.mean()) ** 2
    seg[np.broadcast_to(brain, shape)] = LABELS["grey_matter"]
    seg[np.broadcast_to(wm_core, shape)] = LABELS["white_matter"]

    def put(mask, name):
        seg[np.broadcast_to(mask, shape) & np.broadcast_to(brain, shape)] = LABELS[name]

    _paint_structures(put, x, y, z, brain_semi, rng, jit)
    # Air: frontal and sphenoid sinuses, ear canals (outside the brain, inside the head).
    air_in_head = (
        (_ellipsoid(x, y, z, (0, 90.0, -30.0), (14, 8, 10)) <= 1)
        | (_ellipsoid(x, y, z, (0, 45.0, -55.0), (12, 10, 9)) <= 1)
        | (_ellipsoid(x, y, z, (-74.0, -8.0, -38.0), (12, 5, 5)) <= 1)
        | (_ellipsoid(x, y, z, (74.0, -8.0, -38.0), (12, 5, 5)) <= 1))
    air_in_head = np.broadcast_to(air_in_head, shape) & ~np.broadcast_to(brain, shape)
    seg[air_in_head] = LABELS["sinus_air"]

    chi, m0, r2s = _tissue_maps(seg, shape, vs, rng, jit)
    brain_mask = np.broadcast_to(brain, shape).copy()
    return HeadPhantom(chi_ppm=chi, brain_mask=brain_mask, seg=seg, m0=m0, r2star_hz=r2s,
                       voxel_size_mm=tuple(float(v) for v in vs),
                       meta={"seed": seed, "scale": scale, "shape": shape})
