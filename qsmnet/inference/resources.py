"""Will a reconstruction fit in memory? An estimate made before it starts, so that a volume too
large is refused with the figures instead of being killed by the kernel's OOM killer with no
message.

The estimate is linear in the grid's voxels: a fixed part (Python, torch, the model) plus a
number of bytes per voxel for the chain from phase (float32 phase and magnitude of every echo,
complex intermediates of unwrapping, FFT buffers of background removal and of the inversion on
the padded grid). Its coefficients are checked against the measured peak memory of
``scripts/benchmark.py speed`` (see the speed section of ``docs/benchmarks.md``); they bound the
measured peaks from above.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from qsmnet.io.errors import QSMInputError

__all__ = ["available_memory_bytes", "check_memory", "estimate_peak_bytes",
           "reset_peak_resident_memory", "status_kib"]

#: Fixed part of a ``predict`` process: interpreter, torch, the model, the inputs' headers.
BASE_BYTES = 600 * 2**20
#: Bytes per grid voxel of the chain from phase, independent of the echoes.
BYTES_PER_VOXEL = 340
#: Bytes per grid voxel and echo (phase, magnitude, their complex and unwrapped copies).
BYTES_PER_VOXEL_ECHO = 40


def estimate_peak_bytes(shape: Sequence[int], n_echoes: int = 1) -> int:
    """Estimated peak resident memory (bytes) of reconstructing a ``shape`` grid from
    ``n_echoes`` echoes of phase on the CPU, with any built-in method."""
    voxels = math.prod(int(s) for s in shape[-3:])
    return int(BASE_BYTES + voxels * (BYTES_PER_VOXEL + BYTES_PER_VOXEL_ECHO * int(n_echoes)))


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``"VmRSS"``, ``"VmHWM"``, ...); 0 where it cannot
    be read (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_resident_memory() -> bool:
    """Restart the kernel's peak-resident-set mark (VmHWM, what ``getrusage().ru_maxrss``
    reports) from the current resident size, so that a peak read afterwards is that of what
    follows, not of what came before (building or loading its inputs). Returns False where
    the mark cannot be reset (not Linux, or ``/proc`` read-only)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int | None:
    """Memory this process can still take: the kernel's ``MemAvailable``, lowered to what is
    left under a cgroup (container, SLURM job) limit; None where neither can be read."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    cgroup = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):  # cgroup v1
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        # v1 reports "no limit" as a huge number
        if limit is not None and usage is not None and limit < 2**60:
            limits.append(max(limit - usage, 0))
    if not limits and hasattr(os, "sysconf"):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(limits) if limits else None


def check_memory(shape: Sequence[int], n_echoes: int, method: str, device: torch.device,
                 source: str, available: int | None = None) -> None:
    """Refuse a reconstruction whose estimated peak exceeds the memory available.

    Only the CPU is checked: on a GPU the volumes live in device memory, which CUDA reports by
    its own out-of-memory error.

    Raises
    ------
    QSMInputError
        Naming the acquisition, the estimate, the memory available and ``--skip-memory-check``.
    """
    if torch.device(device).type != "cpu":
        return
    need = estimate_peak_bytes(shape, n_echoes)
    have = available_memory_bytes() if available is None else available
    if have is not None and need > have:
        grid = "x".join(str(int(s)) for s in shape[-3:])
        raise QSMInputError(
            f"{source}: reconstructing {grid} x {n_echoes} echo(es) with --method {method} needs "
            f"about {need / 2**30:.1f} GiB of memory and {have / 2**30:.1f} GiB are available; "
            "crop the volume to the head, free memory, or pass --skip-memory-check to try anyway")
