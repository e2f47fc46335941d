#!/usr/bin/env python
"""Accuracy and speed of field mapping (offset removal -> unwrap -> fit) on qsm-forward phantoms.

Accuracy: the head-like phantom (:mod:`qsmnet.simulation.head_phantom`) acquired with
qsm-forward (:mod:`qsmnet.simulation.qsmforward_acquisition`: wrapped phase, shim field, phase
offset, peak SNR 100, TE 4/12/20/28 ms, 3 T) for the fixed evaluation cases, plus the timing
volume. Reported per case, inside the brain mask given with the phantom:

* QSM-CI field metrics (``qsm_ci.qsm_eval.field_metrics``: demeaned NRMSE %, detrended NRMSE %,
  correlation, XSIM) of the total field against the true total field, in the mask and in the
  mask eroded by one voxel;
* the fraction of mask voxels with a wrong 2pi count (any echo, and echo 1), against the true
  phase of each echo, and the metrics without those voxels (the continuous accuracy: noise and
  offset errors); and how many mask voxels are *aliased* (the true phase at TE1 differs from a
  mask neighbour's by more than pi: no unwrapper can recover those);
* with the automatic mask (:class:`qsmnet.transforms.masking.BrainMask`): Dice with the brain
  mask and the NRMSE on their intersection.

Speed: a ``--shape`` volume (default 256 x 256 x 176, 1 mm, 4 echoes, float32) on ``--threads``
CPU threads. Each step runs in a fresh process (so peak memory is its own) on the inputs it
gets inside :class:`~qsmnet.transforms.field_mapping.FieldMapping` (the mask's bounding box):
offset removal (MCPC-3D-S incl. the inter-echo Laplacian unwrap and smoothing), unwrap (spatial
Laplacian unwrap of echo 1 + temporal unwrap), fit (weighted least squares -> ppm), plus the
automatic mask and the whole ``FieldMapping`` call on the full arrays. Seconds are the median of
``--repeats`` runs after one warm-up run (CPU seconds of the process too: on a shared, loaded
machine the single-thread CPU time is the better estimate of the unloaded wall time). Peak
memory (MiB) is the kernel's peak resident set size of that process (VmHWM, the value
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` reports), reset to the current RSS via
``/proc/self/clear_refs`` once the inputs are loaded, minus that RSS: the step's own working
memory on top of its inputs (``ru_maxrss`` directly where the reset is unavailable).

Usage::

    python scripts/bench_field_mapping.py                      # everything (a few minutes)
    python scripts/bench_field_mapping.py --skip-accuracy --threads 2
    python scripts/bench_field_mapping.py --cache /tmp/fm_bench --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = ("mask", "offset", "unwrap", "fit", "total")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def acquisition_arrays(acq) -> dict:
    return dict(phase=acq.phase, magnitude=acq.magnitude, te_s=np.asarray(acq.te_s),
                b0_t=np.asarray(acq.b0_t), voxel_size_mm=np.asarray(acq.voxel_size_mm),
                mask=acq.mask, total_field_ppm=acq.total_field_ppm.astype(np.float32),
                phase_offset_rad=acq.phase_offset_rad.astype(np.float32))


def timing_volume(shape, cache: Path | None) -> dict:
    """The qsm-forward acquisition of the full-size head phantom on ``shape`` (1 mm)."""
    path = cache / f"acq_{'x'.join(map(str, shape))}.npz" if cache else None
    if path is not None and path.exists():
        return dict(np.load(path))
    from qsmnet.simulation.head_phantom import head_phantom
    from qsmnet.simulation.qsmforward_acquisition import simulate_acquisition

    t = time.time()
    print(f"simulating the {shape} timing volume with qsm-forward ...", flush=True)
    acq = simulate_acquisition(head_phantom(shape=shape, voxel_size_mm=(1, 1, 1), seed=0),
                               peak_snr=100.0, seed=1000)
    arrays = acquisition_arrays(acq)
    print(f"  done in {time.time() - t:.0f} s", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
    return arrays


def evaluation_cases(seeds, scale: float, cache: Path | None) -> list[tuple[str, dict]]:
    """The fixed evaluation set (as ``qsmforward_acquisition.evaluation_set`` builds it), one
    cached ``.npz`` per case."""
    from qsmnet.simulation.qsmforward_acquisition import (
        EVALUATION_CASES,
        EVALUATION_SET_TAG,
        evaluation_set,
    )

    out = []
    for seed in seeds:
        for spec in EVALUATION_CASES:
            case = f"{spec[0]}_s{seed}"
            path = cache / f"eval_{case}_scale{scale}_{EVALUATION_SET_TAG}.npz" if cache else None
            if path is not None and path.exists():
                out.append((case, dict(np.load(path))))
                continue
            print(f"simulating {case} with qsm-forward ...", flush=True)
            [(_, acq)] = evaluation_set(seeds=(seed,), scale=scale, cases=(spec,))
            arrays = acquisition_arrays(acq)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **arrays)
            out.append((case, arrays))
    return out


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------

def aliased_voxels(phase_te1: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask voxels whose true phase differs from a mask neighbour's by more than pi."""
    out = np.zeros(mask.shape, dtype=bool)
    for ax in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[ax] = slice(0, -1)
        b[ax] = slice(1, None)
        jump = (np.abs(phase_te1[tuple(b)] - phase_te1[tuple(a)]) > math.pi) \
            & mask[tuple(a)] & mask[tuple(b)]
        out[tuple(a)] |= jump
        out[tuple(b)] |= jump
    return out


