#!/usr/bin/env python
"""qsmnet benchmarks: accuracy against the classical methods, speed and memory, in one command.

Sections (each writes ``docs/results/<section>.json``; ``docs/benchmarks.md`` is rendered from
every JSON present, so sections can be run separately and a killed run resumes where it stopped):

``accuracy``
    On the fixed evaluation set of head-like phantoms simulated with *qsm-forward* (an
    independent simulator: :func:`qsmnet.simulation.qsmforward_acquisition.evaluation_set`;
    axial 1 mm, B0 tilted 25 deg, 1x1x2 mm voxels, peak SNR 100, two subjects):

    * dipole stage, true local field given: TKD, closed-form L2, TV-ADMM, the network (unet) and
      the network with test-time data consistency (unet+dc);
    * end to end from wrapped multi-echo phase with the true brain mask: field mapping, then each
      background removal (PDF, V-SHARP, RESHARP), then each inversion.

    Metrics: the QSM-CI scorer (``qsmnet.metrics.score``), inside the brain mask.
``speed``
    The end-to-end chain (field mapping + PDF + inversion) on synthetic 4-echo volumes from 64^3
    to 256x256x176, each size in a fresh process so that its peak memory (``VmHWM``) is its own.

Usage::

    python scripts/benchmark.py                      # all sections
    python scripts/benchmark.py accuracy --seeds 0   # one section, fewer subjects
    python scripts/benchmark.py render               # only rebuild docs/benchmarks.md

Results are cached per case in the JSON files; ``--force`` recomputes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
CACHE = ROOT / ".benchmarks"
INVERSIONS = ("tkd", "l2", "tv", "tv_masked", "unet", "unet+dc")
BFRS = ("pdf", "vsharp", "resharp")
SIZES = ((64, 64, 64), (128, 128, 96), (160, 192, 160), (256, 256, 176))


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, obj: dict) -> None:
    from qsmnet.io.atomic import atomic_write_json

    atomic_write_json(path, obj)


def _machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _eval_set(seeds, scale):
    """The evaluation set, cached as .npz (simulating it with qsm-forward takes minutes)."""
    from qsmnet.simulation.qsmforward_acquisition import Acquisition, evaluation_set

    CACHE.mkdir(exist_ok=True)
    out = []
    for seed in seeds:
        path = CACHE / f"evalset_s{seed}_x{scale}.npz"
        if not path.is_file():
            items = evaluation_set(seeds=(seed,), scale=scale)
            np.savez_compressed(path, names=[n for n, _ in items],
                                **{f"{i}_{k}": v for i, (_, a) in enumerate(items)
                                   for k, v in a.__dict__.items()})
        data = np.load(path, allow_pickle=False)
        for i, name in enumerate(data["names"]):
            fields = {k: data[f"{i}_{k}"] for k in Acquisition.__dataclass_fields__}
            fields["te_s"] = tuple(float(t) for t in fields["te_s"])
            fields["b0_t"] = float(fields["b0_t"])
            fields["voxel_size_mm"] = tuple(float(v) for v in fields["voxel_size_mm"])
            out.append((str(name), Acquisition(**fields)))
    return out


def _inverter(name: str):
    from qsmnet.inference.dipole import make_inverter
    from qsmnet.inference.model_store import SHIPPED_MODEL

    if name == "tv_masked":
        # TV-ADMM whose data term covers the brain only: the strongest classical baseline here.
        from qsmnet.transforms.inversion import tv_admm

        def tv_masked(f, m, vs, b0):
            return tv_admm(f, m, tuple(vs), tuple(b0), weights=m.to(f.dtype))

        return tv_masked
    if name.startswith("unet"):
        if not SHIPPED_MODEL.is_file():
            return None
        return make_inverter("unet", refine_iterations=10 if name == "unet+dc" else 0)
    return make_inverter(name)


def run_accuracy(seeds, scale, force=False, end_to_end=True) -> dict:
    import torch

    from qsmnet.inference.pipeline import reconstruct
    from qsmnet.metrics import score

    path = RESULTS / "accuracy.json"
    res = {} if force else _load(path)
    res.setdefault("dipole", {})
    res.setdefault("end_to_end", {})
    res["machine"] = _machine()
    res["eval_set"] = {"simulator": "qsm-forward", "scale": scale, "seeds": list(seeds),
                       "peak_snr": 100, "b0_t": 3.0, "te_s": [0.004, 0.012, 0.020, 0.028]}
    inverters = {name: _inverter(name) for name in INVERSIONS}
    for case, acq in _eval_set(seeds, scale):
        vs, b0 = acq.voxel_size_mm, tuple(acq.b0_dir)
        mask = torch.from_numpy(acq.mask)
        local = torch.from_numpy(acq.local_field_ppm.astype(np.float32))
        for name, inv in inverters.items():
            key = f"{case}/{name}"
            if inv is None or key in res["dipole"]:
                continue
            t0 = time.perf_counter()
            chi = inv(local, mask, vs, b0)
            sec = time.perf_counter() - t0
            m = score(chi.numpy(), acq.chi_ppm, acq.mask, vs, erode_mm=None)["mask"]
            res["dipole"][key] = {**m, "seconds": sec}
            print(f"dipole {key}: NRMSE {m['nrmse']:.1f} %  ({sec:.1f} s)", flush=True)
            _save(path, res)
        if not end_to_end:
            continue
        sample = {"phase": acq.phase, "magnitude": acq.magnitude, "te_s": acq.te_s,
                  "b0_t": acq.b0_t, "voxel_size_mm": vs, "b0_dir": b0, "mask": acq.mask}
        for bfr in BFRS:
            todo = [n for n, inv in inverters.items()
                    if inv is not None and f"{case}/{bfr}/{n}" not in res["end_to_end"]]
            if not todo:
                continue
            base = reconstruct(sample, inverter=lambda f, *a: f, start="phase", bfr=bfr)
            for name in todo:
                inv = inverters[name]
                t0 = time.perf_counter()
                chi = inv(base.local_field_ppm, base.chi_mask, vs, b0)
                sec = time.perf_counter() - t0
                m = score(chi.numpy(), acq.chi_ppm, acq.mask, vs, erode_mm=None)["mask"]
                m["seconds_inversion"] = sec
                m["seconds_field_mapping"] = base.timings_s.get("field_mapping")
                m["seconds_bfr"] = base.timings_s.get("background_removal")
                res["end_to_end"][f"{case}/{bfr}/{name}"] = m
                print(f"end-to-end {case}/{bfr}/{name}: NRMSE {m['nrmse']:.1f} %", flush=True)
                _save(path, res)
    return res


def _synthetic_volume(shape, seed=0):
    """A 4-echo acquisition of a random simulated head on ``shape`` (qsmnet's simulator)."""
    from qsmnet.simulation.simulator import simulate_sample

    s = simulate_sample(tuple(shape), seed, acquisition=True, full_mask_prob=0.0,
                        mask_radius_frac=[0.8, 0.9], mask_center_jitter=0.0, strong_prob=0.0,
                        voxel_size_mm=[1.0, 1.0, 1.0], b0_dir=[0.0, 0.0, 1.0])
    return {"phase": s["phase"], "magnitude": s["magnitude"], "te_s": s["te_s"],
            "b0_t": float(s["b0_t"]), "voxel_size_mm": (1.0, 1.0, 1.0),
            "b0_dir": (0.0, 0.0, 1.0), "mask": s["mask"][0] > 0}


def _speed_worker(shape, method, device, threads, queue):
    import torch

    torch.set_num_threads(threads)
    from qsmnet.inference.dipole import make_inverter
    from qsmnet.inference.pipeline import reconstruct

    sample = _synthetic_volume(shape)
    inv = make_inverter(method, device)
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    t0 = time.perf_counter()
    rec = reconstruct(sample, inverter=inv, start="phase", bfr="pdf", device=device)
    total = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    queue.put({"seconds_total": total, **{f"seconds_{k}": v for k, v in rec.timings_s.items()},
               "peak_rss_mb": peak, "rss_before_mb": before,
               "mask_voxels": int(sample["mask"].sum())})


def run_speed(sizes, methods, device="cpu", threads=2, force=False) -> dict:
    path = RESULTS / "speed.json"
    res = {} if force else _load(path)
    res.setdefault("runs", {})
    res["machine"] = _machine()
    res["machine"]["threads_used"] = threads
    ctx = mp.get_context("spawn")
    for shape in sizes:
        for method in methods:
            key = f"{device}/{'x'.join(map(str, shape))}/{method}"
            if key in res["runs"]:
                continue
            q = ctx.Queue()
            p = ctx.Process(target=_speed_worker, args=(shape, method, device, threads, q))
            p.start()
            p.join()
            if p.exitcode != 0:
                print(f"speed {key}: worker failed ({p.exitcode})", flush=True)
                continue
            res["runs"][key] = q.get()
            print(f"speed {key}: {res['runs'][key]['seconds_total']:.1f} s, "
                  f"peak {res['runs'][key]['peak_rss_mb']:.0f} MB", flush=True)
            _save(path, res)
    return res


def _table(rows: list[list], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _mean_by(entries: dict, group) -> dict:
    groups: dict = {}
    for key, m in entries.items():
        groups.setdefault(group(key), []).append(m)
    return {g: {k: float(np.mean([m[k] for m in ms])) for k in ("nrmse", "nrmse_detrend",
                                                                 "hfen", "xsim", "correlation")}
            | {"n": len(ms)} for g, ms in groups.items()}


def render() -> Path:
    """Rebuild docs/benchmarks.md from docs/results/*.json."""
    lines = ["# Benchmarks", "",
             "Generated by `python scripts/benchmark.py` (sections `accuracy`, `speed`; "
             "`render` rebuilds this page). Raw numbers: `docs/results/*.json`. "
             "Metrics are the QSM-CI scorer's (`qsm_ci.qsm_eval`), inside the brain mask; NRMSE, "
             "detrended NRMSE (dNRMSE) and HFEN in %, lower is better; XSIM and correlation (CC), "
             "higher is better.", ""]
    acc = _load(RESULTS / "accuracy.json")
    if acc.get("dipole"):
        lines += ["## Dipole inversion, true local field given", "",
                  f"Evaluation set: head-like phantoms simulated by qsm-forward "
                  f"({acc.get('eval_set', {})}).", ""]
        by_case = _mean_by(acc["dipole"], lambda k: (k.split("/")[0].rsplit("_s", 1)[0],
                                                     k.split("/")[1]))
        rows = []
        for (case, meth), m in sorted(by_case.items()):
            rows.append([case, meth, f"{m['nrmse']:.1f}", f"{m['nrmse_detrend']:.1f}",
                         f"{m['hfen']:.1f}", f"{m['xsim']:.3f}", f"{m['correlation']:.3f}",
                         m["n"]])
        lines += [_table(rows, ["case", "method", "NRMSE", "dNRMSE", "HFEN", "XSIM", "CC",
                                "subjects"]), ""]
    if acc.get("end_to_end"):
        lines += ["## End to end, from wrapped multi-echo phase (true brain mask)", ""]
        by = _mean_by(acc["end_to_end"], lambda k: (k.split("/")[1], k.split("/")[2]))
        rows = [[b, m_, f"{m['nrmse']:.1f}", f"{m['nrmse_detrend']:.1f}", f"{m['hfen']:.1f}",
                 f"{m['xsim']:.3f}", f"{m['correlation']:.3f}", m["n"]]
                for (b, m_), m in sorted(by.items())]
        lines += [_table(rows, ["background removal", "inversion", "NRMSE", "dNRMSE", "HFEN",
                                "XSIM", "CC", "cases"]), ""]
    spd = _load(RESULTS / "speed.json")
    if spd.get("runs"):
        lines += ["## Speed and peak memory, end to end (field mapping + PDF + inversion)", "",
                  f"Machine: {spd.get('machine')}. Each row is a fresh process; peak memory is "
                  "the process's resident-set high-water mark (VmHWM).", ""]
        rows = []
        for key, r in spd["runs"].items():
            dev, shape, meth = key.split("/")
            rows.append([dev, shape, meth, r.get("mask_voxels", ""),
                         f"{r.get('seconds_field_mapping', 0):.1f}",
                         f"{r.get('seconds_background_removal', 0):.1f}",
                         f"{r.get('seconds_dipole_inversion', 0):.1f}",
                         f"{r['seconds_total']:.1f}", f"{r['peak_rss_mb']:.0f}"])
        lines += [_table(rows, ["device", "volume", "inversion", "mask voxels",
                                "field map s", "PDF s", "inversion s", "total s",
                                "peak MB"]), ""]
    extra = ROOT / "docs" / "benchmarks_notes.md"
    if extra.is_file():
        lines += [extra.read_text()]
    out = ROOT / "docs" / "benchmarks.md"
    from qsmnet.io.atomic import atomic_write_text

    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", nargs="?", default="all",
                   choices=("all", "accuracy", "speed", "render"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--scale", type=float, default=0.75,
                   help="head size factor of the evaluation phantoms (grid follows)")
    p.add_argument("--no-end-to-end", action="store_true")
    p.add_argument("--sizes", nargs="+", default=["x".join(map(str, s)) for s in SIZES])
    p.add_argument("--methods", nargs="+", default=["unet", "tv"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="recompute cached results")
    a = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.section in ("all", "accuracy"):
        import torch

        torch.set_num_threads(a.threads)
        run_accuracy(a.seeds, a.scale, a.force, not a.no_end_to_end)
    if a.section in ("all", "speed"):
        sizes = [tuple(int(n) for n in s.split("x")) for s in a.sizes]
        run_speed(sizes, a.methods, a.device, a.threads, a.force)
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
