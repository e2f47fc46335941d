"""Geometry: the B0 direction in array-axis coordinates and affines that encode it.

Convention (``docs/conventions.md``): arrays are indexed (x, y, z) as nibabel returns
them; the B0 direction is a unit vector in *array-axis* coordinates,
``b0 = inv(R) @ [0, 0, 1]`` where ``R`` is the affine's 3x3 with its columns normalised and
scanner z is B0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Vec3 = tuple[float, float, float]


def as_voxel_size_mm(voxel_size_mm) -> Vec3:
    """``voxel_size_mm`` (any sequence, array or tensor of 3) as three positive finite floats.

    Raises
    ------
    ValueError
        Unless it holds exactly 3 finite values > 0.
    """
    if isinstance(voxel_size_mm, torch.Tensor):
        voxel_size_mm = voxel_size_mm.detach().cpu()
    vs = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be 3 positive finite values, got {voxel_size_mm!r}")
    return tuple(float(v) for v in vs)


def normalize_b0_dir(b0_dir: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Return ``b0_dir`` as a float64 unit 3-vector; raise ValueError if it is not a direction."""
    v = np.asarray(b0_dir.detach().cpu() if isinstance(b0_dir, torch.Tensor) else b0_dir,
                   dtype=np.float64).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ValueError(f"B0 direction must be 3 finite numbers, got {b0_dir!r}")
    n = np.linalg.norm(v)
    if n < 1e-8:
        raise ValueError(f"B0 direction must be non-zero, got {b0_dir!r}")
    return v / n


@dataclass(frozen=True)
class Geometry:
    """Where an acquisition's voxels sit relative to B0: voxel size and B0 direction.

    Built once where data enter (the readers, a sample dict) and passed down, so every stage
    sees the same validated tuples.

    Attributes
    ----------
    voxel_size_mm : (3,) tuple of float
        Voxel size along the array axes, mm (positive, finite).
    b0_dir : (3,) tuple of float
        Unit B0 direction in array-axis coordinates (``docs/conventions.md``).
    """

    voxel_size_mm: Vec3
    b0_dir: Vec3 = (0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "voxel_size_mm", as_voxel_size_mm(self.voxel_size_mm))
        object.__setattr__(self, "b0_dir",
                           tuple(float(v) for v in normalize_b0_dir(self.b0_dir)))

    @classmethod
    def of_sample(cls, sample: Mapping[str, Any]) -> Geometry:
        """The geometry of a sample dict (keys ``voxel_size_mm`` and ``b0_dir``)."""
        return cls(sample["voxel_size_mm"], sample["b0_dir"])


def b0_dir_from_affine(affine: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """B0 direction (unit vector, array axes) of a volume from its 4x4 (or 3x3) affine.

    Parameters
    ----------
    affine : (4, 4) or (3, 3) array
        NIfTI voxel-to-scanner affine. Voxel size is removed by normalising the columns.

    Returns
    -------
    (3,) float64 ndarray
        ``inv(R) @ [0, 0, 1]``, normalised. For an axial acquisition this is (0, 0, 1); a flipped
        array axis flips the sign of that component.
    """
    a = np.asarray(affine, dtype=np.float64)
    rot = a[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    if a.shape not in ((4, 4), (3, 3)) or np.any(norms < 1e-12) or not np.all(np.isfinite(rot)):
        raise ValueError("affine must be a finite 4x4 or 3x3 matrix with non-zero columns")
    r = rot / norms
    return normalize_b0_dir(np.linalg.solve(r, np.array([0.0, 0.0, 1.0])))


def rotation_between(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """The proper rotation (3x3, float64) that takes unit vector ``a`` to ``b`` (Rodrigues)."""
    a = normalize_b0_dir(a)
    b = normalize_b0_dir(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    if np.linalg.norm(v) < 1e-12:
        if c > 0:
            return np.eye(3)
        # Antiparallel: rotate by pi about any axis orthogonal to a.
        axis = np.cross(a, [1.0, 0.0, 0.0])
        if np.linalg.norm(axis) < 1e-6:
            axis = np.cross(a, [0.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def affine_from_b0_dir(b0_dir: Sequence[float], voxel_size_mm: Sequence[float],
                       shape: Sequence[int] | None = None) -> np.ndarray:
    """A 4x4 affine whose :func:`b0_dir_from_affine` is ``b0_dir``.

    The rotation part maps ``b0_dir`` (array axes) onto scanner z; columns are scaled by the
    voxel size. With ``shape`` the volume is centred on the scanner origin.
    """
    r = rotation_between(b0_dir, [0.0, 0.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = r @ np.diag(np.asarray(voxel_size_mm, dtype=np.float64))
    if shape is not None:
        centre = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
        affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def tilt_deg(b0_dir: Sequence[float]) -> float:
    """Angle in degrees between ``b0_dir`` and the array z axis."""
    v = normalize_b0_dir(b0_dir)
    return float(np.degrees(np.arccos(np.clip(abs(v[2]), 0.0, 1.0))))
