"""Write a reconstruction: NIfTI maps on the input's grid and affine, a PNG preview and a JSON
record of inputs, method, parameters and timings.

Every NIfTI output has a JSON sidecar with the BIDS common-derivative keys (``Description``,
``Units`` of maps, ``SkullStripped``, ``Type`` of masks; ``Sources`` and ``SpatialReference`` as
BIDS URIs when the input is a BIDS dataset); the chimap's sidecar is the JSON record itself.
With ``--roi`` a TSV of chi statistics per label (:mod:`qsmnet.metrics.roi`) and its column
sidecar join the set.

Everything is computed before anything is written, and the files are written as one set
(:class:`~qsmnet.io.output_set.OutputSet`): staged beside the targets and moved in together, the
chimap and then its JSON record last. A failed or killed write leaves the folder as it was, and
a set that replaces an earlier one removes that set's companions it does not write again.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qsmnet import __version__
from qsmnet.inference.pipeline import Reconstruction
from qsmnet.inference.preview import save_preview
from qsmnet.io.atomic import atomic_write_json, atomic_write_text
from qsmnet.io.nifti import save_nifti
from qsmnet.io.output_set import OutputSet
from qsmnet.metrics.roi import RoiLabels, format_roi_tsv, roi_statistics


def output_paths(chimap: Path, names: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Companion paths of a chimap path: one per output key, beside it.

    ``names`` maps output keys (``totalfield``, ``localfield``, ``mask``, ``unreliable``,
    ``fieldsupport``, ``csfmask``, ``roi``, ``preview``, ``record``) to file names; by default a
    BIDS-style stem ``<stem>_<Key>`` is used. Each NIfTI key and ``roi`` also has a JSON sidecar
    key ``<key>_json`` (same name, ``.json``; the chimap's is ``record``).
    """
    stem = chimap.name[: -len("_Chimap.nii.gz")] if chimap.name.endswith("_Chimap.nii.gz") else None
    default = {
        "totalfield": f"{stem}_desc-total_fieldmap.nii.gz" if stem else "totalfield.nii.gz",
        "localfield": f"{stem}_desc-local_fieldmap.nii.gz" if stem else "localfield.nii.gz",
        "mask": f"{stem}_desc-qsm_mask.nii.gz" if stem else "mask.nii.gz",
        "unreliable": (f"{stem}_desc-unreliable_mask.nii.gz" if stem
                       else "unreliable_mask.nii.gz"),
        "fieldsupport": (f"{stem}_desc-fieldsupport_mask.nii.gz" if stem
                         else "fieldsupport_mask.nii.gz"),
        "csfmask": f"{stem}_desc-csf_mask.nii.gz" if stem else "csf_mask.nii.gz",
        "roi": f"{stem}_desc-roi_stats.tsv" if stem else "roi_stats.tsv",
        "preview": f"{stem}_Chimap.png" if stem else "chimap.png",
        "record": f"{stem}_Chimap.json" if stem else "chimap.json",
    }
    default.update(names or {})
    for key in SIDECAR_KEYS:
        default[f"{key}_json"] = _json_name(default[key])
    return {"chimap": chimap, **{k: chimap.parent / v for k, v in default.items()}}


#: Outputs with a JSON sidecar of their own (the chimap's is the record).
SIDECAR_KEYS = ("totalfield", "localfield", "mask", "unreliable", "fieldsupport", "csfmask",
                "roi")


def _json_name(name: str) -> str:
    for ext in (".nii.gz", ".nii", ".tsv"):
        if name.endswith(ext):
            return name[: -len(ext)] + ".json"
    return name + ".json"


def write_reconstruction(rec: Reconstruction, chimap_path: str | Path, affine: np.ndarray,
                         header: Any, voxel_size_mm, inputs: Mapping[str, Any],
                         preview: bool = True, names: Mapping[str, str] | None = None,
                         timings_extra: Mapping[str, float] | None = None,
                         roi: RoiLabels | None = None,
                         bids_sources: BidsSources | None = None) -> dict[str, Path]:
    """Write ``rec`` beside ``chimap_path`` as one set; returns the written paths by key.

    ``roi``: labels on the chimap's grid, whose chi statistics are written as a TSV with the
    set. ``bids_sources``: where the set lies in a BIDS derivative dataset and which raw files
    it comes from (the sidecars' ``Sources`` and ``SpatialReference``). Hold a
    :class:`~qsmnet.io.output_set.FolderLock` on the folder meanwhile (``predict`` does).
    """
    paths = output_paths(Path(chimap_path), names)
    roi_rows = None
    if roi is not None:
        roi.check_grid(rec.chi_ppm.shape, affine, paths["chimap"].name)
        roi_rows = roi_statistics(rec.chi_ppm.numpy(), rec.chi_mask.numpy(), roi.labels,
                                  roi.names)
    with OutputSet(paths["chimap"].parent, replaces=[p.name for p in paths.values()]) as out:
        written = _write_staged(out, rec, paths, affine, header, voxel_size_mm, inputs, preview,
                                timings_extra, roi, roi_rows, bids_sources)
        # the record last: a reader that finds it finds the maps it names
        out.commit(order=[paths["chimap"].name, paths["record"].name])
    return written


