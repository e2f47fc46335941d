#!/usr/bin/env python
"""Score a susceptibility map against a ground truth with the QSM-CI metrics.

The same as ``qsmnet evaluate`` (one implementation: :mod:`qsmnet.metrics.evaluate`): NRMSE,
detrended NRMSE, HFEN, XSIM and CC from ``qsm_ci.qsm_eval`` inside the mask and inside the mask
eroded by ``--erode-mm``, printed as a table and, with ``--json``, written atomically::

    python scripts/evaluate.py chimap.nii.gz truth.nii.gz mask.nii.gz --erode-mm 3 --json m.json

Bad input (missing file, another grid, empty mask) exits with status 2 and one message.
"""

from __future__ import annotations

import sys

from qsmnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
