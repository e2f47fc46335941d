"""``qsmnet run-stage``: the QSM-CI stage contract.

A stage reads the canonical files of IN_DIR and writes its canonical output to OUT_DIR, in ppm,
on the input's grid and affine (``shared/qsm-conventions.md``):

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
import torch

from qsmnet.inference.dipole import make_inverter
from qsmnet.inference.pipeline import reconstruct
from qsmnet.inference.predict import resolve_device
from qsmnet.io import read_qsmci_inputs
from qsmnet.io.atomic import atomic_write_json
from qsmnet.io.nifti import save_nifti
from qsmnet.transforms.field_mapping import FieldMapping
from qsmnet.transforms.field_support import DEFAULT_FIELD_MARGIN_MM
from qsmnet.transforms.reliability import DEFAULT_MAX_PHASE_STEP_RAD

log = logging.getLogger("qsmnet")


def run_stage(stage: str, in_dir, out_dir, method: str = "unet", device="cpu",
              phase_sign: int = 1, bfr: str = "pdf", dc_iterations: int | None = None,
              max_phase_step_rad: float | None = DEFAULT_MAX_PHASE_STEP_RAD,
              field_margin_mm: float | None = DEFAULT_FIELD_MARGIN_MM) -> Path:
    """Run one QSM-CI stage; returns the path of the written output.

    ``dc_iterations``: test-time data-consistency iterations after the inversion (None: what
    the model recommends for this input, 0 for the classical methods; 0: off).
    ``max_phase_step_rad``: the unreliable-phase limit of :func:`reconstruct` (end-to-end; 0 or
    None: off); the flagged voxels are written beside the output as ``unreliable_mask.nii.gz``.
    ``field_margin_mm``: end-to-end, the rim of reliable signal around the mask that field
    mapping, background removal and the inversion also use (0 or None: the mask alone); the
    region is written beside the output as ``fieldsupport_mask.nii.gz``. The field-mapping stage
    writes the total field on the mask alone, as the contract has it.
    """
    inputs = read_qsmci_inputs(in_dir, stage, phase_sign=phase_sign)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    sample = inputs.to_sample(device="cpu")
    t0 = time.perf_counter()
    if stage == "field-mapping":
        mag = sample.get("magnitude")
        field, _, _ = FieldMapping()(sample["phase"].to(device),
                                     None if mag is None else mag.to(device), sample["te_s"],
                                     sample["b0_t"], sample["mask"].to(device),
                                     sample["voxel_size_mm"].tolist())
        out, params = field.cpu(), {"method": "laplacian unwrap + MCPC-3D-S + WLS fit"}
    else:
        start = {"bfr": "totalfield", "dipole": "localfield", "end-to-end": "phase"}[stage]
        inverter = (make_inverter(method, device, refine_iterations=dc_iterations,
                                  after_bfr=stage == "end-to-end")
                    if stage != "bfr" else (lambda *a: a[0]))
        rec = reconstruct(sample, method=str(method), inverter=inverter, start=start, bfr=bfr,
                          device=device, max_phase_step_rad=max_phase_step_rad,
                          field_margin_mm=field_margin_mm)
        out = rec.local_field_ppm if stage == "bfr" else rec.chi_ppm
        params = rec.params
        if stage == "bfr":
            params = {"bfr": bfr}
    seconds = time.perf_counter() - t0
    out_dir = Path(out_dir)
    if stage == "end-to-end" and rec.unreliable_mask is not None:
        # beside the canonical output: the voxels kept out of background removal and filled in
        save_nifti(out_dir / "unreliable_mask.nii.gz",
                   rec.unreliable_mask.numpy().astype(np.uint8), inputs.affine, inputs.header,
                   dtype=np.uint8)
    if stage == "end-to-end" and rec.support_mask is not None:
        save_nifti(out_dir / "fieldsupport_mask.nii.gz",
                   rec.support_mask.numpy().astype(np.uint8), inputs.affine, inputs.header,
                   dtype=np.uint8)
    atomic_write_json(out_dir / f"{inputs.output_name.split('.')[0]}.json",
                      {"stage": stage, "input": str(in_dir), "parameters": params,
                       "seconds": seconds, "units": "ppm"})
    path = save_nifti(out_dir / inputs.output_name, np.asarray(out.numpy(), np.float32),
                      inputs.affine, inputs.header)
    log.info("%s: wrote %s in %.1f s", stage, path, seconds)
    return path


def run_stage_cli(args) -> int:
    """Handler of ``qsmnet run-stage`` (arguments validated by :mod:`qsmnet.cli`)."""
    path = run_stage(args.stage, args.in_dir, args.out_dir, method=args.method,
                     device=args.device, phase_sign=args.phase_sign,
                     bfr=args.bfr, dc_iterations=args.dc_iterations,
                     max_phase_step_rad=args.max_phase_step,
                     field_margin_mm=args.field_margin)
    print(path)
    return 0
