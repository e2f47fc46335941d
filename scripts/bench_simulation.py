#!/usr/bin/env python
"""Benchmark the training-data simulator against the training step it has to feed.

For each patch size and device: samples per second of the dipole-stage sample (chi, local field,
mask) and of the whole-acquisition sample (multi-echo magnitude and wrapped phase, total field),
and training steps per second of a small 3-D U-Net (base 16, depth 3; forward + backward + Adam,
batch 2) at the same patch size. The ratio ``sim samples/s / (batch * train steps/s)`` says how
many times faster than the network consumes them one process simulates samples; the target is 5.

    python scripts/bench_simulation.py                       # 64^3 and 128^3, CPU (+ CUDA)
    python scripts/bench_simulation.py --sizes 64 --repeats 3 --threads 1 --out bench.json

Times are medians of ``--repeats`` runs after one warm-up. On a shared machine, also look at the
CPU-time column (process time): wall time includes waiting for other processes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from qsmnet.simulation import QSMSimulator


def _unet(device: torch.device) -> tuple[nn.Module, str]:
    """qsmnet's U-Net (base 16, depth 3) if available, else a minimal stand-in."""
    try:
        from qsmnet.models.unet import UNet3D
        return UNet3D(1, 1, features=(16, 32, 64)).to(device), "qsmnet.models.unet.UNet3D(16,32,64)"
    except ImportError:
        pass

    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.InstanceNorm3d(o, affine=True),
                             nn.LeakyReLU(0.1), nn.Conv3d(o, o, 3, padding=1),
                             nn.InstanceNorm3d(o, affine=True), nn.LeakyReLU(0.1))

    class StandIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.e2, self.e3 = block(1, 16), block(16, 32), block(32, 64)
            self.u2, self.d2 = nn.ConvTranspose3d(64, 32, 2, stride=2), block(64, 32)
            self.u1, self.d1 = nn.ConvTranspose3d(32, 16, 2, stride=2), block(32, 16)
            self.out = nn.Conv3d(16, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.e1(x)
            b = self.e2(nn.functional.max_pool3d(a, 2))
            c = self.e3(nn.functional.max_pool3d(b, 2))
            b = self.d2(torch.cat([self.u2(c), b], 1))
            return self.out(self.d1(torch.cat([self.u1(b), a], 1)))

    return StandIn().to(device), "stand-in U-Net (16,32,64)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[int], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall and process time (s) of ``fn(i)`` over ``repeats`` calls after a warm-up."""
    fn(-1)
    _sync(device)
    walls, cpus = [], []
    for i in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn(i)
        _sync(device)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def bench(sizes: list[int], devices: list[torch.device], repeats: int, batch: int,
          background_supersample: int | None = None) -> list[dict]:
    acq = {"acquisition": True, "with_total_field": True}
    if background_supersample is not None:
        acq["background_supersample"] = background_supersample
    rows = []
    for device in devices:
        net, net_name = _unet(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        for n in sizes:
            row: dict = {"device": str(device), "patch": n, "batch": batch, "net": net_name,
                         "background_supersample": QSMSimulator(**acq).config.background_supersample}
            for label, sim in (("dipole", QSMSimulator()),
                               ("acquisition", QSMSimulator(**acq))):
                wall, cpu = _time(lambda i, sim=sim: sim(n, seed=1000 + i, device=device),
                                  repeats, device)
                row[f"{label}_s"] = wall
                row[f"{label}_cpu_s"] = cpu
                row[f"{label}_per_s"] = 1.0 / wall
            x = torch.randn(batch, 1, n, n, n, device=device)

            def step(_i: int) -> None:
                opt.zero_grad(set_to_none=True)
                loss = net(x).square().mean()
                loss.backward()
                opt.step()

            wall, cpu = _time(step, max(1, min(repeats, 3)), device)
            row["train_step_s"] = wall
            row["train_step_cpu_s"] = cpu
            row["train_steps_per_s"] = 1.0 / wall
            consumed = batch / wall  # samples per second the training step eats
            row["ratio_dipole"] = row["dipole_per_s"] / consumed
            row["ratio_acquisition"] = row["acquisition_per_s"] / consumed
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


HEADER = (f"{'device':<8}{'patch':>6}{'dipole/s':>10}{'(cpu s)':>9}{'acq/s':>9}{'(cpu s)':>9}"
          f"{'step s':>9}{'(cpu s)':>9}{'x dipole':>10}{'x acq':>8}")


def _format_row(r: dict) -> str:
    return (f"{r['device']:<8}{r['patch']:>6}{r['dipole_per_s']:>10.2f}{r['dipole_cpu_s']:>9.3f}"
            f"{r['acquisition_per_s']:>9.2f}{r['acquisition_cpu_s']:>9.3f}{r['train_step_s']:>9.3f}"
            f"{r['train_step_cpu_s']:>9.3f}{r['ratio_dipole']:>10.1f}{r['ratio_acquisition']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="patch sizes (voxels per side)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--batch", type=int, default=2, help="training batch size")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                   help="'all': CPU, and CUDA when available")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--background-supersample", type=int, default=None,
                   help="sub-voxels per axis for the acquisition sample's background field "
                        "(default: the simulator's, 2)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_simulation: error: CUDA is not available", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"x = simulated samples per second / samples per second a training step consumes")
    print(HEADER)
    rows = bench(args.sizes, devices, args.repeats, args.batch, args.background_supersample)
    if args.out:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "python": platform.python_version(), "machine": platform.machine(),
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