def evaluate(name: str, arrays: dict) -> dict:
    import torch
    from qsm_ci.qsm_eval import field_metrics
    from scipy import ndimage

    from qsmnet.physics.units import wrap_phase
    from qsmnet.simulation.qsmforward_acquisition import QSMFORWARD_GAMMA_BAR_MHZ_PER_T as GQF
    from qsmnet.transforms.field_mapping import FieldMapping
    from qsmnet.transforms.phase_offsets import mcpc3ds_phase_offset, remove_phase_offset
    from qsmnet.transforms.reliability import unreliable_phase_mask
    from qsmnet.transforms.temporal_unwrapping import temporal_unwrap
    from qsmnet.transforms.unwrap import unwrap_laplacian

    phase = torch.from_numpy(arrays["phase"])
    mag = torch.from_numpy(arrays["magnitude"])
    mask_np = arrays["mask"].astype(bool)
    mask = torch.from_numpy(mask_np)
    te = [float(t) for t in arrays["te_s"]]
    b0 = float(arrays["b0_t"])
    vs = tuple(float(v) for v in arrays["voxel_size_mm"])
    truth = arrays["total_field_ppm"].astype(np.float64)

    fm = FieldMapping()
    t = time.perf_counter()
    field, _, noise = fm(phase, mag, te, b0, mask, vs)
    seconds = time.perf_counter() - t
    field = field.numpy().astype(np.float64)
    eroded = ndimage.binary_erosion(mask_np)
    res = {"case": name, "shape": list(mask_np.shape), "voxel_size_mm": list(vs),
           "mask_voxels": int(mask_np.sum()), "seconds": seconds}
    res["mask"] = field_metrics(field, truth, mask_np)
    res["eroded1"] = field_metrics(field, truth, eroded)
    res["field_noise_ppm_median"] = float(np.median(noise.numpy()[mask_np]))

    # Wrong 2pi counts: replay the chain (same functions and settings as FieldMapping).
    offset, evolution = mcpc3ds_phase_offset(phase, mag, te, mask, vs, fm.offset_sigma_mm,
                                             fm.offset_echoes, fm.unwrap_max_iter,
                                             fm.offset_poly_order)
    corr = remove_phase_offset(phase, offset)
    ref = unwrap_laplacian(corr[0], mask, vs, reference_rad=evolution,
                           max_iter=fm.unwrap_max_iter)
    unwrapped = temporal_unwrap(corr, te, ref, 0, mag).numpy()
    off_err = wrap_phase(offset - torch.from_numpy(arrays["phase_offset_rad"])).numpy()
    wrong_any = np.zeros(int(mask_np.sum()), dtype=bool)
    wrong_first = None
    for e, te_e in enumerate(te):
        true_e = 2 * math.pi * GQF * b0 * te_e * truth - off_err
        k = np.round((unwrapped[e] - true_e)[mask_np] / (2 * math.pi))
        k -= np.median(k)
        wrong_any |= k != 0
        if e == 0:
            wrong_first = float((k != 0).mean())
    res["wrong_2pi_fraction_any_echo"] = float(wrong_any.mean())
    res["wrong_2pi_voxels"] = int(wrong_any.sum())
    right = mask_np.copy()
    right[mask_np] = ~wrong_any
    res["mask_without_wrong_2pi"] = field_metrics(field, truth, right)
    res["wrong_2pi_fraction_echo1"] = wrong_first
    res["aliased_voxels_te1"] = int(aliased_voxels(2 * math.pi * GQF * b0 * te[0] * truth,
                                                   mask_np).sum())
    res["offset_error_rad_std"] = float(off_err[mask_np].std())
    # The automatic unreliable-phase test of the inference pipeline (no truth needed): how many
    # voxels it flags, how many of the wrong-2pi voxels it catches, and the field error outside
    # what it flags.
    flagged = unreliable_phase_mask(torch.from_numpy(field), mask, te[fm.ref_index], b0).numpy()
    wrong_map = np.zeros_like(mask_np)
    wrong_map[mask_np] = wrong_any
    res["unreliable_flagged_voxels"] = int(flagged.sum())
    res["wrong_2pi_voxels_flagged"] = int((wrong_map & flagged).sum())
    res["mask_without_flagged"] = field_metrics(field, truth, mask_np & ~flagged)

    auto, _, _ = FieldMapping()(phase, mag, te, b0, None, vs)
    auto_field = auto.numpy().astype(np.float64)
    auto_mask = fm.mask_transform(mag, None, vs).numpy()
    both = auto_mask & mask_np
    res["auto_mask"] = {"dice": float(2 * both.sum() / (auto_mask.sum() + mask_np.sum())),
                        "on_intersection": field_metrics(auto_field, truth, both)}
    return res


