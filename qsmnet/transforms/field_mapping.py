"""Field mapping: wrapped multi-echo phase -> total field, ppm (QSM-CI ``field-mapping`` stage).

:class:`FieldMapping` chains

1. the mask: the user's, or :class:`qsmnet.transforms.masking.BrainMask` from the magnitude;
2. phase-offset removal (MCPC-3D-S single coil,
   :func:`qsmnet.transforms.phase_offsets.mcpc3ds_phase_offset`; skipped for one echo);
3. spatial Laplacian unwrapping of the reference echo with integer-2pi correction
   (:func:`qsmnet.transforms.unwrap.unwrap_laplacian`), its global 2pi multiple matched to the
   offset-free phase evolution measured between the first two echoes, so all echoes agree;
4. temporal unwrapping of the other echoes (:func:`qsmnet.transforms.temporal_unwrapping.temporal_unwrap`);
5. the weighted least-squares fit through the origin and the conversion to ppm
   (:func:`qsmnet.transforms.echo_fit.fit_field_wls`).

Outputs are in ppm (``docs/conventions.md``); the total field is zero outside the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qsmnet.physics.units import wrap_phase
from qsmnet.transforms._echoes import check_te_s, echo_te
from qsmnet.transforms._grid import as_float, mask_bbox
from qsmnet.transforms.base import OptionalKeysTransform
from qsmnet.transforms.echo_fit import estimate_noise_std, fit_field_wls
from qsmnet.transforms.masking import BrainMask
from qsmnet.transforms.phase_offsets import mcpc3ds_phase_offset, remove_phase_offset
from qsmnet.transforms.temporal_unwrapping import temporal_unwrap
from qsmnet.transforms.unwrap import unwrap_laplacian

__all__ = ["FieldMapping"]


class FieldMapping(OptionalKeysTransform):
    """Wrapped multi-echo phase and magnitude -> total field (ppm), mask and field noise (ppm).

    Parameters
    ----------
    offset_sigma_mm : float
        Gaussian smoothing (mm) of the MCPC-3D-S phase offset on the unit circle.
    offset_echoes : (i, j)
        Echo pair for the offset estimate (default the first two).
    offset_poly_order : int
        Order of the robust polynomial trend removed from the offset before smoothing.
    ref_index : int
        Echo that is unwrapped spatially (default the first).
    progressive : bool
        Temporal unwrapping predicts each echo from the running fit (True) or from the
        reference echo alone.
    weighting : {"magnitude2", "magnitude", "uniform"}
        Fit weights (inverse phase variance ``magnitude^2`` by default).
    phase_sign : {+1, -1}
        Vendor phase polarity (+1: phase grows with positive field).
    noise_std : float, optional
        Complex noise standard deviation (magnitude units); estimated when None.
    unwrap_max_iter : int
        Conjugate-gradient iterations of the masked Laplacian solves.
    mask_transform : BrainMask, optional
        Builds the mask when none is given (default ``BrainMask()``).

    Call
    ----
    ``FieldMapping()(phase_rad, magnitude, te_s, b0_t, mask=None, voxel_size_mm=(1, 1, 1))``
    with ``phase_rad``, ``magnitude`` ``(..., E, X, Y, Z)`` (wrapped phase in rad, any range),
    ``te_s`` ``(E,)`` or ``(B, E)`` in seconds, ``b0_t`` in tesla, returns
    ``(field_ppm, mask, field_noise_ppm)``: total field (..., X, Y, Z) in ppm, zero outside the
    mask; the bool mask used; the propagated field standard deviation in ppm (zero outside
    the mask, where no field is estimated).
    Sample dict: ``phase, magnitude, te_s, b0_t, mask (optional), voxel_size_mm`` ->
    ``total_field_ppm, mask, field_noise_ppm``.

    Notes
    -----
    The absolute level of the total field is ambiguous by multiples of
    ``1 / (GAMMA_BAR B0 dTE)`` (a global 2pi per echo spacing); it is fixed by taking the mean
    inter-echo phase inside the mask in [-pi, pi). Background-field removal discards the level.

    Voxels where the true phase of the reference echo jumps by more than pi between neighbours
    (steep fields next to air at 1 mm) cannot be unwrapped spatially and may be off by
    ``1 / (GAMMA_BAR B0 TE_ref)`` ppm; on the qsm-forward head phantom they are a tiny
    fraction of the brain mask, at its surface (``scripts/bench_field_mapping.py``; figures and
    per-step costs in the 'Unreliable phase and field mapping' section of docs/benchmarks.md).
    Everything runs on the mask's bounding box.
    """

    input_keys = {"phase_rad": "phase", "magnitude": "magnitude", "te_s": "te_s",
                  "b0_t": "b0_t", "voxel_size_mm": "voxel_size_mm"}
    optional_input_keys = {"mask": "mask"}
    output_keys = ("total_field_ppm", "mask", "field_noise_ppm")

    def __init__(self, offset_sigma_mm: float = 4.0, offset_echoes: Sequence[int] = (0, 1),
                 offset_poly_order: int = 3, ref_index: int = 0, progressive: bool = True,
                 weighting: str = "magnitude2", phase_sign: int = 1,
                 noise_std: float | None = None, unwrap_max_iter: int = 10,
                 mask_transform: BrainMask | None = None) -> None:
        if phase_sign not in (1, -1):
            raise ValueError(f"phase_sign must be +1 or -1, got {phase_sign}")
        if offset_sigma_mm < 0:
            raise ValueError(f"offset_sigma_mm must be >= 0, got {offset_sigma_mm}")
        self.offset_sigma_mm = float(offset_sigma_mm)
        self.offset_echoes = tuple(int(e) for e in offset_echoes)
        if offset_poly_order < 0:
            raise ValueError(f"offset_poly_order must be >= 0, got {offset_poly_order}")
        self.offset_poly_order = int(offset_poly_order)
        self.ref_index = int(ref_index)
        self.progressive = bool(progressive)
        self.weighting = weighting
        self.phase_sign = int(phase_sign)
        self.noise_std = noise_std
        self.unwrap_max_iter = int(unwrap_max_iter)
        self.mask_transform = mask_transform if mask_transform is not None else BrainMask()

    def __call__(self, phase_rad: torch.Tensor, magnitude: torch.Tensor | None, te_s, b0_t,
                 mask: torch.Tensor | None = None,
                 voxel_size_mm: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0)
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        phase_rad = as_float(torch.as_tensor(phase_rad))
        if phase_rad.ndim < 4:
            raise ValueError(f"phase_rad must be (..., E, X, Y, Z), got {tuple(phase_rad.shape)}")
        n_echo = phase_rad.shape[-4]
        te = check_te_s(te_s, n_echo)
        if not 0 <= self.ref_index < n_echo:
            raise ValueError(f"ref_index {self.ref_index} out of range for {n_echo} echoes")
        if magnitude is not None:
            magnitude = as_float(torch.as_tensor(magnitude)).to(phase_rad.device, phase_rad.dtype)
            if magnitude.shape != phase_rad.shape:
                raise ValueError(f"magnitude shape {tuple(magnitude.shape)} does not match "
                                 f"phase {tuple(phase_rad.shape)}")
        if mask is None:
            if magnitude is None:
                raise ValueError("FieldMapping needs a mask or a magnitude to build one")
            mask = self.mask_transform(magnitude, None, voxel_size_mm)
        mask = torch.as_tensor(mask).to(device=phase_rad.device, dtype=torch.bool)
        if mask.shape[-3:] != phase_rad.shape[-3:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match phase "
                             f"{tuple(phase_rad.shape)}")
        mask = mask.expand(phase_rad.shape[:-4] + phase_rad.shape[-3:]) \
            if mask.shape != phase_rad.shape[:-4] + phase_rad.shape[-3:] else mask
        field_ppm = torch.zeros(mask.shape, dtype=phase_rad.dtype, device=phase_rad.device)
        noise_ppm = torch.zeros_like(field_ppm)
        if not bool(mask.any()):
            return field_ppm, mask, noise_ppm
        noise_std = self.noise_std
        if noise_std is None and n_echo == 1 and magnitude is not None:
            # One echo: the noise comes from the background, which the crop below drops.
            sigma = estimate_noise_std(magnitude, None, mask)
            if bool(torch.all(torch.isfinite(sigma))):
                noise_std = sigma
        # Everything below runs on the mask's bounding box (outputs are zero outside the mask).
        # (an empty mask returned above; its box would be the whole grid)
        box = mask_bbox(mask) or tuple(slice(0, n) for n in mask.shape[-3:])
        sl3 = (Ellipsis, *box)
        sl4 = (Ellipsis, slice(None), *box)
        f_c, n_c = self._field(phase_rad[sl4], None if magnitude is None else magnitude[sl4],
                               te, b0_t, mask[sl3], voxel_size_mm, noise_std)
        m_c = mask[sl3]
        field_ppm[sl3] = torch.where(m_c, f_c, torch.zeros_like(f_c))
        noise_ppm[sl3] = torch.where(m_c, n_c, torch.zeros_like(n_c))
        return field_ppm, mask, noise_ppm

    def _field(self, phase_rad, magnitude, te, b0_t, mask, voxel_size_mm, noise_std):
        """The chain on (cropped) tensors: (field_ppm, field_noise_ppm), not masked."""
        n_echo = phase_rad.shape[-4]
        single = phase_rad[..., 0, :, :, :]
        if n_echo >= 2:
            offset, evolution = mcpc3ds_phase_offset(
                phase_rad, magnitude, te, mask, voxel_size_mm, self.offset_sigma_mm,
                self.offset_echoes, self.unwrap_max_iter, self.offset_poly_order)
            phase = remove_phase_offset(phase_rad, offset)
            i = self.offset_echoes[0]
            # Field phase at the reference TE implied by the inter-echo evolution: fixes the
            # reference echo's global 2pi multiple consistently with the other echoes.
            reference = evolution * (echo_te(te, self.ref_index, single)
                                     / echo_te(te, i, single))
        else:
            phase = wrap_phase(phase_rad)
            reference = 0.0
        ref_u = unwrap_laplacian(phase[..., self.ref_index, :, :, :], mask, voxel_size_mm,
                                 reference_rad=reference, max_iter=self.unwrap_max_iter)
        if n_echo >= 2:
            unwrapped = temporal_unwrap(phase, te, ref_u, self.ref_index, magnitude,
                                        self.progressive, self.weighting)
        else:
            unwrapped = ref_u.unsqueeze(-4)
        return fit_field_wls(unwrapped, te, b0_t, magnitude, mask, self.weighting,
                             self.phase_sign, noise_std)

    def __repr__(self) -> str:
        return (f"FieldMapping(offset_sigma_mm={self.offset_sigma_mm}, "
                f"ref_index={self.ref_index}, weighting={self.weighting!r}, "
                f"phase_sign={self.phase_sign})")