#: The NIfTI header description (``descrip``) of each output: what it holds, in which unit
#: (the chimap's names its reference: :data:`CHIMAP_DESCRIPTIONS`).
NIFTI_DESCRIPTIONS = {
    "chimap": "chi ppm, referenced to its mean in the mask",
    "localfield": "local field ppm", "totalfield": "total field ppm", "mask": "mask",
    "unreliable": "unreliable phase mask", "fieldsupport": "field support mask",
    "csfmask": "CSF reference mask",
}
CHIMAP_DESCRIPTIONS = {"mask-mean": NIFTI_DESCRIPTIONS["chimap"],
                       "csf": "chi ppm, referenced to its mean in CSF",
                       "none": "chi ppm, not referenced"}


@dataclass(frozen=True)
class BidsSources:
    """Where an output set lies in a BIDS derivative dataset, and what it was made from.

    ``folder``: the set's folder relative to the derivative root (``sub-01/anat``); ``raw``:
    BIDS URIs of the input files (``bids:raw:sub-01/anat/..._MEGRE.nii.gz``, ``raw`` being a
    ``DatasetLinks`` name of the derivative's ``dataset_description.json``), phase first.
    """

    folder: str
    raw: tuple[str, ...] = ()

    def uri(self, name: str) -> str:
        """The BIDS URI of the set's file ``name`` within the derivative dataset."""
        return f"bids::{self.folder}/{name}" if self.folder else f"bids::{name}"


def _sidecars(rec: Reconstruction, paths: dict[str, Path], written: Mapping[str, Path],
              bids: BidsSources | None, roi: RoiLabels | None) -> dict[str, dict[str, Any]]:
    """The BIDS sidecar of each written output (the chimap's: keys merged into the record)."""
    method = rec.params.get("method")
    ref = rec.params.get("reference", {})
    how = (f"qsmnet --method {method}, background removal {rec.params.get('bfr')}; "
           f"reference: {ref.get('description', '')}")
    maps = {
        "chimap": f"Magnetic susceptibility (chi, ppm) by {how}",
        "localfield": "Local field (ppm of B0) after background removal "
                      f"({rec.params.get('bfr')}), referenced to its mean in the chi mask",
        "totalfield": "Total field (ppm of B0) from the multi-echo phase",
    }
    masks = {
        "mask": ("Brain", "Voxels chi is reported on (the brain mask less any rim that "
                          "background removal eroded)"),
        "unreliable": ("ROI", "Voxels whose field failed the phase-step test (filled in from "
                              "reliable neighbours before the inversion)"),
        "fieldsupport": ("ROI", "Region field mapping and background removal ran on (the brain "
                                "mask and its reliable rim)"),
        "csfmask": ("ROI", "Ventricular CSF of the csf reference (R2* threshold in the eroded "
                           "brain mask)"),
    }
    raw = list(bids.raw) if bids is not None else []
    out: dict[str, dict[str, Any]] = {}
    for key in written:
        if key in maps:
            meta: dict[str, Any] = {"Description": maps[key], "Units": "ppm",
                                    "SkullStripped": True}
        elif key in masks:
            meta = {"Description": masks[key][1], "Type": masks[key][0]}
        elif key == "roi":
            meta = _roi_columns_sidecar(roi)
        else:
            continue
        if bids is not None:
            sources = list(raw)
            if key == "chimap":
                sources += [bids.uri(paths[k].name) for k in ("localfield", "mask")
                            if k in written]
            if key == "roi":
                sources = [bids.uri(paths["chimap"].name)]
            if sources:
                meta["Sources"] = sources
            if raw and key in masks:
                meta["SpatialReference"] = raw[0]
        out[key] = meta
    return out


