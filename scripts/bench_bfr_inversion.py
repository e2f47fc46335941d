#!/usr/bin/env python
"""Time background-field removal and dipole inversions on a full-size synthetic brain
(``timing``, the default), or measure their accuracy on the head-like qsm-forward phantoms
(``accuracy``).

Methods: V-SHARP, PDF, RESHARP, V-RESHARP (background removal: total field -> local field) and TKD,
closed-form L2, TV-ADMM, and TV-ADMM with the data term weighted by the mask (dipole inversion:
local field -> chi), each with its default parameters,
float32, on a 256 x 256 x 176 grid (1 mm) holding an ellipsoidal brain mask of ~1.6 M voxels with
a few susceptibility sources inside and air-like (+9 ppm) blobs outside.

Each method runs in its own fresh process (spawned), so that its peak memory can be read:
``peak_rss_mb`` is the process's resident-set high-water mark (``VmHWM`` from
``/proc/self/status``, or ``ru_maxrss`` where that is missing) after the run, and
``extra_mb`` is that peak minus the resident set just before the method started (inputs loaded,
torch imported). On CUDA, ``torch.cuda.max_memory_allocated`` is reported instead. The time is
the best of ``--repeat`` runs (wall clock, ``time.perf_counter``), after one untimed warm-up run
when ``--warmup`` is given.

Accuracy (``accuracy``): on :func:`qsmnet.simulation.qsmforward_acquisition.evaluation_set`
(head phantom, qsm-forward fields, axial 1 mm, B0 tilted 25 deg, 1x1x2 mm), each background
removal is applied to the simulated total field and scored against the local-field truth inside
the mask it returns (``nrmse_challenge``: demeaned NRMSE, %), and each inversion is applied to the
TRUE local field and scored against the chi truth with :func:`qsmnet.metrics.score` (QSM-CI
scorer: NRMSE, detrended NRMSE, HFEN, XSIM, CC in the brain mask and in the mask eroded by 3 mm).
Each background removal is also run on the TRUE local field (no background): that error is the
method's ceiling on this phantom given the field on the mask alone (the part of the local field
that looks harmonic inside the mask, which it cannot tell from background). And each is run on
the total field of the brain and the rim of bright signal (CSF) around it
(:func:`qsmnet.transforms.field_support_mask`, as ``qsmnet predict`` does) and scored inside
the brain: with the field measured beyond the brain's edge, less of the brain's own field looks
like background. ``--end-to-end`` also scores chi from each background removal followed by TV.

Usage::

    python scripts/bench_bfr_inversion.py                  # timing, all methods, 2 threads, CPU
    python scripts/bench_bfr_inversion.py --methods tkd l2 --repeat 3 --json out.json
    python scripts/bench_bfr_inversion.py accuracy --seeds 0 --json acc.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("vsharp", "pdf", "resharp", "vresharp", "tkd", "l2", "tv", "tv_weighted")


def synthetic_brain(shape=(256, 256, 176), voxel_size=(1.0, 1.0, 1.0)):
    """Ellipsoidal brain mask, chi (ppm) with a few structures, and total and local fields."""
    import torch

    from qsmnet.physics import forward_field

    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, voxel_size)],
                        indexing="ij", sparse=True)

    def ell(c, s):
        return sum(((g - ci) / si) ** 2 for g, ci, si in zip(grids, c, s)) <= 1.0

    mask = ell((0, 0, 0), (70, 88, 62))
    chi = np.zeros(shape, np.float32)
    chi[ell((0, 0, 0), (64, 82, 56))] = -0.02
    for c, s, v in [((-20, 10, 0), (6, 14, 8), 0.12), ((20, 10, 0), (6, 14, 8), 0.12),
                    ((0, -40, 20), (4, 4, 4), 0.3), ((0, 30, -10), (12, 8, 6), 0.05),
                    ((0, 0, 40), (2, 60, 2), 0.4)]:
        chi[ell(c, s)] = v
    chi = np.where(mask, chi, 0.0).astype(np.float32)
    air = (ell((0, 95, -40), (25, 12, 15)) | ell((0, 0, -80), (60, 40, 10))) & ~mask
    local = forward_field(torch.from_numpy(chi), voxel_size, (0, 0, 1), pad=32).numpy()
    total = forward_field(torch.from_numpy(np.where(air, 9.0, chi).astype(np.float32)),
                          voxel_size, (0, 0, 1), pad=32).numpy()
    return mask, chi, local.astype(np.float32), total.astype(np.float32)


def _rss_mb(key: str) -> float:
    from qsmnet.inference.resources import status_kib

    kib = status_kib(key)
    return kib / 1024.0 if kib else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(method, data_path, device, threads, repeat, warmup, queue):
    import torch

    torch.set_num_threads(threads)
    from qsmnet.transforms import closed_form_l2, pdf, resharp, tkd, tv_admm, vresharp, vsharp

    d = np.load(data_path)
    mask = torch.from_numpy(d["mask"]).to(device)
    total = torch.from_numpy(d["total"]).to(device)
    local = torch.from_numpy(d["local"]).to(device)
    vs, b0 = (1.0, 1.0, 1.0), (0.0, 0.0, 1.0)
    fn = {
        "vsharp": lambda: vsharp(total, mask, vs),
        "pdf": lambda: pdf(total, mask, vs, b0),
        "resharp": lambda: resharp(total, mask, vs),
        "vresharp": lambda: vresharp(total, mask, vs),
        "tkd": lambda: tkd(local, mask, vs, b0),
        "l2": lambda: closed_form_l2(local, mask, vs, b0),
        "tv": lambda: tv_admm(local, mask, vs, b0),
        "tv_weighted": lambda: tv_admm(local, mask, vs, b0, weights=mask.float()),
    }[method]
    base_mb = _rss_mb("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if warmup:
        fn()
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    res = {"method": method, "time_s": min(times), "times_s": times,
           "peak_rss_mb": _rss_mb("VmHWM"), "extra_mb": _rss_mb("VmHWM") - base_mb}
    if device.startswith("cuda"):
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    out = out[0] if isinstance(out, tuple) else out
    res["finite"] = bool(torch.isfinite(out).all())
    queue.put(res)


def accuracy(seeds=(0,), scale=0.75, end_to_end=False, threads=2, json_path=None) -> dict:
    """Score every method on the evaluation phantoms; print Markdown tables; return the numbers."""
    import torch
    from qsm_ci.qsm_eval import nrmse_challenge

    from qsmnet.metrics import score
    from qsmnet.simulation.qsmforward_acquisition import evaluation_set
    from qsmnet.transforms import (
        closed_form_l2,
        field_support_mask,
        pdf,
        resharp,
        tkd,
        tv_admm,
        vresharp,
        vsharp,
    )
    from qsmnet.transforms.field_support import DEFAULT_FIELD_MARGIN_MM
    from qsmnet.transforms.inversion import DEFAULT_INVERSION_PAD

    torch.set_num_threads(threads)
    bfr = {"V-SHARP": lambda f, m, vs, b0: vsharp(f, m, vs),
           "PDF": lambda f, m, vs, b0: pdf(f, m, vs, b0),
           "RESHARP": lambda f, m, vs, b0: resharp(f, m, vs),
           "V-RESHARP": lambda f, m, vs, b0: vresharp(f, m, vs)}
    inv = {"TKD": lambda f, m, vs, b0, w: tkd(f, m, vs, b0),
           "L2": lambda f, m, vs, b0, w: closed_form_l2(f, m, vs, b0),
           "TV": lambda f, m, vs, b0, w: tv_admm(f, m, vs, b0),
           "TV (magnitude-weighted)": lambda f, m, vs, b0, w: tv_admm(f, m, vs, b0, weights=w)}
    results = {"bfr": [], "inversion": [], "end_to_end": [], "pad": DEFAULT_INVERSION_PAD}
    t0 = time.perf_counter()
    cases = evaluation_set(seeds=seeds, scale=scale)
    print(f"simulated {len(cases)} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    for name, acq in cases:
        mask = torch.from_numpy(acq.mask)
        vs, b0 = tuple(acq.voxel_size_mm), tuple(float(b) for b in acq.b0_dir)
        total = torch.from_numpy(acq.total_field_ppm.astype(np.float32))
        local = torch.from_numpy(acq.local_field_ppm.astype(np.float32))
        mag = torch.from_numpy(np.sqrt((acq.magnitude.astype(np.float64) ** 2).mean(0))
                               .astype(np.float32))
        # the brain and the bright rim (CSF) around it, as ``qsmnet predict`` maps the field on
        support = field_support_mask(mask, acq.magnitude, vs, DEFAULT_FIELD_MARGIN_MM)
        for method, fn in bfr.items():
            t = time.perf_counter()
            lf, lm = fn(total, mask, vs, b0)
            t = time.perf_counter() - t
            lf, lm = lf.numpy().astype(np.float64), lm.numpy()
            nrmse = nrmse_challenge(lf, acq.local_field_ppm, lm)[0]
            # The method's ceiling on this phantom: run it on the TRUE local field (no
            # background at all). Whatever it removes there is the part of the local field that
            # is harmonic inside its mask -- indistinguishable from background for any method.
            lf0, lm0 = fn(local, mask, vs, b0)
            ceiling = nrmse_challenge(lf0.numpy().astype(np.float64), acq.local_field_ppm,
                                      lm0.numpy())[0]
            # the same on the field of the brain and its rim, scored in the brain
            lfr, lmr = fn(total * support, support, vs, b0)
            in_brain = lmr.numpy() & acq.mask
            with_rim = nrmse_challenge(lfr.numpy().astype(np.float64), acq.local_field_ppm,
                                       in_brain)[0]
            row = {"case": name, "method": method, "nrmse": nrmse, "time_s": t,
                   "nrmse_on_true_local_field": ceiling,
                   "mask_fraction": float(lm.sum() / acq.mask.sum()),
                   "nrmse_with_rim": with_rim,
                   "mask_fraction_with_rim": float(in_brain.sum() / acq.mask.sum()),
                   "rim_voxels": int((support & ~mask).sum())}
            results["bfr"].append(row)
            print(f"{name:20s} BFR {method:8s} local-field NRMSE {nrmse:6.1f} %  mask "
                  f"{row['mask_fraction']:.3f}  {t:5.1f} s  (on the true local field: "
                  f"{ceiling:.1f} %; with the {DEFAULT_FIELD_MARGIN_MM:g} mm rim: "
                  f"{with_rim:.1f} % in {row['mask_fraction_with_rim']:.3f} of the brain)",
                  flush=True)
            if end_to_end:
                chi = tv_admm(torch.from_numpy(lf.astype(np.float32)), torch.from_numpy(lm), vs, b0)
                sc = score(chi.numpy().astype(np.float64), acq.chi_ppm, lm, vs, erode_mm=None)
                results["end_to_end"].append({"case": name, "method": method + " + TV",
                                              **sc["mask"]})
                print(f"{'':20s}     {method} + TV: chi NRMSE {sc['mask']['nrmse']:6.1f} % "
                      f"(returned mask)", flush=True)
        for method, fn in inv.items():
            t = time.perf_counter()
            chi = fn(local, mask, vs, b0, mag)
            t = time.perf_counter() - t
            sc = score(chi.numpy().astype(np.float64), acq.chi_ppm, acq.mask, vs, erode_mm=3.0)
            results["inversion"].append({"case": name, "method": method, "time_s": t,
                                         **{f"{k}": v for k, v in sc["mask"].items()},
                                         "eroded": sc["eroded_mask"]})
            m = sc["mask"]
            print(f"{name:20s} INV {method:24s} NRMSE {m['nrmse']:6.1f} dNRMSE "
                  f"{m['nrmse_detrend']:6.1f} HFEN {m['hfen']:6.1f} XSIM {m['xsim']:.3f} "
                  f"CC {m['correlation']:.3f} (eroded NRMSE {sc['eroded_mask']['nrmse']:.1f})"
                  f"  {t:5.1f} s", flush=True)
    print("\n| case | method | local-field NRMSE % (returned mask) | same method on the true "
          "local field | mask fraction | with the rim: NRMSE % (returned mask in the brain) | "
          "mask fraction |")
    print("|---|---|---|---|---|---|---|")
    for r in results["bfr"]:
        print(f"| {r['case']} | {r['method']} | {r['nrmse']:.1f} | "
              f"{r['nrmse_on_true_local_field']:.1f} | {r['mask_fraction']:.3f} | "
              f"{r['nrmse_with_rim']:.1f} | {r['mask_fraction_with_rim']:.3f} |")
    print("\n| case | method | NRMSE % | dNRMSE % | HFEN % | XSIM | CC | NRMSE % (eroded 3 mm) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["inversion"]:
        print(f"| {r['case']} | {r['method']} | {r['nrmse']:.1f} | {r['nrmse_detrend']:.1f} | "
              f"{r['hfen']:.1f} | {r['xsim']:.3f} | {r['correlation']:.3f} | "
              f"{r['eroded']['nrmse']:.1f} |")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "accuracy":
        a = argparse.ArgumentParser(description="accuracy on the qsm-forward head phantoms")
        a.add_argument("--seeds", nargs="+", type=int, default=[0])
        a.add_argument("--scale", type=float, default=0.75)
        a.add_argument("--threads", type=int, default=2)
        a.add_argument("--end-to-end", action="store_true")
        a.add_argument("--json", type=Path, default=None)
        args = a.parse_args(argv[1:])
        accuracy(tuple(args.seeds), args.scale, args.end_to_end, args.threads, args.json)
        return 0
    if argv and argv[0] == "timing":
        argv = argv[1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--shape", nargs=3, type=int, default=(256, 256, 176))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--warmup", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    mask, _, local, total = synthetic_brain(tuple(args.shape))
    print(f"synthetic brain {tuple(args.shape)}: {int(mask.sum())} mask voxels "
          f"({time.perf_counter() - t0:.1f} s to simulate)", flush=True)
    results = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.npz")
        np.savez(data_path, mask=mask, local=local, total=total)
        for method in args.methods:
            q = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(method, data_path, args.device, args.threads,
                                                     args.repeat, args.warmup, q))
            proc.start()
            res = q.get()
            proc.join()
            results.append(res)
            extra = (f", cuda peak {res['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in res else "")
            print(f"{method:8s} {res['time_s']:7.2f} s   peak RSS {res['peak_rss_mb']:7.0f} MB "
                  f"(+{res['extra_mb']:.0f} MB over inputs){extra}", flush=True)
    meta = {"shape": list(args.shape), "threads": args.threads, "device": args.device,
            "torch": torch.__version__, "dtype": "float32", "repeat": args.repeat}
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
