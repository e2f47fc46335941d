"""Seeded random draws on a device: seeds, generators, ranges, rotations, B0 directions, voxel sizes.

Every random number of the simulator comes from one ``torch.Generator`` created on the device that
holds the sample, so a sample is a pure function of ``(seed, device)``: the same seed gives
identical tensors, on any number of data-loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_U64 = 2 ** 64


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (e.g. ``(seed, stream, epoch, index)``).

    Uses numpy's ``SeedSequence`` hashing, so nearby keys give unrelated seeds; negative keys
    are allowed.
    """
    ss = np.random.SeedSequence([int(k) % _U64 for k in keys])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & (2 ** 63 - 1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed) & (2 ** 63 - 1))
    return g


def _device(g: torch.Generator) -> torch.device:
    return g.device


def uniform(g: torch.Generator, low: float, high: float, size: Sequence[int] | int = (),
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform draws in ``[low, high)`` on the generator's device."""
    size = (size,) if isinstance(size, int) else tuple(size)
    u = torch.rand(size, generator=g, device=_device(g), dtype=dtype)
    return low + (high - low) * u


def log_uniform(g: torch.Generator, low: float, high: float, size: Sequence[int] | int = (),
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log-uniform draws in ``[low, high)`` (both positive)."""
    return torch.exp(uniform(g, math.log(low), math.log(high), size, dtype))


def scalars(g: torch.Generator, n: int) -> list[float]:
    """``n`` uniform [0, 1) numbers as Python floats (one device-to-host copy).

    The per-sample decisions (counts, probabilities, ranges) are drawn in one go from the device
    generator, so that the sample stays a function of the seed on every device.
    """
    return torch.rand(n, generator=g, device=_device(g), dtype=torch.float64).cpu().tolist()


def lerp(u: float, r: Sequence[float]) -> float:
    """Map ``u`` in [0, 1) to the range ``r = (low, high)``."""
    return float(r[0]) + (float(r[1]) - float(r[0])) * u


def log_lerp(u: float, r: Sequence[float]) -> float:
    """Map ``u`` in [0, 1) log-uniformly to the positive range ``r``."""
    return math.exp(lerp(u, (math.log(float(r[0])), math.log(float(r[1])))))


def int_in(u: float, r: Sequence[int]) -> int:
    """Map ``u`` in [0, 1) to an integer uniform in the inclusive range ``r``."""
    lo, hi = int(r[0]), int(r[1])
    return min(hi, lo + int(u * (hi - lo + 1)))


def random_rotations(g: torch.Generator, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` rotation matrices ``(n, 3, 3)`` uniform on SO(3) (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=g, device=_device(g), dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(1)
    r = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=1).reshape(n, 3, 3)
    return r.to(dtype)


def cap_direction(u_cos: float, u_phi: float, max_tilt_deg: float) -> tuple[float, float, float]:
    """Unit vector uniform on the spherical cap within ``max_tilt_deg`` of +z.

    ``cos(theta)`` is uniform in ``[cos(max_tilt), 1]`` (equal-area), ``phi`` uniform in
    ``[0, 2 pi)``; ``u_cos`` and ``u_phi`` are uniform [0, 1) numbers.
    """
    cmin = math.cos(math.radians(max_tilt_deg))
    c = 1.0 - u_cos * (1.0 - cmin)
    s = math.sqrt(max(0.0, 1.0 - c * c))
    phi = 2.0 * math.pi * u_phi
    return (s * math.cos(phi), s * math.sin(phi), c)


def sample_voxel_size(u: Sequence[float], r: Sequence[float], isotropic_prob: float,
                      inplane_iso_prob: float) -> tuple[float, float, float]:
    """Voxel size (mm) from 5 uniform numbers: per-axis uniform in ``r``, sometimes tied.

    ``u[0]`` picks isotropic / in-plane isotropic / fully anisotropic; ``u[1:4]`` the sizes.
    """
    v = [lerp(u[1], r), lerp(u[2], r), lerp(u[3], r)]
    if u[0] < isotropic_prob:
        v = [v[0]] * 3
    elif u[0] < isotropic_prob + (1.0 - isotropic_prob) * inplane_iso_prob:
        v[1] = v[0]
    return (v[0], v[1], v[2])


def grid_axes(shape: Sequence[int], voxel_size_mm: Sequence[float], device: torch.device | str,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voxel-centre coordinates (mm) along each array axis, centred on the middle of the patch.

    Returns three 1-D tensors; voxel ``i`` of an axis of ``n`` voxels of size ``d`` sits at
    ``(i - (n - 1) / 2) * d``.
    """
    return tuple(  # type: ignore[return-value]
        (torch.arange(int(n), device=device, dtype=dtype) - (int(n) - 1) / 2.0) * float(d)
        for n, d in zip(shape, voxel_size_mm)
    )
