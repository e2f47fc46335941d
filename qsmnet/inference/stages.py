"""``qsmnet run-stage``: the QSM-CI stage contract.

A stage reads the canonical files of IN_DIR and writes its canonical output to OUT_DIR, in ppm,
on the input's grid and affine (``docs/conventions.md``):

=============  ==========================================  ====================
stage          reads                                       writes
=============  ==========================================  ====================
field-mapping  phase, magnitude, mask, params.json          totalfield.nii.gz
bfr            totalfield, mask, params.json                localfield.nii.gz
dipole         localfield, mask, params.json                chimap.nii.gz
end-to-end     phase, magnitude, mask, params.json          chimap.nii.gz
=============  ==========================================  ====================
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from qsmnet.inference.options import ReconOptions
from qsmnet.inference.outputs import CHIMAP_DESCRIPTIONS, NIFTI_DESCRIPTIONS
from qsmnet.inference.pipeline import reconstruct
from qsmnet.inference.resources import check_memory
from qsmnet.io import read_qsmci_inputs, reader_options
from qsmnet.io.atomic import atomic_write_json
from qsmnet.io.nifti import save_nifti
from qsmnet.io.output_set import FolderLock, OutputSet, check_writable, refuse_earlier_outputs
from qsmnet.io.qsmci import QSMCI_OUTPUT
from qsmnet.transforms.field_mapping import FieldMapping

log = logging.getLogger("qsmnet")


def run_stage(stage: str, in_dir, out_dir, options: ReconOptions | None = None,
              phase_sign: int = 1, input_options: dict | None = None, overwrite: bool = False,
              memory_check: bool = True) -> Path:
    """Run one QSM-CI stage; returns the path of the written output.

    The output folder is checked for writing, locked against other runs and checked for an
    earlier output of this stage (replaced only with ``overwrite``) before anything is
    computed, and so is the memory the stage needs (unless ``memory_check`` is off). The
    output and its companions are written as one set (:class:`~qsmnet.io.output_set.OutputSet`).

    ``options``: the method, background removal and their settings
    (:class:`~qsmnet.inference.options.ReconOptions`; defaults when None). End-to-end, the
    voxels flagged by the unreliable-phase test are written beside the output as
    ``unreliable_mask.nii.gz`` and the field-support region as ``fieldsupport_mask.nii.gz``;
    the field-mapping stage writes the total field on the mask alone, as the contract has it.
    ``input_options``: keyword arguments for :func:`~qsmnet.io.qsmci.read_qsmci_inputs` (the CLI
    passes :func:`~qsmnet.io.options.reader_options`).
    """
    options = options if options is not None else ReconOptions()
    inputs = read_qsmci_inputs(in_dir, stage, phase_sign=phase_sign, **(input_options or {}))
    device = options.torch_device
    out_dir = Path(out_dir)
    check_writable(out_dir, "OUT_DIR")
    names = stage_outputs(stage)
    with FolderLock(out_dir):
        if not overwrite:
            refuse_earlier_outputs((out_dir / n for n in names), f"run-stage {stage}",
                                   "another OUT_DIR", record=out_dir / names[1])
        if memory_check:
            n_echoes = 1 if inputs.phase is None else inputs.phase.shape[0]
            check_memory(inputs.mask.shape, n_echoes, options.method, device, source=inputs.name)
        out, params, rec, seconds = _compute_stage(stage, inputs, options)
        _write_stage(stage, inputs, in_dir, out_dir, names, out, params, rec, seconds,
                     options.reference)
    path = out_dir / inputs.output_name
    log.info("%s: wrote %s in %.1f s", stage, path, seconds)
    return path


def _write_stage(stage, inputs, in_dir, out_dir: Path, names, out, params, rec, seconds,
                 reference: str) -> None:
    key = inputs.output_name.split(".")[0]  # chimap, localfield or totalfield
    description = CHIMAP_DESCRIPTIONS[reference] if key == "chimap" else NIFTI_DESCRIPTIONS[key]
    with OutputSet(out_dir, replaces=names) as staged:
        if stage == "end-to-end" and rec.unreliable_mask is not None:
            # beside the canonical output: the voxels kept out of background removal and
            # filled in
            save_nifti(staged.path("unreliable_mask.nii.gz"),
                       rec.unreliable_mask.numpy().astype(np.uint8), inputs.affine,
                       inputs.header, dtype=np.uint8,
                       description=NIFTI_DESCRIPTIONS["unreliable"])
        if stage == "end-to-end" and rec.support_mask is not None:
            save_nifti(staged.path("fieldsupport_mask.nii.gz"),
                       rec.support_mask.numpy().astype(np.uint8), inputs.affine,
                       inputs.header, dtype=np.uint8,
                       description=NIFTI_DESCRIPTIONS["fieldsupport"])
        atomic_write_json(staged.path(names[1]),
                          {"stage": stage, "input": str(in_dir), "parameters": params,
                           "seconds": seconds, "units": "ppm"})
        save_nifti(staged.path(inputs.output_name), np.asarray(out.numpy(), np.float32),
                   inputs.affine, inputs.header, description=description)
        staged.commit(order=[inputs.output_name, names[1]])


def stage_outputs(stage: str) -> tuple[str, ...]:
    """File names a stage writes into its output folder: the canonical output, its JSON record,
    and (end-to-end) the unreliable-phase and field-support masks."""
    output = QSMCI_OUTPUT[stage]
    names = (output, f"{output.split('.')[0]}.json")
    if stage == "end-to-end":
        names += ("unreliable_mask.nii.gz", "fieldsupport_mask.nii.gz")
    return names


def _compute_stage(stage: str, inputs, options: ReconOptions):
    """(output volume, parameters, reconstruction or None, seconds) of one stage."""
    sample = inputs.to_sample(device="cpu")
    device = options.torch_device
    t0 = time.perf_counter()
    rec = None
    if stage == "field-mapping":
        mag = sample.get("magnitude")
        field, _, _ = FieldMapping()(sample["phase"].to(device),
                                     None if mag is None else mag.to(device), sample["te_s"],
                                     sample["b0_t"], sample["mask"].to(device),
                                     inputs.geometry.voxel_size_mm)
        out, params = field.cpu(), {"method": "laplacian unwrap + MCPC-3D-S + WLS fit"}
    else:
        start = {"bfr": "totalfield", "dipole": "localfield", "end-to-end": "phase"}[stage]
        inverter = (options.make_inverter(after_bfr=stage == "end-to-end")
                    if stage != "bfr" else (lambda *a: a[0]))
        rec = reconstruct(sample, options, start=start, inverter=inverter)
        out = rec.local_field_ppm if stage == "bfr" else rec.chi_ppm
        params = {"bfr": options.bfr} if stage == "bfr" else rec.params
    return out, params, rec, time.perf_counter() - t0


def run_stage_cli(args) -> int:
    """Handler of ``qsmnet run-stage`` (arguments validated by :mod:`qsmnet.cli`)."""
    path = run_stage(args.stage, args.in_dir, args.out_dir, ReconOptions.from_args(args),
                     phase_sign=args.phase_sign, input_options=reader_options(args),
                     overwrite=args.overwrite, memory_check=not args.skip_memory_check)
    print(path)
    return 0