def _roi_columns_sidecar(roi: RoiLabels | None) -> dict[str, Any]:
    """The column descriptions of the ROI TSV (BIDS tabular-file sidecar)."""
    stat = "of chi over the label's voxels inside the chi mask"
    return {
        "Description": f"chi statistics per label of {roi.source if roi else 'the label image'}",
        "index": {"Description": "label value in the label image"},
        "name": {"Description": "label name" + (f" from {roi.names_source}"
                                                 if roi and roi.names_source else "")},
        "mean_ppm": {"Description": f"mean {stat}", "Units": "ppm"},
        "median_ppm": {"Description": f"median {stat}", "Units": "ppm"},
        "std_ppm": {"Description": f"standard deviation (population, ddof=0) {stat}",
                    "Units": "ppm"},
        "voxels": {"Description": "voxels of the label inside the chi mask (the statistics' "
                                  "voxels)"},
        "voxels_outside_mask": {"Description": "voxels of the label outside the chi mask, "
                                               "left out"},
    }


def _write_staged(out: OutputSet, rec: Reconstruction, paths: dict[str, Path],
                  affine: np.ndarray, header: Any, voxel_size_mm, inputs: Mapping[str, Any],
                  preview: bool, timings_extra: Mapping[str, float] | None,
                  roi: RoiLabels | None, roi_rows: list | None,
                  bids: BidsSources | None) -> dict[str, Path]:
    written: dict[str, Path] = {}
    reference = rec.params.get("reference", {}).get("reference", "mask-mean")

    def nifti(key: str, volume, dtype=np.float32) -> None:
        description = CHIMAP_DESCRIPTIONS[reference] if key == "chimap" else \
            NIFTI_DESCRIPTIONS[key]
        save_nifti(out.path(paths[key]), volume, affine, header, dtype=dtype,
                   description=description)
        written[key] = paths[key]

    mask = rec.chi_mask.numpy().astype(np.uint8)
    maps = {"localfield": rec.local_field_ppm, "totalfield": rec.total_field_ppm}
    for key, vol in maps.items():
        if vol is not None:
            nifti(key, vol.numpy())
    nifti("mask", mask, np.uint8)
    if rec.unreliable_mask is not None:
        # the voxels kept out of background removal and filled in (phase input)
        nifti("unreliable", rec.unreliable_mask.numpy().astype(np.uint8), np.uint8)
    if rec.params.get("start") == "phase" and rec.support_mask is not None:
        # where the field was mapped and background removal ran: the mask and its rim
        nifti("fieldsupport", rec.support_mask.numpy().astype(np.uint8), np.uint8)
    if rec.reference_mask is not None:
        # the CSF region the csf reference averaged chi over
        nifti("csfmask", rec.reference_mask.numpy().astype(np.uint8), np.uint8)
    if roi_rows is not None:
        atomic_write_text(out.path(paths["roi"]), format_roi_tsv(roi_rows))
        written["roi"] = paths["roi"]
    chi = rec.chi_ppm.numpy()
    if preview:
        save_preview(out.path(paths["preview"]), chi, mask,
                     tuple(float(v) for v in voxel_size_mm),
                     title=f"{paths['chimap'].name} ({rec.params.get('method', '')})")
        written["preview"] = paths["preview"]
    timings = dict(rec.timings_s)
    timings.update(timings_extra or {})
    sidecars = _sidecars(rec, paths, {**written, "chimap": paths["chimap"]}, bids, roi)
    for key, meta in sidecars.items():
        if key != "chimap":
            atomic_write_json(out.path(paths[f"{key}_json"]), meta)
            written[f"{key}_json"] = paths[f"{key}_json"]
    record = {
        **sidecars["chimap"],
        "qsmnet_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "inputs": dict(inputs),
        "method": rec.params.get("method"),
        "parameters": rec.params,
        "timings_s": timings,
        "units": {"chimap": "ppm", "totalfield": "ppm", "localfield": "ppm"},
        "reference": rec.params.get("reference"),
        "roi": None if roi is None else {"labels": roi.source, "names": roi.names_source,
                                         "regions": len(roi_rows or [])},
        "outputs": {k: p.name for k, p in paths.items() if k in written or k in ("chimap",
                                                                                  "record")},
    }
    atomic_write_json(out.path(paths["record"]), record)
    written["record"] = paths["record"]
    nifti("chimap", chi)
    return written
