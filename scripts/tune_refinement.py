#!/usr/bin/env python
"""Choose the test-time data-consistency setting of a trained model on simulated validation data.

``NetworkInverter`` can refine the network's answer with a few conjugate-gradient iterations of
``min ||M (D chi - f)||^2 + w ||chi - chi_net||^2`` (:func:`qsmnet.inference.dipole.dc_refine`).
This script scores a grid of (iterations, weight) on samples of qsmnet's own simulator -- the
validation seeds, never the qsm-forward evaluation phantoms, so the setting is not tuned on the
benchmark -- and prints the table; ``--json`` writes it. Pass the winner to
``scripts/export_model.py --refine-iterations N --refine-weight W``. With ``--bfr pdf`` the
samples' total fields go through that background removal first (what inference from phase
feeds the network), which is where the refinement's other setting is chosen::

    python scripts/tune_refinement.py logs/run/checkpoints/best.ckpt --samples 8 --shape 80
    python scripts/tune_refinement.py unet --bfr pdf --iterations 10 20 40 --weights 0.002 0.01
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint (.ckpt), release file (.pt) or 'unet'")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--shape", type=int, default=80, help="cube side of the simulated samples")
    p.add_argument("--seed", type=int, default=1234, help="first seed (validation seeds)")
    p.add_argument("--iterations", type=int, nargs="+", default=[0, 5, 10, 20, 40])
    p.add_argument("--weights", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    p.add_argument("--threads", type=int, default=2)
    from qsmnet.transforms.background import BFR_METHODS

    p.add_argument("--bfr", choices=BFR_METHODS,
                   help="score on background-removed fields (the setting for input from phase)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    from qsmnet.inference.dipole import dc_refine, make_inverter
    from qsmnet.metrics import score
    from qsmnet.simulation.simulator import QSMSimulator
    from qsmnet.transforms.background import remove_background
    from qsmnet.transforms.inversion import reference_to_mask_mean

    torch.set_num_threads(a.threads)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "data" / "simulated.yaml"))
    if a.bfr:
        # background-removed fields, as inference from phase gives them: brain-like masks with
        # an edge (as data.bfr trains), the total field through the same background removal
        cfg["simulator"].update(with_total_field=True, full_mask_prob=0.0)
    sim = QSMSimulator(cfg["simulator"])
    net = make_inverter(a.model, refine_iterations=0)
    samples = []
    for i in range(a.samples):
        s = sim((a.shape,) * 3, a.seed + i)
        vs = tuple(float(v) for v in s["voxel_size_mm"])
        b0 = tuple(float(v) for v in s["b0_dir"])
        m = s["mask"][0] > 0
        f = s["local_field_ppm"][0]
        if a.bfr:
            f, m = remove_background(a.bfr, s["total_field_ppm"][0], m, vs, b0)
        # the network once per sample; the refinement grid starts from its answer
        samples.append((f, m, vs, b0, net(f, m, vs, b0), s["chi_ppm"][0].double().numpy()))
    grid = [(0, 0.0)] + [(n, w) for n in a.iterations if n > 0 for w in a.weights]
    rows = []
    for n, w in grid:
        vals = []
        for f, m, vs, b0, chi0, truth in samples:
            chi = chi0
            if n > 0:
                mf = m.to(chi0.dtype)[None, None]
                chi = dc_refine(chi0[None, None], (f * m)[None, None], mf,
                                torch.tensor(vs, dtype=torch.float64),
                                torch.tensor(b0, dtype=torch.float64), w, n)
                chi = reference_to_mask_mean(chi, mf)[0, 0]
            vals.append(score(chi.double().numpy(), truth, m.numpy(), vs, erode_mm=None)["mask"])
        row = {"iterations": n, "weight": w,
               **{k: float(np.mean([v[k] for v in vals])) for k in ("nrmse", "hfen", "xsim")}}
        rows.append(row)
        print(f"iterations {n:3d}  weight {w:6.3f}  NRMSE {row['nrmse']:6.2f} %  "
              f"HFEN {row['hfen']:6.2f} %  XSIM {row['xsim']:.3f}", flush=True)
    # ties (within 0.05 NRMSE points) go to the cheaper setting: fewer iterations
    best = min(rows, key=lambda r: (round(r["nrmse"] / 0.05), r["iterations"]))
    print(f"best: --refine-iterations {best['iterations']} --refine-weight {best['weight'] or 0.05}")
    if a.json:
        from qsmnet.io.atomic import atomic_write_json

        atomic_write_json(a.json, {"model": a.model, "samples": a.samples, "shape": a.shape,
                                   "seed": a.seed, "bfr": a.bfr, "rows": rows, "best": best})
    return 0


if __name__ == "__main__":
    sys.exit(main())
