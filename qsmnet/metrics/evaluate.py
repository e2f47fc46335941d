"""``qsmnet evaluate PRED TRUTH MASK``: QSM-CI metrics in the mask and an eroded mask.

Prints a table and, with ``--json``, writes the numbers (atomically).
"""

from __future__ import annotations

import numpy as np

from qsmnet.io import QSMInputError, load_nifti
from qsmnet.io.atomic import atomic_write_json
from qsmnet.io.validate import check_same_grid
from qsmnet.metrics.qsm import score, score_table


def evaluate_files(pred_path, truth_path, mask_path, erode_mm: float = 3.0) -> dict:
    """Load three NIfTI files on one grid and score ``pred`` against ``truth`` in ``mask``."""
    pred, aff, hdr = load_nifti(pred_path)
    truth, aff_t, _ = load_nifti(truth_path)
    mask, aff_m, _ = load_nifti(mask_path)
    check_same_grid(truth.shape, aff_t, pred.shape, aff, str(truth_path), str(pred_path))
    check_same_grid(mask.shape, aff_m, pred.shape, aff, str(mask_path), str(pred_path))
    if not np.any(mask > 0):
        raise QSMInputError(f"{mask_path}: the mask is empty")
    voxel = np.linalg.norm(aff[:3, :3], axis=0)
    metrics = score(pred, truth, mask > 0, voxel, erode_mm=erode_mm or None)
    return {"prediction": str(pred_path), "truth": str(truth_path), "mask": str(mask_path),
            "erode_mm": erode_mm, "metrics": metrics}


def run_evaluate_cli(args) -> int:
    """Handler of ``qsmnet evaluate`` (arguments validated by :mod:`qsmnet.cli`)."""
    result = evaluate_files(args.pred, args.truth, args.mask, args.erode_mm)
    names = {"mask": "mask", "eroded_mask": f"mask eroded {result['erode_mm']:g} mm"}
    print(score_table({names[k]: v for k, v in result["metrics"].items()}, title="region"))
    if args.json is not None:
        atomic_write_json(args.json, result)
    return 0
