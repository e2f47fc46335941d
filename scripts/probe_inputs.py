#!/usr/bin/env python
"""Probe qsmnet's input checks with corrupted or unusual inputs and write the table of outcomes.

Builds one small simulated subject (``qsmnet.simulation.bids.write_simulated_subject``), derives
from it every input in :data:`PROBES` (one folder each), runs ``qsmnet predict`` or ``qsmnet
run-stage`` on it in a subprocess (``--method tkd --no-preview`` for speed), and records the exit
code, the line qsmnet printed (the error, or the assumption it logged) and whether anything was
written. The table goes to a markdown file::

    python scripts/probe_inputs.py --out docs/input_probes.md   # a few minutes on 2 cores

Outcomes: **refused** (exit 2, one ``qsmnet: error:`` line, nothing written), **recognised**
(exit 0 with a logged line saying what was assumed), **accepted** (exit 0, nothing to say).
Every probe states the outcome it should have; the script exits 1 if any differs, and
``tests/test_input_checks.py`` runs a handful of the same probes, so the table cannot go stale
unnoticed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

COMMAND = "python scripts/probe_inputs.py --out docs/input_probes.md"
#: Simulated subject the probes derive from (the simulator's minimum is 16 per axis).
BASE_SHAPE = (32, 32, 24)
FAST = ("--method", "tkd", "--no-preview")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------------------------------------
# The simulated subject every probe starts from
# ---------------------------------------------------------------------------------------------

@dataclass
class Base:
    """Arrays of the simulated subject: phase/magnitude (E, X, Y, Z), rad and a.u."""

    phase: np.ndarray
    magnitude: np.ndarray
    mask: np.ndarray
    totalfield: np.ndarray
    localfield: np.ndarray
    affine: np.ndarray
    te_s: tuple[float, ...]
    b0_t: float
    b0_dir: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)

    def params(self, **changes) -> dict:
        p = {"TE": list(self.te_s), "B0": self.b0_t, "B0_dir": list(self.b0_dir),
             "voxel_size": [float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0)]}
        p.update(changes)
        return {k: v for k, v in p.items() if v is not None}


def make_base(folder: Path, shape: Sequence[int] = BASE_SHAPE, seed: int = 0) -> Base:
    """Simulate one subject into ``folder`` and load it."""
    from qsmnet.simulation.bids import write_simulated_subject

    te = (0.004, 0.012, 0.020, 0.028)
    w = write_simulated_subject(folder, subject="01", seed=seed, shape=tuple(shape), te_s=te)

    def load(p):
        return np.asarray(nib.load(str(p)).get_fdata(dtype=np.float32))

    return Base(phase=np.stack([load(p) for p in w["phase"]]),
                magnitude=np.stack([load(p) for p in w["magnitude"]]),
                mask=load(w["mask"]).astype(np.uint8), totalfield=load(w["totalfield"]),
                localfield=load(w["localfield"]), affine=nib.load(str(w["mask"])).affine,
                te_s=te, b0_t=3.0, b0_dir=(0.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Writers of derived inputs (relative paths: messages and the table stay free of temp names)
# ---------------------------------------------------------------------------------------------

def save(path: Path, data, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(data)
    if arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def echoes_last(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 0, -1)


def nifti_case(base: Base, d: Path, *, phase=None, magnitude=None, mask=None,
               params: dict | None = None, affine=None, extra: Sequence[str] = (),
               use_params: bool = True, te: Sequence[float] | None = None) -> list[str]:
    """``predict --phase phase.nii.gz --magnitude magnitude.nii.gz --params params.json``."""
    aff = base.affine if affine is None else affine
    save(d / "phase.nii.gz", echoes_last(base.phase if phase is None else phase), aff)
    save(d / "magnitude.nii.gz",
         echoes_last(base.magnitude if magnitude is None else magnitude), aff)
    argv = ["predict", "--phase", "phase.nii.gz", "--magnitude", "magnitude.nii.gz"]
    if use_params:
        (d / "params.json").write_text(json.dumps(base.params() if params is None else params))
        argv += ["--params", "params.json"]
    if te is not None:
        argv += ["--te", *map(str, te), "--b0", str(base.b0_t)]
    if mask is not None:
        save(d / "mask.nii.gz", mask, aff)
        argv += ["--mask", "mask.nii.gz"]
    return [*argv, "--out", "out", *FAST, *extra]


def bids_case(base: Base, d: Path, *, phase=None, magnitude=None, with_magnitude=True,
              sidecar: Callable[[int, dict], dict] | None = None, affines=None, mask=None,
              extra: Sequence[str] = ()) -> list[str]:
    """``predict --bids bids``: one 3-D file and sidecar per echo and part."""
    phase = base.phase if phase is None else phase
    magnitude = base.magnitude if magnitude is None else magnitude
    anat = d / "bids" / "sub-01" / "anat"
    (d / "bids").mkdir(parents=True, exist_ok=True)
    (d / "bids" / "dataset_description.json").write_text(
        json.dumps({"Name": "probe", "BIDSVersion": "1.9.0"}))
    for e, te in enumerate(base.te_s, start=1):
        meta = {"EchoTime": te, "MagneticFieldStrength": base.b0_t, "B0_dir": list(base.b0_dir)}
        if sidecar is not None:
            meta = sidecar(e, meta)
        aff = base.affine if affines is None else affines[e - 1]
        parts = [("phase", phase[e - 1])] + ([("mag", magnitude[e - 1])] if with_magnitude
                                            else [])
        for part, data in parts:
            stem = f"sub-01_echo-{e}_part-{part}_MEGRE"
            save(anat / f"{stem}.nii.gz", data, aff)
            (anat / f"{stem}.json").write_text(json.dumps(meta))
    argv = ["predict", "--bids", "bids", "--out", "out", *FAST, *extra]
    if mask is not None:
        save(d / "mask.nii.gz", mask, base.affine)
        argv += ["--mask", "mask.nii.gz"]
    return argv


def qsmci_case(base: Base, d: Path, stage: str, *, phase=None, magnitude=None, mask=None,
               params: dict | None = None, field_ppm=None, extra: Sequence[str] = ()
               ) -> list[str]:
    """``run-stage STAGE in out``: the canonical files of ``stage`` under ``in/``."""
    i = d / "in"
    if stage in ("field-mapping", "end-to-end"):
        save(i / "phase.nii.gz", echoes_last(base.phase if phase is None else phase),
             base.affine)
        save(i / "magnitude.nii.gz",
             echoes_last(base.magnitude if magnitude is None else magnitude), base.affine)
    elif stage == "bfr":
        save(i / "totalfield.nii.gz", base.totalfield if field_ppm is None else field_ppm,
             base.affine)
    else:
        save(i / "localfield.nii.gz", base.localfield if field_ppm is None else field_ppm,
             base.affine)
    save(i / "mask.nii.gz", base.mask if mask is None else mask, base.affine)
    (i / "params.json").write_text(json.dumps(base.params() if params is None else params))
    argv = ["run-stage", stage, "in", "out", "--method", "tkd"]
    return [*argv, *extra]


def shifted(affine: np.ndarray, mm: float = 2.0) -> np.ndarray:
    a = np.array(affine, dtype=np.float64)
    a[0, 3] += mm
    return a


def degrees(phase: np.ndarray) -> np.ndarray:
    return np.round(phase.astype(np.float64) * 180.0 / math.pi).astype(np.int16)


def fractional_mask(base: Base) -> np.ndarray:
    """A probability map: 0.9 in the brain, soft edge values around it."""
    from scipy import ndimage

    m = base.mask.astype(bool)
    edge = ndimage.binary_dilation(m, iterations=2) & ~m
    return (0.9 * m + 0.3 * edge).astype(np.float32)


def _with(d: Path, name: str, data: bytes) -> None:
    (d / name).write_bytes(data)


# ---------------------------------------------------------------------------------------------
# The probes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """One unusual input: how to build it, and what qsmnet should do with it.

    ``build(base, folder)`` writes the inputs into ``folder`` and returns the qsmnet arguments
    (run with ``folder`` as the working directory). ``expect`` is the outcome it should have and
    ``match`` a piece of the line qsmnet should print (error or logged assumption).
    """

    name: str
    what: str
    build: Callable[[Base, Path], list[str]]
    expect: str
    match: str = ""
    note: str = ""


def _bids_reversed(base: Base, d: Path, **kw) -> list[str]:
    return bids_case(base, d, phase=base.phase[::-1], magnitude=base.magnitude[::-1], **kw)


def _truncated(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    raw = (d / "phase.nii.gz").read_bytes()
    _with(d, "phase.nii.gz", raw[: len(raw) // 2])
    return argv


def _garbage(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    _with(d, "phase.nii.gz", gzip.compress(np.random.default_rng(0).bytes(4096)))
    return argv


def _unreadable(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    os.chmod(d / "phase.nii.gz", 0)
    return argv


def _dir_as_file(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    (d / "phase.nii.gz").unlink()
    (d / "phase.nii.gz").mkdir()
    return argv


def _not_nifti_name(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    (d / "phase.nii.gz").rename(d / "phase.img")
    return [a if a != "phase.nii.gz" else "phase.img" for a in argv]


def _missing_file(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    (d / "magnitude.nii.gz").unlink()
    return argv


def _empty_bids(base: Base, d: Path) -> list[str]:
    (d / "bids").mkdir(parents=True)
    (d / "bids" / "dataset_description.json").write_text('{"Name": "empty"}')
    return ["predict", "--bids", "bids", *FAST]


def _missing_subject(base: Base, d: Path) -> list[str]:
    return [*bids_case(base, d), "--subject", "02"]


def _params_text(text: str):
    def build(base: Base, d: Path) -> list[str]:
        argv = nifti_case(base, d)
        (d / "params.json").write_text(text)
        return argv
    return build


def _drop_key(key: str):
    def sidecar(e: int, meta: dict) -> dict:
        meta.pop(key)
        return meta
    return sidecar


def _set_key(key: str, value, echo: int | None = None):
    def sidecar(e: int, meta: dict) -> dict:
        if echo is None or e == echo:
            meta[key] = value
        return meta
    return sidecar


def _te_probe(te: Sequence[float]):
    def build(base: Base, d: Path) -> list[str]:
        return nifti_case(base, d, params=base.params(TE=list(te)))
    return build


def _thin(base: Base, d: Path) -> list[str]:
    return nifti_case(base, d, phase=base.phase[..., 10:12], magnitude=base.magnitude[..., 10:12])


def _two_d(base: Base, d: Path) -> list[str]:
    save(d / "phase.nii.gz", base.phase[0, :, :, 12], base.affine)
    save(d / "magnitude.nii.gz", base.magnitude[0, :, :, 12], base.affine)
    (d / "params.json").write_text(json.dumps(base.params(TE=[base.te_s[0]])))
    return ["predict", "--phase", "phase.nii.gz", "--magnitude", "magnitude.nii.gz",
            "--params", "params.json", "--out", "out", *FAST]


def _five_d(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    save(d / "phase.nii.gz", echoes_last(base.phase)[..., None], base.affine)
    return argv


def _nan_phase(base: Base, d: Path) -> list[str]:
    phase = base.phase.copy()
    phase[1, 5, 5, 5] = np.nan
    return nifti_case(base, d, phase=phase)


def _inf_magnitude(base: Base, d: Path) -> list[str]:
    mag = base.magnitude.copy()
    mag[0, 3, 3, 3] = np.inf
    return nifti_case(base, d, magnitude=mag)


def _mask_other_grid(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d, mask=base.mask)
    save(d / "mask.nii.gz", base.mask[:, :, :-1], base.affine)
    return argv


def _mask_other_affine(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d, mask=base.mask)
    save(d / "mask.nii.gz", base.mask, shifted(base.affine))
    return argv


def _mag_shape(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    save(d / "magnitude.nii.gz", echoes_last(base.magnitude)[:, :, :-2], base.affine)
    return argv


def _mag_affine(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    save(d / "magnitude.nii.gz", echoes_last(base.magnitude), shifted(base.affine))
    return argv


def _echo_count(base: Base, d: Path) -> list[str]:
    return nifti_case(base, d, magnitude=base.magnitude[:3])


def _echo_affines(base: Base, d: Path) -> list[str]:
    affines = [base.affine, shifted(base.affine), base.affine, base.affine]
    return bids_case(base, d, affines=affines)


def _qsmci_te_count(base: Base, d: Path) -> list[str]:
    return qsmci_case(base, d, "field-mapping", params=base.params(TE=list(base.te_s[:3])))


def _qsmci_missing(base: Base, d: Path) -> list[str]:
    argv = qsmci_case(base, d, "bfr")
    (d / "in" / "totalfield.nii.gz").unlink()
    return argv


def _earlier_set(base: Base, d: Path, extra: Sequence[str] = ()) -> list[str]:
    """An output folder holding the set of an earlier ``--method tv`` run."""
    argv = nifti_case(base, d, extra=extra)
    out = d / "out"
    out.mkdir()
    save(out / "chimap.nii.gz", base.localfield, base.affine)
    (out / "chimap.json").write_text(json.dumps({"method": "tv",
                                                 "created": "2026-01-01T00:00:00+00:00"}))
    return argv


def _out_is_file(base: Base, d: Path) -> list[str]:
    argv = nifti_case(base, d)
    (d / "out").write_text("a file, not a folder\n")
    return argv


def _oblique_b0_dir_conflict(base: Base, d: Path) -> list[str]:
    return bids_case(base, d, sidecar=_set_key("B0_dir", [0.0, 0.5, 1.0]))


def _voxel_conflict(base: Base, d: Path) -> list[str]:
    return nifti_case(base, d, params=base.params(voxel_size=[1.0, 1.0, 2.0]))


PROBES: tuple[Probe, ...] = (
    # --- references: the subject as simulated -----------------------------------------------
    Probe("bids", "the simulated BIDS subject as written", bids_case, "accepted"),
    Probe("nifti", "the same as 4-D NIfTI + params.json", nifti_case, "accepted"),
    Probe("stage-dipole", "QSM-CI dipole stage folder",
          lambda b, d: qsmci_case(b, d, "dipole"), "accepted"),
    # --- phase units ---------------------------------------------------------------------------
    Probe("phase-deg-int", "phase as integer degrees in [-180, 180]",
          lambda b, d: nifti_case(b, d, phase=degrees(b.phase)), "recognised",
          "taken as degrees"),
    Probe("phase-deg-float", "phase as float degrees in [-180, 180]",
          lambda b, d: nifti_case(b, d, phase=(b.phase * (180 / math.pi)).astype(np.float32)),
          "recognised", "taken as degrees"),
    Probe("phase-deg-0-360", "phase as integer degrees in [0, 360)",
          lambda b, d: nifti_case(b, d, phase=np.mod(degrees(b.phase), 360).astype(np.int16)),
          "recognised", "fill the degree range [0, 360]"),
    Probe("phase-0-2pi", "phase in radians in [0, 2pi)",
          lambda b, d: nifti_case(b, d, phase=np.mod(b.phase, 2 * math.pi).astype(np.float32)),
          "recognised", "fill [0, 2*pi]"),
    Probe("phase-uint12", "phase as Siemens integers 0..4095",
          lambda b, d: nifti_case(b, d, phase=np.round((b.phase + math.pi) * 4096 /
                                                       (2 * math.pi)).clip(0, 4095)
                                  .astype(np.int16)),
          "recognised", "integers in [0, 4095]"),
    Probe("phase-int12-signed", "phase as integers -4096..4095",
          lambda b, d: nifti_case(b, d, phase=np.round(b.phase * 4096 / math.pi)
                                  .clip(-4096, 4095).astype(np.int16)),
          "recognised", "integers in [-4096, 4095]"),
    Probe("phase-mrad", "phase as integer milliradians (-3142..3142)",
          lambda b, d: nifti_case(b, d, phase=np.round(1000 * b.phase).astype(np.int16)),
          "refused", "--phase-units"),
    Probe("phase-scaled", "phase in radians x 10 (float)",
          lambda b, d: nifti_case(b, d, phase=10 * b.phase), "refused", "not in radians"),
    Probe("phase-units-int", "integer degrees with --phase-units int (forced)",
          lambda b, d: nifti_case(b, d, phase=degrees(b.phase), extra=["--phase-units", "int"]),
          "recognised", "(--phase-units) in [-256, 255]",
          "the user's choice: read as 9-bit raw phase"),
    Probe("phase-units-deg", "milliradian integers with --phase-units deg (forced)",
          lambda b, d: nifti_case(b, d, phase=np.round(1000 * b.phase).astype(np.int16),
                                  extra=["--phase-units", "deg"]),
          "recognised", "taken as degrees (--phase-units)", "the user's choice"),
    Probe("phase-is-magnitude", "magnitude given as phase and phase as magnitude",
          lambda b, d: nifti_case(b, d, phase=b.magnitude, magnitude=b.phase), "refused",
          "magnitude has negative values"),
    # --- echo order ----------------------------------------------------------------------------
    Probe("echoes-reversed", "BIDS echoes stored in reverse order (TE ascending)",
          _bids_reversed, "refused", "magnitude grows with echo time"),
    Probe("echoes-reversed-4d", "4-D files with echoes reversed",
          lambda b, d: nifti_case(b, d, phase=b.phase[::-1], magnitude=b.magnitude[::-1]),
          "refused", "--no-decay-check"),
    Probe("echoes-reversed-override", "reversed echoes with --no-decay-check",
          lambda b, d: _bids_reversed(b, d, extra=["--no-decay-check"]), "accepted", "",
          "the user's choice"),
    Probe("echoes-reversed-no-mag", "reversed echoes, no magnitude (BIDS, --mask)",
          lambda b, d: _bids_reversed(b, d, with_magnitude=False, mask=b.mask), "accepted", "",
          "not detectable from phase alone (reads as the opposite phase polarity)"),
    # --- masks ---------------------------------------------------------------------------------
    Probe("mask-given", "the simulation's brain mask",
          lambda b, d: nifti_case(b, d, mask=b.mask), "accepted"),
    Probe("mask-all-ones", "mask of all ones (no background)",
          lambda b, d: nifti_case(b, d, mask=np.ones(b.shape, np.uint8)), "refused",
          "omit --mask for an automatic one"),
    Probe("stage-bfr-all-ones", "run-stage bfr, mask of all ones",
          lambda b, d: qsmci_case(b, d, "bfr", mask=np.ones(b.shape, np.uint8)), "refused",
          "mask covers the whole grid"),
    Probe("stage-e2e-all-ones", "run-stage end-to-end, mask of all ones",
          lambda b, d: qsmci_case(b, d, "end-to-end", mask=np.ones(b.shape, np.uint8)),
          "refused", "mask covers the whole grid"),
    Probe("stage-dipole-all-ones", "run-stage dipole, mask of all ones",
          lambda b, d: qsmci_case(b, d, "dipole", mask=np.ones(b.shape, np.uint8)), "accepted",
          "", "no background removal in this stage"),
    Probe("mask-probability", "probability map as mask (0.3 edge, 0.9 inside)",
          lambda b, d: nifti_case(b, d, mask=fractional_mask(b)), "refused", "--mask-threshold"),
    Probe("mask-threshold", "probability map with --mask-threshold 0.5",
          lambda b, d: nifti_case(b, d, mask=fractional_mask(b), extra=["--mask-threshold",
                                                                          "0.5"]),
          "recognised", "mask binarised at 0.5"),
    Probe("mask-0-255", "mask stored as 0/255",
          lambda b, d: nifti_case(b, d, mask=(255 * b.mask).astype(np.uint8)), "recognised",
          "every nonzero voxel taken as inside"),
    Probe("mask-labels", "label image (1, 2, 3) as mask",
          lambda b, d: nifti_case(b, d, mask=(b.mask * (1 + np.arange(b.shape[0]) % 3)[
              :, None, None]).astype(np.int16)), "recognised", "every nonzero voxel"),
    Probe("mask-negative", "mask of -1 outside, 1 inside",
          lambda b, d: nifti_case(b, d, mask=(2 * b.mask.astype(np.int16) - 1)), "refused",
          "negative values"),
    Probe("mask-empty", "mask of all zeros",
          lambda b, d: nifti_case(b, d, mask=np.zeros(b.shape, np.uint8)), "refused",
          "mask is empty"),
    Probe("mask-other-grid", "mask one slice short", _mask_other_grid, "refused", "differs"),
    Probe("mask-other-affine", "mask shifted by 2 mm", _mask_other_affine, "refused",
          "affine differs"),
    # --- geometry ------------------------------------------------------------------------------
    Probe("thin-2-slices", "volume two slices thick", _thin, "refused", "volume is only 2"),
    Probe("stage-dipole-thin", "run-stage dipole on a 2-slice local field",
          lambda b, d: qsmci_case(b, d, "dipole", field_ppm=b.localfield[..., 10:12],
                                  mask=b.mask[..., 10:12]), "refused", "volume is only 2"),
    Probe("image-2d", "2-D phase image", _two_d, "refused", "image is 2-D"),
    Probe("image-5d", "5-D phase image", _five_d, "refused", "5-D"),
    Probe("mag-other-shape", "magnitude on a smaller grid", _mag_shape, "refused", "differs"),
    Probe("mag-other-affine", "magnitude shifted by 2 mm", _mag_affine, "refused",
          "affine differs"),
    Probe("echo-other-affine", "BIDS echo 2 shifted by 2 mm", _echo_affines, "refused",
          "affine differs"),
    Probe("b0dir-sidecar-vs-affine", "sidecar B0_dir (0, 0.5, 1) disagrees with the affine",
          _oblique_b0_dir_conflict, "recognised", "degrees from the affine's scanner z",
          "the stated direction wins, with a warning"),
    Probe("voxel-size-conflict", "params.json voxel_size differs from the header",
          _voxel_conflict, "recognised", "voxel_size", "params.json wins, with a warning"),
    # --- echo times and field strength --------------------------------------------------------
    Probe("te-ms", "TE in milliseconds (4, 12, 20, 28)", _te_probe([4, 12, 20, 28]), "refused",
          "looks like milliseconds"),
    Probe("te-too-long", "TE of 0.4-0.95 s", _te_probe([0.4, 0.6, 0.8, 0.95]), "refused",
          "BIDS EchoTime is in seconds"),
    Probe("te-missing", "params.json without TE",
          lambda b, d: nifti_case(b, d, params=b.params(TE=None)), "refused", "no TE"),
    Probe("te-count", "3 echo times for 4 echoes",
          lambda b, d: nifti_case(b, d, use_params=False, te=b.te_s[:3]), "refused",
          "4 phase echo(es) but 3 echo time(s)"),
    Probe("te-decreasing", "echo times listed in decreasing order",
          _te_probe([0.028, 0.020, 0.012, 0.004]), "refused", "strictly increasing"),
    Probe("te-10x-short", "TE 10x too short (0.4-2.8 ms)", _te_probe([0.0004, 0.0012, 0.002,
                                                                       0.0028]),
          "accepted", "", "chi 10x too large; not detectable from the data"),
    Probe("sidecar-no-echotime", "BIDS sidecars without EchoTime",
          lambda b, d: bids_case(b, d, sidecar=_drop_key("EchoTime")), "refused",
          "no EchoTime"),
    Probe("sidecar-no-b0", "BIDS sidecars without MagneticFieldStrength",
          lambda b, d: bids_case(b, d, sidecar=_drop_key("MagneticFieldStrength")), "refused",
          "no MagneticFieldStrength"),
    Probe("sidecar-te-ms", "BIDS EchoTime of echo 3 in ms",
          lambda b, d: bids_case(b, d, sidecar=_set_key("EchoTime", 20.0, echo=3)), "refused",
          "looks like milliseconds"),
    Probe("sidecar-b0-mixed", "echo 2 at 1.5 T, the others at 3 T",
          lambda b, d: bids_case(b, d, sidecar=_set_key("MagneticFieldStrength", 1.5, echo=2)),
          "refused", "differs from"),
    Probe("b0-zero", "B0 of 0 T", lambda b, d: nifti_case(b, d, params=b.params(B0=0)),
          "refused", "field strength"),
    Probe("b0-300", "B0 of 300 T", lambda b, d: nifti_case(b, d, params=b.params(B0=300)),
          "refused", "outside (0, 20] T"),
    Probe("b0-wrong", "B0 of 1.5 T for 3 T data",
          lambda b, d: nifti_case(b, d, params=b.params(B0=1.5)), "accepted", "",
          "chi 2x too large; not detectable from the data"),
    Probe("b0dir-zero", "B0 direction (0, 0, 0)",
          lambda b, d: nifti_case(b, d, params=b.params(B0_dir=[0, 0, 0])), "refused",
          "B0 direction"),
    Probe("b0dir-text", "B0 direction \"z\"",
          lambda b, d: nifti_case(b, d, params=b.params(B0_dir="z")), "refused",
          "B0 direction"),
    # --- values --------------------------------------------------------------------------------
    Probe("phase-nan", "a NaN in the phase", _nan_phase, "refused", "NaN or infinite"),
    Probe("mag-inf", "an inf in the magnitude", _inf_magnitude, "refused", "NaN or infinite"),
    Probe("mag-negative", "negative magnitude (magnitude - 0.5)",
          lambda b, d: nifti_case(b, d, magnitude=b.magnitude - 0.5), "refused",
          "negative values"),
    Probe("echo-count", "3 magnitude echoes for 4 phase echoes", _echo_count, "refused",
          "3 magnitude echo(es) but 4 phase"),
    # --- files ---------------------------------------------------------------------------------
    Probe("nifti-truncated", "phase.nii.gz cut in half", _truncated, "refused",
          "cannot read as NIfTI"),
    Probe("nifti-garbage", "phase.nii.gz of random bytes", _garbage, "refused",
          "cannot read as NIfTI"),
    Probe("not-nifti-name", "phase.img (not a NIfTI name)", _not_nifti_name, "refused",
          "not a NIfTI file name"),
    Probe("file-missing", "magnitude.nii.gz missing", _missing_file, "refused",
          "file not found"),
    Probe("dir-as-file", "a folder named phase.nii.gz", _dir_as_file, "refused", "not a file"),
    Probe("unreadable", "phase.nii.gz with mode 000", _unreadable,
          "accepted" if IS_ROOT else "refused", "" if IS_ROOT else "Permission",
          "run as root here, and root reads any file" if IS_ROOT else ""),
    Probe("params-garbage", "params.json that is not JSON", _params_text("{TE: oops"),
          "refused", "cannot parse as JSON"),
    Probe("params-bids-keys", "a BIDS sidecar passed as params.json",
          _params_text(json.dumps({"EchoTime": 0.004, "MagneticFieldStrength": 3})), "refused",
          "EchoTime -> TE"),
    Probe("bids-empty", "BIDS folder with no subjects", _empty_bids, "refused",
          "part-phase_MEGRE"),
    Probe("bids-no-subject", "--subject 02 that does not exist", _missing_subject, "refused",
          "subject folder not found"),
    Probe("stage-missing-input", "run-stage bfr without totalfield.nii.gz", _qsmci_missing,
          "refused", "file not found"),
    Probe("stage-te-count", "run-stage field-mapping, params TE for 3 of 4 echoes",
          _qsmci_te_count, "refused", "4 echo(es) but params.json TE has 3"),
    Probe("stage-4d-field", "run-stage dipole on a 4-D local field",
          lambda b, d: qsmci_case(b, d, "dipole", field_ppm=np.stack([b.localfield] * 2, -1)),
          "refused", "image is 4-D"),
    Probe("stage-placeholder-te", "run-stage dipole with qsm-ci's placeholder TE [1.0]",
          lambda b, d: qsmci_case(b, d, "dipole", params=b.params(TE=[1.0])), "accepted"),
    Probe("out-earlier-set", "--out holding an earlier --method tv run's outputs", _earlier_set,
          "refused", "exists (made by --method tv"),
    Probe("out-overwrite", "the same with --overwrite",
          lambda b, d: _earlier_set(b, d, extra=("--overwrite",)), "accepted"),
    Probe("out-is-file", "--out names an existing file", _out_is_file, "refused",
          "exists and is not a folder"),
)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    probe: Probe
    argv: list[str]
    code: int
    outcome: str
    message: str
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == self.probe.expect and (
            not self.probe.match or self.probe.match in self.message)


def _files(folder: Path) -> dict[str, float]:
    out = {}
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                out[str(p.relative_to(folder))] = p.stat().st_mtime_ns
    return out


def _classify(code: int, stderr: str, match: str) -> tuple[str, str]:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("qsmnet:")]
    if code == 2:
        errors = [ln for ln in lines if ln.startswith("qsmnet: error: ")]
        return "refused", errors[-1][len("qsmnet: error: "):] if errors else stderr.strip()[-300:]
    if code != 0:
        tail = stderr.strip().splitlines()
        return "failed", tail[-1] if tail else f"exit {code}"
    said = [ln[len("qsmnet: "):] for ln in lines if ": wrote " not in ln]
    if not said:
        return "accepted", ""
    chosen = next((ln for ln in said if match and match in ln), said[0])
    return "recognised", chosen


def run_probe(probe: Probe, base: Base, folder: Path, in_process: bool = False,
              timeout_s: float = 600) -> Result:
    """Build ``probe`` in ``folder`` (created), run qsmnet on it, and classify the outcome.

    ``in_process`` calls :func:`qsmnet.cli.main` in this interpreter (for the tests: no
    interpreter start per probe) instead of a ``python -m qsmnet`` subprocess.
    """
    folder.mkdir(parents=True, exist_ok=True)
    argv = probe.build(base, folder)
    before = _files(folder)
    t0 = time.perf_counter()
    if in_process:
        from qsmnet.cli import main

        err, cwd = io.StringIO(), os.getcwd()
        try:
            os.chdir(folder)
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        finally:
            os.chdir(cwd)
        stderr = err.getvalue()
    else:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONWARNINGS="ignore", COLUMNS="200")
        proc = subprocess.run([sys.executable, "-m", "qsmnet", *argv], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        code, stderr = proc.returncode, proc.stderr
    seconds = time.perf_counter() - t0
    after = _files(folder)
    written = sorted(k for k, v in after.items() if before.get(k) != v)
    with contextlib.suppress(OSError):  # let the folder be removed again
        for p in folder.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    outcome, message = _classify(code, stderr, probe.match)
    return Result(probe, argv, code, outcome, message, written, seconds)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _command(argv: Sequence[str]) -> str:
    shown = [a for a in argv if a not in FAST]
    return "`qsmnet " + " ".join(shown) + "`"


def markdown(results: Sequence[Result], base_shape: Sequence[int]) -> str:
    counts = {k: sum(r.outcome == k for r in results)
              for k in ("refused", "recognised", "accepted", "failed")}
    bad = [r for r in results if not r.ok]
    lines = [
        "# Input probes",
        "",
        f"Generated by `{COMMAND}`; do not edit by hand, run it again.",
        "",
        "Each probe derives one corrupted or unusual input from a simulated subject "
        f"(`qsmnet.simulation.bids.write_simulated_subject`, shape {tuple(base_shape)}, four "
        "echoes at 4/12/20/28 ms, 3 T) and runs qsmnet on it in its own folder, with "
        "`--method tkd --no-preview` added to `predict` (and `--method tkd` to `run-stage`). "
        "**refused**: exit 2 and one `qsmnet: error:` line; **recognised**: exit 0 and a logged "
        "line saying what was assumed; **accepted**: exit 0, nothing said. *written* lists the "
        "files the run created (a refused input must write none). Every probe states the outcome "
        "it should have (`PROBES` in `scripts/probe_inputs.py`); `tests/test_input_checks.py` "
        "runs some of them on every test run.",
        "",
        f"{len(results)} probes: {counts['refused']} refused, {counts['recognised']} recognised, "
        f"{counts['accepted']} accepted" + (f", {counts['failed']} failed" if counts["failed"]
                                            else "")
        + (f"; **{len(bad)} not as expected: {', '.join(r.probe.name for r in bad)}**" if bad
           else "; every outcome as expected") + ".",
        "",
        "| # | probe | input | command | exit | outcome | message | written |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, start=1):
        outcome = r.outcome if r.ok else f"**{r.outcome}** (expected {r.probe.expect})"
        if r.probe.note:
            outcome += f" ({r.probe.note})"
        written = "no" if not r.written else ", ".join(
            Path(w).name for w in r.written[:3]) + (f" (+{len(r.written) - 3})"
                                                    if len(r.written) > 3 else "")
        lines.append(f"| {i} | {r.probe.name} | {_cell(r.probe.what)} | {_cell(_command(r.argv))}"
                     f" | {r.code} | {_cell(outcome)} | {_cell(r.message) or '-'} | "
                     f"{_cell(written)} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/input_probes.md"),
                   help="markdown file to write (default: %(default)s)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these probes")
    p.add_argument("--shape", type=int, nargs=3, default=BASE_SHAPE, metavar=("X", "Y", "Z"),
                   help="shape of the simulated subject (default: %(default)s)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="build the probes here and keep them")
    args = p.parse_args(argv)
    probes = [pr for pr in PROBES if not args.only or pr.name in args.only]
    unknown = set(args.only or ()) - {pr.name for pr in PROBES}
    if unknown:
        p.error(f"unknown probe(s): {', '.join(sorted(unknown))}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="qsmnet-probes-"))
    t0 = time.perf_counter()
    try:
        base = make_base(work / "_base", args.shape)
        results = []
        for probe in probes:
            r = run_probe(probe, base, work / probe.name)
            results.append(r)
            flag = "ok " if r.ok else "BAD"
            print(f"{flag} {probe.name:28s} exit {r.code} {r.outcome:10s} {r.seconds:5.1f} s  "
                  f"{r.message[:100]}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(results, args.shape)
    print(f"{len(results)} probes in {time.perf_counter() - t0:.0f} s")
    if args.only:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
