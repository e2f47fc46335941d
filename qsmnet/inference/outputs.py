"""Write a reconstruction: NIfTI maps on the input's grid and affine, a PNG preview and a JSON
record of inputs, method, parameters and timings.

Everything is computed before anything is written, and the files are written as one set
(:class:`~qsmnet.io.output_set.OutputSet`): staged beside the targets and moved in together, the
chimap and then its JSON record last. A failed or killed write leaves the folder as it was, and
a set that replaces an earlier one removes that set's companions it does not write again.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qsmnet import __version__
from qsmnet.inference.pipeline import Reconstruction
from qsmnet.inference.preview import save_preview
from qsmnet.io.atomic import atomic_write_json
from qsmnet.io.nifti import save_nifti
from qsmnet.io.output_set import OutputSet


def output_paths(chimap: Path, names: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Companion paths of a chimap path: one per output key, beside it.

    ``names`` maps output keys (``totalfield``, ``localfield``, ``mask``, ``unreliable``,
    ``fieldsupport``, ``preview``, ``record``) to file names; by default a BIDS-style stem
    ``<stem>_<Key>`` is used.
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
        "preview": f"{stem}_Chimap.png" if stem else "chimap.png",
        "record": f"{stem}_Chimap.json" if stem else "chimap.json",
    }
    default.update(names or {})
    return {"chimap": chimap, **{k: chimap.parent / v for k, v in default.items()}}


def write_reconstruction(rec: Reconstruction, chimap_path: str | Path, affine: np.ndarray,
                         header: Any, voxel_size_mm, inputs: Mapping[str, Any],
                         preview: bool = True, names: Mapping[str, str] | None = None,
                         timings_extra: Mapping[str, float] | None = None) -> dict[str, Path]:
    """Write ``rec`` beside ``chimap_path`` as one set; returns the written paths by key.

    Hold a :class:`~qsmnet.io.output_set.FolderLock` on the folder meanwhile (``predict`` does).
    """
    paths = output_paths(Path(chimap_path), names)
    with OutputSet(paths["chimap"].parent, replaces=[p.name for p in paths.values()]) as out:
        written = _write_staged(out, rec, paths, affine, header, voxel_size_mm, inputs, preview,
                                timings_extra)
        # the record last: a reader that finds it finds the maps it names
        out.commit(order=[paths["chimap"].name, paths["record"].name])
    return written


#: The NIfTI header description (``descrip``) of each output: what it holds, in which unit.
NIFTI_DESCRIPTIONS = {
    "chimap": "chi ppm, referenced to its mean in the mask",
    "localfield": "local field ppm", "totalfield": "total field ppm", "mask": "mask",
    "unreliable": "unreliable phase mask", "fieldsupport": "field support mask",
}


def _write_staged(out: OutputSet, rec: Reconstruction, paths: dict[str, Path],
                  affine: np.ndarray, header: Any, voxel_size_mm, inputs: Mapping[str, Any],
                  preview: bool, timings_extra: Mapping[str, float] | None) -> dict[str, Path]:
    written: dict[str, Path] = {}

    def nifti(key: str, volume, dtype=np.float32) -> None:
        save_nifti(out.path(paths[key]), volume, affine, header, dtype=dtype,
                   description=NIFTI_DESCRIPTIONS[key])
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
    chi = rec.chi_ppm.numpy()
    if preview:
        save_preview(out.path(paths["preview"]), chi, mask,
                     tuple(float(v) for v in voxel_size_mm),
                     title=f"{paths['chimap'].name} ({rec.params.get('method', '')})")
        written["preview"] = paths["preview"]
    timings = dict(rec.timings_s)
    timings.update(timings_extra or {})
    record = {
        "qsmnet_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "inputs": dict(inputs),
        "method": rec.params.get("method"),
        "parameters": rec.params,
        "timings_s": timings,
        "units": {"chimap": "ppm", "totalfield": "ppm", "localfield": "ppm"},
        "reference": "chi referenced to its mean inside the mask",
        "outputs": {k: p.name for k, p in paths.items() if k in written or k in ("chimap",
                                                                                  "record")},
    }
    atomic_write_json(out.path(paths["record"]), record)
    written["record"] = paths["record"]
    nifti("chimap", chi)
    return written