# --------------------------------------------------------------------------------------------
# Speed (one step per child process)
# --------------------------------------------------------------------------------------------

def prepare_step_inputs(arrays: dict, folder: Path) -> dict:
    """Inputs of every step as FieldMapping feeds them (cropped to the mask's bounding box)."""
    import torch

    from qsmnet.transforms.field_mapping import FieldMapping
    from qsmnet.transforms._grid import mask_bbox
    from qsmnet.transforms.phase_offsets import mcpc3ds_phase_offset, remove_phase_offset
    from qsmnet.transforms.temporal_unwrapping import temporal_unwrap
    from qsmnet.transforms.unwrap import unwrap_laplacian

    fm = FieldMapping()
    mask = torch.from_numpy(arrays["mask"].astype(bool))
    box = mask_bbox(mask) or tuple(slice(0, n) for n in mask.shape[-3:])
    sl3 = (Ellipsis, *box)
    sl4 = (Ellipsis, slice(None), *box)
    phase = torch.from_numpy(arrays["phase"])[sl4].contiguous()
    mag = torch.from_numpy(arrays["magnitude"])[sl4].contiguous()
    m = mask[sl3].contiguous()
    te = [float(t) for t in arrays["te_s"]]
    vs = tuple(float(v) for v in arrays["voxel_size_mm"])
    offset, evolution = mcpc3ds_phase_offset(phase, mag, te, m, vs, fm.offset_sigma_mm,
                                             fm.offset_echoes, fm.unwrap_max_iter,
                                             fm.offset_poly_order)
    corr = remove_phase_offset(phase, offset)
    ref = unwrap_laplacian(corr[0], m, vs, reference_rad=evolution, max_iter=fm.unwrap_max_iter)
    unwrapped = temporal_unwrap(corr, te, ref, 0, mag)
    common = dict(te_s=np.asarray(te), b0_t=arrays["b0_t"], voxel_size_mm=np.asarray(vs))
    files = {
        "mask": dict(magnitude=arrays["magnitude"], **common),
        "offset": dict(phase=phase.numpy(), magnitude=mag.numpy(), mask=m.numpy(), **common),
        "unwrap": dict(phase=corr.numpy(), magnitude=mag.numpy(), mask=m.numpy(),
                       reference=evolution.numpy(), **common),
        "fit": dict(phase=unwrapped.numpy(), magnitude=mag.numpy(), mask=m.numpy(), **common),
        "total": dict(phase=arrays["phase"], magnitude=arrays["magnitude"],
                      mask=arrays["mask"], **common),
    }
    paths = {}
    for step, data in files.items():
        paths[step] = folder / f"step_{step}.npz"
        np.savez(paths[step], **data)
    return {"bbox_shape": [s.stop - s.start for s in box], "paths": paths}


