"""``qsmnet predict``: BIDS subjects or explicit NIfTI files -> chi maps (ppm) on the input grid.

NIfTI input is multi-echo phase (``--phase``) or a total field map in Hz or ppm (``--fieldmap``,
:func:`~qsmnet.io.fieldmap.read_fieldmap`), which starts the reconstruction at background removal.

All inputs are read and validated first (a bad file stops the run before anything is written),
then the output folders (writable, not in use by another run, no earlier outputs unless
``--overwrite``) and the memory needed; the method is loaded once, then each acquisition is
reconstructed and its outputs written as one set, with a progress bar.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from qsmnet.inference.outputs import BidsSources, output_paths, write_reconstruction
from qsmnet.inference.options import ReconOptions
from qsmnet.inference.pipeline import reconstruct
from qsmnet.inference.resources import check_memory
from qsmnet.io import (
    Acquisition,
    QSMInputError,
    bids_derivative_path,
    find_bids_subjects,
    read_bids_subject,
    read_nifti_echoes,
    read_params_json,
    reader_options,
)
from qsmnet.io.bids import write_derivative_description
from qsmnet.io.fieldmap import FieldMapInput, read_fieldmap
from qsmnet.io.output_set import check_writable, locked_folders, refuse_earlier_outputs
from qsmnet.metrics.roi import RoiLabels, read_roi_labels

log = logging.getLogger("qsmnet")


def _inputs_record(acq: Acquisition | FieldMapInput) -> dict[str, Any]:
    if isinstance(acq, FieldMapInput):
        return acq.inputs_record()
    return {"source": acq.source, "name": acq.name, "shape": list(acq.shape),
            "echoes": acq.n_echoes, "te_s": list(acq.te_s), "b0_t": acq.b0_t,
            "b0_dir": [float(v) for v in acq.b0_dir],
            "voxel_size_mm": [float(v) for v in acq.voxel_size_mm],
            "phase_sign": acq.phase_sign, "mask": "given" if acq.mask is not None else "automatic"}


def _jobs_from_args(args) -> list[tuple[Acquisition, Path]]:
    """(acquisition, chimap path) for every acquisition the arguments name, all validated."""
    jobs = []
    if getattr(args, "fieldmap", None) is not None:
        jobs.append((_read_fieldmap_args(args), Path(args.out) / "chimap.nii.gz"))
    elif args.bids is not None:
        subjects = args.subject or find_bids_subjects(args.bids)
        if not subjects:
            raise QSMInputError(f"{args.bids}: no sub-* folders with MEGRE phase images")
        for sub in subjects:
            for acq in read_bids_subject(args.bids, sub, mask_path=args.mask,
                                         phase_sign=args.phase_sign, **reader_options(args)):
                jobs.append((acq, bids_derivative_path(args.bids, acq, "Chimap", args.out)))
    else:
        te, b0, b0_dir, vs = args.te, args.b0, args.b0_dir, None
        if args.params is not None:
            p = read_params_json(args.params)
            te, b0 = p.te_s, p.b0_t
            b0_dir = b0_dir if b0_dir is not None else p.b0_dir
            vs = p.voxel_size_mm
        acq = read_nifti_echoes(args.phase, args.magnitude, te_s=te, b0_t=b0, b0_dir=b0_dir,
                                mask_path=args.mask, phase_sign=args.phase_sign,
                                voxel_size_mm=vs, **reader_options(args))
        jobs.append((acq, Path(args.out) / "chimap.nii.gz"))
    return jobs


def _read_fieldmap_args(args) -> FieldMapInput:
    """The ``--fieldmap`` input: B0 (needed for Hz only), B0 direction and voxel size from
    ``--params`` (its TE unused) or ``--b0``/``--b0-dir``."""
    units = args.fieldmap_units or "hz"
    b0, b0_dir, vs = args.b0, args.b0_dir, None
    if args.params is not None:
        p = read_params_json(args.params, require_te=False, require_b0=units == "hz")
        b0, b0_dir, vs = p.b0_t, b0_dir if b0_dir is not None else p.b0_dir, p.voxel_size_mm
    opts = reader_options(args)
    return read_fieldmap(args.fieldmap, args.mask, units, b0_t=b0, b0_dir=b0_dir,
                         voxel_size_mm=vs, mask_threshold=opts["mask_threshold"],
                         min_extent=opts["min_extent"],
                         require_background=opts["require_background"])


def _raw_uris(acq: Acquisition, raw_root: Path | None) -> tuple[str, ...]:
    """BIDS URIs (``bids:raw:...``) of a BIDS acquisition's MEGRE files, phase first."""
    if raw_root is None or not acq.entities:
        return ()
    folder = Path(acq.source)
    files = sorted(folder.glob(f"{acq.name}_echo-*_part-phase_MEGRE.nii*")) + \
        sorted(folder.glob(f"{acq.name}_echo-*_part-mag_MEGRE.nii*"))
    root = Path(raw_root).resolve()
    uris = []
    for f in files:
        try:
            uris.append(f"bids:raw:{f.resolve().relative_to(root).as_posix()}")
        except ValueError:
            continue
    return tuple(uris)


