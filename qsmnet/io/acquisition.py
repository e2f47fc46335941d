"""The in-memory form of one multi-echo GRE acquisition, whatever file layout it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qsmnet.physics.geometry import Geometry

__all__ = ["Acquisition", "geometry_sample"]


@dataclass(eq=False)
class Acquisition:
    """One multi-echo gradient-echo acquisition, validated and in qsmnet units.

    Attributes
    ----------
    phase : (E, X, Y, Z) float32 ndarray
        Wrapped phase in radians, echo axis first (NIfTI files store echoes last), as read from
        the file after integer rescaling; ``phase_sign`` is *not* applied here.
    magnitude : (E, X, Y, Z) float32 ndarray or None
        Magnitude, arbitrary units.
    mask : (X, Y, Z) bool ndarray or None
        Brain mask when one was given.
    te_s : tuple of float
        Echo times, s, strictly increasing, one per echo.
    b0_t : float
        Field strength, T.
    b0_dir : (3,) float64 ndarray
        Unit B0 direction in array-axis coordinates.
    voxel_size_mm : (3,) float64 ndarray
        Voxel size, mm.
    affine : (4, 4) float64 ndarray
        Voxel-to-scanner affine of the phase (outputs are written with it).
    header : nibabel header
        Header of the first phase echo (outputs keep its orientation codes and units).
    source : str
        What it was read from (a folder or file), for messages and provenance records.
    name : str
        Acquisition name used for outputs, e.g. ``"sub-01"`` or ``"sub-01_acq-x"``.
    phase_sign : int
        +1 when phase grows with positive field (qsmnet's convention), -1 for the opposite vendor
        polarity.
    entities : dict of str to str
        BIDS entities (``{"sub": "01", "acq": "x"}``); empty for non-BIDS inputs.
    """

    phase: np.ndarray
    magnitude: np.ndarray | None
    mask: np.ndarray | None
    te_s: tuple[float, ...]
    b0_t: float
    b0_dir: np.ndarray
    voxel_size_mm: np.ndarray
    affine: np.ndarray
    header: Any
    source: str
    name: str
    phase_sign: int = 1
    entities: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Internal consistency only: the readers have already checked the user's files and
        # phrased their errors; a failure here is a programming error, hence plain ValueError.
        if self.phase.ndim != 4:
            raise ValueError(f"phase must be (E, X, Y, Z), got shape {self.phase.shape}")
        if len(self.te_s) != self.phase.shape[0]:
            raise ValueError(f"{len(self.te_s)} echo times for {self.phase.shape[0]} echoes")
        if self.magnitude is not None and self.magnitude.shape != self.phase.shape:
            raise ValueError(f"magnitude shape {self.magnitude.shape} != phase {self.phase.shape}")
        if self.mask is not None and self.mask.shape != self.phase.shape[1:]:
            raise ValueError(f"mask shape {self.mask.shape} != volume {self.phase.shape[1:]}")
        if self.phase_sign not in (1, -1):
            raise ValueError(f"phase_sign must be +1 or -1, got {self.phase_sign!r}")
        self.te_s = tuple(float(t) for t in self.te_s)
        self.b0_t = float(self.b0_t)
        self.b0_dir = np.asarray(self.b0_dir, dtype=np.float64).reshape(3)
        self.voxel_size_mm = np.asarray(self.voxel_size_mm, dtype=np.float64).reshape(3)
        self.affine = np.asarray(self.affine, dtype=np.float64).reshape(4, 4)
        self.geometry  # noqa: B018 - validates voxel size and B0 direction

    @property
    def geometry(self) -> Geometry:
        """Voxel size and B0 direction as a validated :class:`~qsmnet.physics.geometry.Geometry`."""
        return Geometry(self.voxel_size_mm, self.b0_dir)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(n) for n in self.phase.shape[1:])

    @property
    def n_echoes(self) -> int:
        """Number of echoes E."""
        return int(self.phase.shape[0])

    def to_sample(self, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The acquisition as a sample dict (keys of :mod:`qsmnet.transforms.base`).

        ``phase`` is multiplied by ``phase_sign`` so that the sample follows qsmnet's polarity
        (phase grows with positive field) and no consumer has to know the vendor. Negating a phase
        wrapped to [-pi, pi) gives (-pi, pi], which is the same set of angles.

        Returns
        -------
        dict
            ``phase`` (E, X, Y, Z) rad, ``magnitude`` (E, X, Y, Z) (only when present),
            ``mask`` (X, Y, Z) bool (only when present), ``te_s`` (E,) s, ``voxel_size_mm`` (3,),
            ``b0_dir`` (3,) as tensors of ``dtype`` on ``device``; ``b0_t`` as a Python float (T);
            ``affine`` (4, 4) float64 numpy array (for writing outputs).
        """
        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        sample: dict[str, Any] = {
            "phase": tensor(self.phase) * self.phase_sign,
            "te_s": tensor(np.asarray(self.te_s, dtype=np.float64)),
            "b0_t": self.b0_t,
            "b0_dir": tensor(self.b0_dir),
            "voxel_size_mm": tensor(self.voxel_size_mm),
            "affine": self.affine.copy(),
        }
        if self.magnitude is not None:
            sample["magnitude"] = tensor(self.magnitude)
        if self.mask is not None:
            sample["mask"] = torch.as_tensor(np.ascontiguousarray(self.mask),
                                             dtype=torch.bool).to(device)
        return sample

    def __repr__(self) -> str:
        return (f"Acquisition(name={self.name!r}, shape={self.shape}, echoes={self.n_echoes}, "
                f"te_s={self.te_s}, b0_t={self.b0_t:g}, "
                f"b0_dir={np.round(self.b0_dir, 4).tolist()}, "
                f"voxel_size_mm={self.voxel_size_mm.tolist()}, mask={self.mask is not None}, "
                f"magnitude={self.magnitude is not None}, phase_sign={self.phase_sign:+d}, "
                f"source={self.source!r})")


def geometry_sample(mask, voxel_size_mm, b0_dir, affine, b0_t: float | None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                    ) -> dict[str, Any]:
    """The keys every sample dict of an input carries: ``mask`` (bool), ``voxel_size_mm`` and
    ``b0_dir`` ((3,) tensors of ``dtype``), ``affine`` ((4, 4) numpy copy) and ``b0_t`` (T,
    when known)."""
    def tensor(a) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    sample: dict[str, Any] = {
        "mask": torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.bool).to(device),
        "voxel_size_mm": tensor(voxel_size_mm),
        "b0_dir": tensor(b0_dir),
        "affine": np.array(affine, copy=True),
    }
    if b0_t is not None:
        sample["b0_t"] = float(b0_t)
    return sample
