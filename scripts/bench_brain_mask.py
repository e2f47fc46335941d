#!/usr/bin/env python
"""Automatic brain mask (:class:`qsmnet.transforms.masking.BrainMask`) against the true brain
mask of simulated heads, and against a peer brain extraction (``brainextractor``, a Python
implementation of FSL BET, where installed).

Heads: the evaluation phantom (:func:`qsmnet.simulation.head_phantom.head_phantom`: brain, a
4 mm rim of extra-cerebral CSF, skull, scalp, air sinuses and ear canals) in two variants:

* ``phantom``: as it is;
* ``bridged``: with the paths real heads offer from the brain to the scalp added (see
  :func:`bridged_head`): two eyes joined to the brain by optic nerves through the skull, and a
  temporal bone thinned to 2 mm, its outer part replaced by muscle touching the scalp.

Magnitude: qsm-forward's signal model (``qsm_forward.generate_signal`` and ``add_noise``) with
the acquisition of :func:`qsmnet.simulation.qsmforward_acquisition.simulate_acquisition` (TE
4/12/20/28 ms, TR 50 ms, flip 15 deg, R1 1/s, peak SNR 100), at 3 T with the phantom's R2*
and at 7 T with R2* doubled (qsm-forward's 7 T -> 3 T map scaling halves R2*). The field is
left out: the magnitude of that model does not depend on it, and complex Gaussian noise is
circular, so the magnitude's distribution is that of the full acquisition.

Masks: ``before`` is ``BrainMask(separation_mm=0)`` (the mask before the separation step),
``after`` is ``BrainMask()``, ``peer_bet`` is ``brainextractor.BrainExtractor`` with its
defaults on the RSS magnitude (only on the bridged heads of ``--peer-seeds`` at 3 T: it takes
tens of seconds).

Per case: Dice with the brain mask; Dice with the intracranial mask (brain plus the
extra-cerebral CSF rim, which all three masks take in: it is as bright as brain); missed brain
(mL); false-positive volume (mL) outside the brain by tissue (``csf_rim``, ``skull``, ``scalp``
(with the bridged variant's eyes, nerves and muscle), ``sinus_air``, ``air``); seconds.

Usage::

    python scripts/bench_brain_mask.py                     # writes docs/results/brain_mask.json
    python scripts/bench_brain_mask.py --seeds 0 --no-peer --json /tmp/brain_mask.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qsmnet.io.atomic import atomic_write_json  # noqa: E402
from qsmnet.simulation.head_phantom import LABELS, _ellipsoid, _tube, head_phantom  # noqa: E402
from qsmnet.transforms.masking import BrainMask  # noqa: E402

TE_S = (0.004, 0.012, 0.020, 0.028)
VOXEL_SIZES_MM = ((1.0, 1.0, 1.0), (1.0, 1.0, 2.0))
FIELDS_T = (3.0, 7.0)
VARIANTS = ("phantom", "bridged")
FP_CLASSES = ("csf_rim", "skull", "scalp", "sinus_air", "air")


def bridged_head(ph, scale: float):
    """Add brain-to-scalp bridges to a :class:`HeadPhantom` (in place; returned).

    Eyes: spheres of 11 mm radius (M0 1.0, R2* 5/s) in front of the frontal lobes; optic nerves:
    tubes of 2.5 mm radius (M0 0.9, R2* 25/s) from each eye through the skull into the brain's
    inferior frontal surface; temporal bone: in a lateral patch, skull farther than 2 mm from the
    intracranial space becomes muscle (M0 0.8, R2* 35/s) touching the scalp. All in mm of the
    phantom's anatomy (times ``scale``), labelled ``scalp``; the brain mask is unchanged.
    """
    vs = np.asarray(ph.voxel_size_mm)
    shape = ph.seg.shape
    axes = [(np.arange(n) - (n - 1) / 2.0) * d / scale for n, d in zip(shape, vs)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    seg, m0, r2s = ph.seg.copy(), ph.m0.copy(), ph.r2star_hz.copy()
    brain = ph.brain_mask
    eyes = np.zeros(shape, dtype=bool)
    nerves = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        eyes |= np.broadcast_to(
            _ellipsoid(x, y, z, (side * 32.0, 84.0, -26.0), (11, 11, 11)) <= 1, shape)
        nerves |= _tube(x, y, z, np.array([[side * 30.0, 80.0, -26.0],
                                           [side * 10.0, 50.0, -20.0]]), 2.5)
    eyes &= ~brain
    nerves &= ~brain & ~eyes
    intracranial = brain | (seg == LABELS["csf"])
    depth_mm = ndimage.distance_transform_edt(~intracranial, sampling=vs)
    patch = np.broadcast_to((np.abs(x) > 40) & (z > -35) & (z < 5) & (np.abs(y) < 40), shape)
    muscle = (seg == LABELS["skull"]) & patch & (depth_mm > 2.0 * scale)
    for sel, (m0_val, r2s_val) in ((eyes, (1.0, 5.0)), (nerves, (0.9, 25.0)),
                                   (muscle, (0.8, 35.0))):
        seg[sel], m0[sel], r2s[sel] = LABELS["scalp"], m0_val, r2s_val
    ph.seg, ph.m0, ph.r2star_hz = seg, m0, r2s
    return ph


def magnitude(ph, b0_t: float, seed: int) -> np.ndarray:
    """(E, X, Y, Z) float32 multi-echo magnitude of ``ph`` (module docstring)."""
    import qsm_forward as qf

    r2s = ph.r2star_hz * (b0_t / 3.0)
    rng = np.random.default_rng(1000 + seed)
    field = np.zeros(ph.m0.shape)
    out = []
    for te in TE_S:
        sig = qf.generate_signal(field, B0=b0_t, TR=0.05, TE=te, flip_angle=15.0, R1=1.0,
                                 R2star=r2s, M0=ph.m0)
        out.append(np.abs(qf.add_noise(sig, peak_snr=100.0, rng=rng)).astype(np.float32))
    return np.stack(out)


def make_heads(vs, seed: int, scale: float) -> dict:
    """``{variant: HeadPhantom}`` of one subject (the phantom is built once)."""
    ph = head_phantom(voxel_size_mm=vs, seed=seed, scale=scale)
    return {"phantom": ph, "bridged": bridged_head(copy.copy(ph), scale)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def score(mask: np.ndarray, ph) -> dict:
    """Dice, missed brain and false-positive volumes (mL) of ``mask`` on phantom ``ph``."""
    ml = float(np.prod(ph.voxel_size_mm)) / 1000.0
    brain = ph.brain_mask
    outside = mask & ~brain
    cls = {"csf_rim": ph.seg == LABELS["csf"], "skull": ph.seg == LABELS["skull"],
           "scalp": ph.seg == LABELS["scalp"], "sinus_air": ph.seg == LABELS["sinus_air"],
           "air": ph.seg == LABELS["air"]}
    return {"dice": dice(mask, brain),
            "dice_intracranial": dice(mask, brain | cls["csf_rim"]),
            "missed_brain_ml": float((brain & ~mask).sum()) * ml,
            "false_positive_ml": {k: float((outside & v).sum()) * ml for k, v in cls.items()}}


def peer_bet(mag: np.ndarray, vs) -> np.ndarray:
    """``brainextractor`` (FSL BET in Python) on the RSS magnitude, its defaults."""
    import nibabel as nib
    from brainextractor import BrainExtractor

    rss = np.sqrt((mag.astype(np.float64) ** 2).sum(axis=0)).astype(np.float32)
    img = nib.Nifti1Image(rss, np.diag([*map(float, vs), 1.0]))
    with contextlib.redirect_stdout(io.StringIO()):
        bet = BrainExtractor(img)
        bet.run()
        return bet.compute_mask() > 0


def run_case(ph, variant, vs, b0_t, seed, with_peer) -> dict:
    mag = magnitude(ph, b0_t, seed)
    mag_t = torch.from_numpy(mag)
    case = {"variant": variant, "voxel_size_mm": list(vs), "b0_t": b0_t, "seed": seed,
            "shape": list(ph.seg.shape), "brain_ml": float(ph.brain_mask.sum())
            * float(np.prod(vs)) / 1000.0, "masks": {}}
    makers = {"before": lambda: BrainMask(separation_mm=0.0)(mag_t, None, vs).numpy(),
              "after": lambda: BrainMask()(mag_t, None, vs).numpy()}
    if with_peer:
        makers["peer_bet"] = lambda: peer_bet(mag, vs)
    for name, make in makers.items():
        t0 = time.perf_counter()
        mask = make()
        seconds = time.perf_counter() - t0
        case["masks"][name] = {**score(mask, ph), "seconds": seconds}
    return case


def summarise(cases) -> dict:
    out = {}
    for variant in VARIANTS:
        for name in ("before", "after", "peer_bet"):
            rows = [c["masks"][name] for c in cases if c["variant"] == variant
                    and name in c["masks"]]
            if not rows:
                continue
            out[f"{variant}/{name}"] = {
                "n": len(rows),
                "dice_mean": float(np.mean([r["dice"] for r in rows])),
                "dice_min": float(np.min([r["dice"] for r in rows])),
                "dice_intracranial_mean": float(np.mean([r["dice_intracranial"] for r in rows])),
                "scalp_fp_ml_max": float(np.max([r["false_positive_ml"]["scalp"]
                                                 for r in rows])),
                "sinus_fp_ml_max": float(np.max([r["false_positive_ml"]["sinus_air"]
                                                 for r in rows])),
                "seconds_mean": float(np.mean([r["seconds"] for r in rows]))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--peer-seeds", type=int, nargs="*", default=[0],
                    help="seeds (bridged heads, 3 T) on which the peer brain extraction also runs")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--scale", type=float, default=0.75, help="head size (evaluation set's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "brain_mask.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        importlib.import_module("brainextractor")
        peer_error = None
    except ImportError as exc:
        peer_error = f"brainextractor not importable: {exc}"
    cases = []
    t_all = time.perf_counter()
    for vs in VOXEL_SIZES_MM:
        for seed in args.seeds:
            heads = make_heads(vs, seed, args.scale)
            for variant in VARIANTS:
                for b0_t in FIELDS_T:
                    with_peer = (not args.no_peer and peer_error is None and b0_t == 3.0
                                 and variant == "bridged" and seed in args.peer_seeds)
                    c = run_case(heads[variant], variant, vs, b0_t, seed, with_peer)
                    cases.append(c)
                    line = " ".join(f"{k} {v['dice']:.4f}/{v['false_positive_ml']['scalp']:.1f}mL"
                                    for k, v in c["masks"].items())
                    print(f"{variant:8s} {vs} {b0_t:.0f}T s{seed}: {line}", flush=True)
    result = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": args.threads,
              "scale": args.scale, "te_s": list(TE_S), "peak_snr": 100.0,
              "peer": peer_error or "brainextractor (BrainExtractor defaults, run())",
              "summary": summarise(cases), "cases": cases,
              "total_seconds": time.perf_counter() - t_all}
    atomic_write_json(args.json, result)
    for k, v in result["summary"].items():
        print(f"{k:22s} dice {v['dice_mean']:.4f} (min {v['dice_min']:.4f}) intracranial "
              f"{v['dice_intracranial_mean']:.4f} scalp FP max {v['scalp_fp_ml_max']:.1f} mL "
              f"{v['seconds_mean']:.2f} s")
    print(f"wrote {args.json} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