def run_child(step: str, path: str, threads: int, repeats: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from qsmnet.inference.resources import reset_peak_resident_memory, status_kib
    from qsmnet.transforms.field_mapping import FieldMapping
    from qsmnet.transforms.masking import BrainMask
    from qsmnet.transforms.echo_fit import fit_field_wls
    from qsmnet.transforms.phase_offsets import mcpc3ds_phase_offset, remove_phase_offset
    from qsmnet.transforms.temporal_unwrapping import temporal_unwrap
    from qsmnet.transforms.unwrap import unwrap_laplacian

    d = dict(np.load(path))
    t = {k: torch.from_numpy(v) for k, v in d.items() if v.ndim >= 3}
    te = [float(x) for x in d["te_s"]]
    b0 = float(d["b0_t"])
    vs = tuple(float(v) for v in d["voxel_size_mm"])
    if "mask" in t:
        t["mask"] = t["mask"].to(torch.bool)
    fm = FieldMapping()

    def once():
        if step == "mask":
            BrainMask()(t["magnitude"], None, vs)
        elif step == "offset":
            off, _ = mcpc3ds_phase_offset(t["phase"], t["magnitude"], te, t["mask"], vs,
                                          fm.offset_sigma_mm, fm.offset_echoes,
                                          fm.unwrap_max_iter, fm.offset_poly_order)
            remove_phase_offset(t["phase"], off)
        elif step == "unwrap":
            ref = unwrap_laplacian(t["phase"][0], t["mask"], vs, reference_rad=t["reference"],
                                   max_iter=fm.unwrap_max_iter)
            temporal_unwrap(t["phase"], te, ref, 0, t["magnitude"])
        elif step == "fit":
            fit_field_wls(t["phase"], te, b0, t["magnitude"], t["mask"])
        elif step == "total":
            fm(t["phase"], t["magnitude"], te, b0, t["mask"], vs)

    # the step's own peak, not the input loading's (or, after exec, the parent's)
    method = "VmHWM" if reset_peak_resident_memory() else "ru_maxrss"
    base_kib = status_kib("VmRSS")
    once()  # warm-up (allocator, FFT plans)
    secs, cpus = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        c0 = time.process_time()
        once()
        secs.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    peak_kib = status_kib("VmHWM") if method == "VmHWM" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step": step, "seconds_median": float(np.median(secs)),
                      "seconds_min": float(min(secs)), "cpu_seconds_median": float(np.median(cpus)),
                      "threads": threads,
                      "peak_rss_delta_mib": (peak_kib - base_kib) / 1024.0,
                      "peak_rss_mib": peak_kib / 1024.0, "inputs_rss_mib": base_kib / 1024.0,
                      "memory_method": method}))


def time_steps(arrays: dict, threads: int, repeats: int, folder: Path) -> dict:
    prep = prepare_step_inputs(arrays, folder)
    out = {"shape": list(arrays["mask"].shape), "echoes": int(arrays["phase"].shape[0]),
           "bbox_shape": prep["bbox_shape"], "threads": threads, "repeats": repeats,
           "loadavg_before": os.getloadavg(), "steps": {}}
    for step in STEPS:
        cmd = [sys.executable, __file__, "--_child", step, "--_inputs", str(prep["paths"][step]),
               "--threads", str(threads), "--repeats", str(repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out["steps"][step] = json.loads(proc.stdout.strip().splitlines()[-1])
        s = out["steps"][step]
        print(f"  {step:7s} {s['seconds_median']:6.2f} s (min {s['seconds_min']:.2f}, "
              f"cpu {s['cpu_seconds_median']:.2f})  peak +{s['peak_rss_delta_mib']:.0f} MiB",
              flush=True)
    out["loadavg_after"] = os.getloadavg()
    return out


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 176))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--scale", type=float, default=0.75,
                   help="head scale of the evaluation cases (qsmforward_acquisition)")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--cache", type=Path, default=None, help="folder to cache simulations")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_inputs", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        run_child(args._child, args._inputs, args.threads, args.repeats)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    results: dict = {"torch": torch.__version__, "cpu_count": os.cpu_count()}
    full = timing_volume(tuple(args.shape), args.cache)
    if not args.skip_timing:
        print(f"timing on {tuple(args.shape)} x {full['phase'].shape[0]} echoes, "
              f"{args.threads} threads (median of {args.repeats}) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results["timing"] = time_steps(full, args.threads, args.repeats, Path(tmp))
    if not args.skip_accuracy:
        cases = [(f"full_{'x'.join(map(str, args.shape))}_s0", full)]
        cases += evaluation_cases(args.seeds, args.scale, args.cache)
        results["accuracy"] = []
        print(f"{'case':24s} {'NRMSE%':>7s} {'ero1%':>7s} {'no2pi%':>7s} {'wrong2pi':>9s} "
              f"{'aliased':>7s} {'dice':>6s} {'auto%':>6s} {'flagged':>7s} {'caught':>9s} "
              f"{'unflag%':>7s}", flush=True)
        for name, arrays in cases:
            r = evaluate(name, arrays)
            results["accuracy"].append(r)
            print(f"{name:24s} {r['mask']['nrmse']:7.2f} {r['eroded1']['nrmse']:7.2f} "
                  f"{r['mask_without_wrong_2pi']['nrmse']:7.2f} "
                  f"{r['wrong_2pi_fraction_any_echo']:9.1e} {r['aliased_voxels_te1']:7d} "
                  f"{r['auto_mask']['dice']:6.3f} "
                  f"{r['auto_mask']['on_intersection']['nrmse']:6.2f} "
                  f"{r['unreliable_flagged_voxels']:7d} "
                  f"{r['wrong_2pi_voxels_flagged']:4d}/{r['wrong_2pi_voxels']:<4d} "
                  f"{r['mask_without_flagged']['nrmse']:7.2f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
