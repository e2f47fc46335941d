"""Training samples from the anatomical phantom, in the format of :class:`QSMSimulator`.

A sample of :class:`AnatomicalSource` has the keys, shapes, dtypes and conventions of a
dipole-stage sample of the random-shape simulator (see :mod:`qsmnet.simulation.simulator`), so
the two can be mixed in one training stream (``SimulatedQSMDataModule(anatomical_fraction=...)``)::

    chi_ppm          (1, X, Y, Z) float32  brain chi (ppm relative to CSF), zero outside the mask
    local_field_ppm  (1, X, Y, Z) float32  D * chi inside the mask, plus noise, masked
    mask             (1, X, Y, Z) float32  0/1, the phantom's brain in the patch
    voxel_size_mm    (3,)         float32
    b0_dir           (3,)         float32  unit, array axes
    noise_std_ppm    ()           float32  nominal field-noise std (0 for noise-free samples)
  with ``magnitude_prior=True``:
    magnitude_prior  (1, X, Y, Z) float32  ``M0 exp(-R2* mean(TE))`` of the phantom's tissue
                                           (its 3 T R2*, scaled linearly with B0), not masked

How a sample is made from its seed:

1. The simulator's per-sample draws (:class:`~qsmnet.simulation.simulator._SampleDraws`, from a
   generator seeded with ``seed``) give the voxel size and B0 direction (with the simulator's
   rules, the voxel-size range replaced by ``voxel_size_range_mm``: the atlas is 1 mm, and a
   full head at a fine voxel size is slow to make), the field strength, echo times, whether the
   sample is noisy and its SNR.
2. A subject of :func:`~qsmnet.simulation.anatomical_phantom.anatomical_phantom` (its own random
   rotation within ``max_rotation_deg``, size ``scale`` drawn in ``scale_range`` and per-axis
   ``shape_jitter``, tissue values, veins and lesions) on that voxel size, the whole head.
3. The patch: a window of ``shape`` voxels centred (as far as the head's grid allows) on a
   brain voxel picked at random, so every patch holds brain; grids smaller than the patch are
   zero-padded.
4. Physics as the simulator's: ``chi = clamp(chi_brain, cfg.chi_limits_ppm) * mask`` (chi of the
   brain only: the field of skull, air and the brain outside the patch is not part of the local
   field), ``local = forward_field(chi, voxel_size, b0, pad=cfg.pad) * mask + noise * mask``
   with ``noise ~ N(0, nominal_std^2)``, ``nominal_std = field_noise_std_ppm(snr, te, b0_t)``.

The atlas is read once per process (the phantom module caches it); data-loader workers each read
it on their first anatomical sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qsmnet.physics.forward import forward_field
from qsmnet.simulation.acquisition import field_noise_std_ppm
from qsmnet.simulation.config import SimulationConfig, make_config
from qsmnet.simulation.sampling import derive_seed, lerp, make_generator, scalars
from qsmnet.simulation.simulator import (
    QSMSimulator,
    Shape3,
    _SampleDraws,
    _shape3,
    magnitude_image,
)

#: derive_seed key of the phantom subject's numpy seed (the sample's draws use the seed itself)
_PHANTOM_KEY = 0x414E4154  # "ANAT"


def patch_window(brain: np.ndarray, shape: Sequence[int], u: Sequence[float]
                 ) -> tuple[tuple[slice, ...], np.ndarray]:
    """The patch window around a brain voxel chosen by ``u[0]`` in [0, 1).

    Parameters
    ----------
    brain : (X, Y, Z) bool, at least one True voxel.
    shape : (3,) patch size in voxels.
    u : one uniform number (picks the centre voxel among the brain voxels, in C order).

    Returns
    -------
    (slices, pad) : the window in ``brain``'s grid (each clipped to ``[0, n)``; as large as the
        patch where the grid is) and the zero padding ``(3, 2)`` (before, after) that makes the
        cropped array the patch size.
    """
    idx = np.flatnonzero(brain)
    if idx.size == 0:
        raise ValueError("the phantom has no brain voxel to centre the patch on")
    centre = np.unravel_index(idx[min(idx.size - 1, int(u[0] * idx.size))], brain.shape)
    slices, pad = [], np.zeros((3, 2), dtype=int)
    for ax, (c, p, n) in enumerate(zip(centre, shape, brain.shape)):
        if p >= n:
            slices.append(slice(0, n))
            pad[ax] = ((p - n) // 2, p - n - (p - n) // 2)
        else:
            start = int(min(max(int(c) - p // 2, 0), n - p))
            slices.append(slice(start, start + p))
    return tuple(slices), pad


class AnatomicalSource:
    """Anatomical-phantom training samples in the simulator's format (see the module docstring).

    Parameters
    ----------
    simulator : :class:`SimulationConfig`, a mapping of its fields, or None: the rules for the
        voxel size, B0 direction, noise and echo times (its ``voxel_size_range_mm`` is replaced
        by ``voxel_size_range_mm`` here), ``pad`` and ``chi_limits_ppm``. Dipole-stage only:
        ``with_total_field`` and ``acquisition`` must be off.
    voxel_size_range_mm : (low, high)
        Range of the drawn voxel sizes, mm (ignored when the config fixes ``voxel_size_mm``).
    scale_range : (low, high)
        Range of the head's size factor (1.0: the MNI152 brain), uniform.
    max_rotation_deg : float
        Each of the 3 rotation angles of the head is uniform in ``+-max_rotation_deg``.
    shape_jitter : float
        Per-axis size factors ``scale * (1 + shape_jitter * U(-1, 1))``.
    veins, lesions : bool
        Paint the phantom's veins and lesions.
    """

    def __init__(self, simulator: SimulationConfig | Mapping[str, Any] | None = None, *,
                 voxel_size_range_mm: Sequence[float] = (1.2, 2.0),
                 scale_range: Sequence[float] = (0.85, 1.15), max_rotation_deg: float = 15.0,
                 shape_jitter: float = 0.05, veins: bool = True, lesions: bool = True) -> None:
        cfg = make_config(simulator,
                          voxel_size_range_mm=tuple(float(v) for v in voxel_size_range_mm))
        if cfg.with_total_field or cfg.acquisition:
            raise ValueError("anatomical samples are dipole-stage only: the simulator's "
                             "with_total_field and acquisition must be false with "
                             "data.anatomical_fraction > 0")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range!r}")
        self.config = cfg
        self.simulator = QSMSimulator(cfg)
        self.scale_range = (lo, hi)
        self.max_rotation_deg = float(max_rotation_deg)
        self.shape_jitter = float(shape_jitter)
        self.veins = bool(veins)
        self.lesions = bool(lesions)

    def __repr__(self) -> str:
        return (f"AnatomicalSource(scale_range={self.scale_range}, max_rotation_deg="
                f"{self.max_rotation_deg}, shape_jitter={self.shape_jitter}, veins={self.veins}, "
                f"lesions={self.lesions}, config={self.config!r})")

    def phantom(self, seed: int, voxel_size_mm: Sequence[float], u_scale: float):
        """The phantom subject of ``seed`` on ``voxel_size_mm`` (a ``HeadPhantom``)."""
        from qsmnet.simulation.anatomical_phantom import anatomical_phantom

        return anatomical_phantom(voxel_size_mm=tuple(voxel_size_mm),
                                  seed=derive_seed(int(seed), _PHANTOM_KEY),
                                  scale=lerp(u_scale, self.scale_range),
                                  max_rotation_deg=self.max_rotation_deg,
                                  shape_jitter=self.shape_jitter, veins=self.veins,
                                  lesions=self.lesions)

    def __call__(self, shape: Shape3, seed: int, *, device: torch.device | str = "cpu",
                 return_info: bool = False,
                 magnitude_prior: bool = False) -> dict[str, torch.Tensor] | tuple[dict, dict]:
        """One sample of ``shape`` voxels from ``seed`` (simulated on the CPU, returned on
        ``device``); with ``return_info`` also a dict with the phantom and the draws; with
        ``magnitude_prior`` also the ``magnitude_prior`` image (no random draw: the other keys
        are the same)."""
        cfg = self.config
        shape = _shape3(shape)
        g = make_generator(seed, "cpu")
        draws = _SampleDraws.take(g)
        vs, b0 = self.simulator.draw_geometry(draws.geometry)
        b0_t, te, noisy, snr = self.simulator._echo_train(draws)
        u = scalars(g, 2)
        head = self.phantom(seed, vs, u[0])
        brain = np.asarray(head.brain_mask, dtype=bool)
        window, pad = patch_window(brain, shape, u[1:])
        chi_np = np.where(brain, head.chi_ppm, 0.0)[window]
        chi_np = np.clip(chi_np, float(cfg.chi_limits_ppm[0]), float(cfg.chi_limits_ppm[1]))
        mask_np = brain[window]
        chi_np, mask_np = np.pad(chi_np, pad), np.pad(mask_np, pad)

        maskf = torch.from_numpy(mask_np.astype(np.float32))
        chi = torch.from_numpy(chi_np.astype(np.float32)) * maskf
        local_clean = forward_field(chi, vs, b0, pad=cfg.pad) * maskf
        nominal_std = field_noise_std_ppm(snr, te, b0_t) if noisy else 0.0
        noise = torch.randn(shape, generator=g).mul_(nominal_std).mul_(maskf)
        local = local_clean + noise
        dev = torch.device(device)
        sample = {
            "chi_ppm": chi.unsqueeze(0).to(dev),
            "local_field_ppm": local.unsqueeze(0).to(dev),
            "mask": maskf.unsqueeze(0).to(dev),
            "voxel_size_mm": torch.tensor(vs, dtype=torch.float32, device=dev),
            "b0_dir": torch.tensor(b0, dtype=torch.float32, device=dev),
            "noise_std_ppm": torch.tensor(nominal_std, dtype=torch.float32, device=dev),
        }
        if magnitude_prior:
            m0 = torch.from_numpy(np.pad(np.asarray(head.m0, dtype=np.float32)[window], pad))
            r2s = torch.from_numpy(np.pad(np.asarray(head.r2star_hz, dtype=np.float32)[window],
                                          pad)) * (float(b0_t) / 3.0)
            sample["magnitude_prior"] = magnitude_image(m0, r2s, te).unsqueeze(0).to(dev)
        if not return_info:
            return sample
        info = {"phantom": head, "window": window, "pad": pad, "voxel_size_mm": vs,
                "b0_dir": b0, "b0_t": b0_t, "te_s": te, "snr": snr,
                "noise_std_ppm": nominal_std, "local_field_clean_ppm": local_clean}
        return sample, info
