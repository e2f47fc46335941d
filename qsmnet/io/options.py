"""The input checks a command line asks the readers for, as reader keyword arguments.

The readers' defaults suit library use (tiny test grids, an all-ones mask for a stage that does
not remove the background); the CLI always asks for the full set of checks, plus what the user
chose with ``--phase-units``, ``--mask-threshold`` and ``--no-decay-check``.
"""

from __future__ import annotations

import argparse
from typing import Any

from qsmnet.io.validate import MIN_EXTENT_VOXELS

__all__ = ["reader_options"]


def reader_options(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Keyword arguments for ``read_nifti_echoes``, ``read_bids_subject`` and
    ``read_qsmci_inputs`` from parsed ``predict`` / ``run-stage`` arguments.

    Returns ``phase_units``, ``mask_threshold``, ``decay_check``, ``min_extent``
    (:data:`~qsmnet.io.validate.MIN_EXTENT_VOXELS`) and ``require_background`` (True: refuse
    a mask without background where background removal runs). Missing attributes take the
    defaults, so a namespace built by hand (or None) gets every check.
    """
    return {
        "phase_units": getattr(args, "phase_units", None) or "auto",
        "mask_threshold": getattr(args, "mask_threshold", None),
        "decay_check": not getattr(args, "no_decay_check", False),
        "min_extent": MIN_EXTENT_VOXELS,
        "require_background": True,
    }