def _bids_sources(acq: Acquisition, chimap: Path, deriv: Path | None,
                  raw_root: Path | None) -> BidsSources | None:
    if deriv is None:
        return None
    try:
        folder = chimap.parent.resolve().relative_to(Path(deriv).resolve()).as_posix()
    except ValueError:
        return None
    return BidsSources(folder=folder, raw=_raw_uris(acq, raw_root))


def _read_roi(options: ReconOptions, jobs: list[tuple[Acquisition, Path]]) -> RoiLabels | None:
    """The ``--roi`` labels, read once and checked against every acquisition's grid."""
    if options.roi_labels is None:
        return None
    roi = read_roi_labels(options.roi_labels, options.roi_names)
    for acq, _ in jobs:
        roi.check_grid(acq.shape, acq.affine, acq.name)
    return roi


def _refuse_overwrite(jobs: list[tuple[Acquisition, Path]], overwrite: bool) -> None:
    """Stop before computing when an acquisition's outputs exist, unless ``overwrite``."""
    if overwrite:
        return
    for _, chimap in jobs:
        paths = output_paths(chimap)
        refuse_earlier_outputs(paths.values(), "predict", "--out", record=paths["record"])


def _derivatives_root(args) -> Path | None:
    if args.bids is None:
        return None
    return Path(args.out) if args.out else Path(args.bids) / "derivatives" / "qsmnet"


def run_predict(args) -> int:
    """Handler of ``qsmnet predict`` (arguments validated by :mod:`qsmnet.cli`).

    The command line is turned, once, into the acquisitions to reconstruct (read and checked)
    and a :class:`~qsmnet.inference.options.ReconOptions`; :func:`predict` does the rest.
    """
    options = ReconOptions.from_args(args)
    jobs = _jobs_from_args(args)
    predict(jobs, options, derivatives_root=_derivatives_root(args),
            raw_root=Path(args.bids) if args.bids is not None else None,
            sources=[str(args.bids)] if args.bids is not None else [],
            out_flag="--out" if args.out is not None else "derivatives of --bids",
            overwrite=args.overwrite, memory_check=not args.skip_memory_check,
            preview=not args.no_preview)
    return 0


def predict(jobs: list[tuple[Acquisition, Path]], options: ReconOptions,
            derivatives_root: Path | None = None, sources: list[str] | None = None,
            out_flag: str = "--out", overwrite: bool = False, memory_check: bool = True,
            preview: bool = True, raw_root: Path | None = None) -> list[dict[str, Path]]:
    """Reconstruct each ``(acquisition, chimap path)`` and write its outputs as one set.

    Every output folder is checked for writing, locked against other runs and checked for
    earlier outputs (replaced only with ``overwrite``), and the memory the reconstruction needs
    is estimated (unless ``memory_check`` is off), all before the method is loaded.
    ``derivatives_root``: BIDS derivatives folder whose ``dataset_description.json`` is written
    (``sources``: the raw datasets it derives from; ``raw_root``: the raw BIDS dataset, linked as
    ``raw`` so that the sidecars' ``Sources`` name its files). ``options.roi_labels`` is read
    and checked against every acquisition's grid before anything is computed. Returns the
    written paths per acquisition.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    device = options.torch_device
    roi = _read_roi(options, jobs)
    folders = sorted({chimap.parent for _, chimap in jobs})
    for folder in folders + ([derivatives_root] if derivatives_root is not None else []):
        check_writable(folder, out_flag)
    with locked_folders(folders):
        _refuse_overwrite(jobs, overwrite)
        if memory_check:
            for acq, _ in jobs:
                check_memory(acq.shape, acq.n_echoes, options.method, device, source=acq.name)
        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            transient=False)
        return _predict_jobs(jobs, options, derivatives_root, sources or [], preview, progress,
                             roi, raw_root)


def _predict_jobs(jobs: list[tuple[Acquisition, Path]], options: ReconOptions,
                  deriv: Path | None, sources: list[str], preview: bool, progress,
                  roi: RoiLabels | None = None, raw_root: Path | None = None
                  ) -> list[dict[str, Path]]:
    t0 = time.perf_counter()
    inverter = options.make_inverter(after_bfr=True)
    load_s = time.perf_counter() - t0
    results = []
    with progress:
        task = progress.add_task("qsmnet predict", total=len(jobs))
        for acq, chimap in jobs:
            progress.update(task, description=f"{acq.name}")
            start = acq.start if isinstance(acq, FieldMapInput) else "phase"
            rec = reconstruct(acq.to_sample(device="cpu"), options, start=start,
                              inverter=inverter)
            written = write_reconstruction(
                rec, chimap, acq.affine, acq.header, acq.voxel_size_mm, _inputs_record(acq),
                preview=preview, timings_extra={"model_load": load_s}, roi=roi,
                bids_sources=_bids_sources(acq, chimap, deriv, raw_root))
            if deriv is not None:
                write_derivative_description(deriv, sources, raw_root=raw_root)
            log.info("%s: wrote %s", acq.name, written["chimap"])
            progress.console.print(f"{acq.name}: {written['chimap']}")
            progress.advance(task)
            results.append(written)
    return results
