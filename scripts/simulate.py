#!/usr/bin/env python
"""Write a simulated multi-echo GRE subject as BIDS (with its truths under derivatives/).

A thin wrapper around :func:`qsmnet.simulation.write_simulated_subject` (``qsmnet simulate`` is
the same with the project's CLI conventions)::

    python scripts/simulate.py --out bids/ --subject 01 --seed 0 --shape 96 96 64 \\
        --voxel-size 1 1 1 --b0-dir 0 0 1 --b0 3 --te 0.004 0.012 0.020 0.028 --peak-snr 100

``--peak-snr inf`` writes noise-free data.
"""

from __future__ import annotations

import argparse
import sys

from qsmnet.io.errors import QSMInputError
from qsmnet.simulation.bids import write_simulated_subject


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="BIDS root folder")
    p.add_argument("--subject", default="01", help="subject label (letters and digits)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    p.add_argument("--voxel-size", type=float, nargs=3, default=(1.0, 1.0, 1.0),
                   metavar=("DX", "DY", "DZ"), help="voxel size, mm")
    p.add_argument("--b0-dir", type=float, nargs=3, default=(0.0, 0.0, 1.0),
                   metavar=("X", "Y", "Z"), help="B0 direction in array axes")
    p.add_argument("--b0", type=float, default=3.0, help="field strength, T")
    p.add_argument("--te", type=float, nargs="+", default=(0.004, 0.012, 0.020, 0.028),
                   help="echo times, s")
    p.add_argument("--peak-snr", type=float, default=100.0,
                   help="peak magnitude SNR (inf: no noise)")
    p.add_argument("--device", default="cpu", help="torch device to simulate on")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = write_simulated_subject(
            args.out, subject=args.subject, seed=args.seed, shape=tuple(args.shape),
            voxel_size_mm=tuple(args.voxel_size), b0_dir=tuple(args.b0_dir), b0_t=args.b0,
            te_s=tuple(args.te), peak_snr=args.peak_snr, device=args.device)
    except QSMInputError as exc:
        print(f"simulate: error: {exc}", file=sys.stderr)
        return 2
    for key in ("magnitude", "phase"):
        for path in written[key]:
            print(path)
    for key in ("chi", "mask", "localfield", "totalfield"):
        print(written[key])
    return 0


if __name__ == "__main__":
    sys.exit(main())
