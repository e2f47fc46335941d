"""Network input channels built from the local field and the acquisition geometry.

The ``magnitude`` channel is a prior image, not computed from the field: the magnitude (or any
structural image) the data pipeline provides as ``MAGNITUDE_KEY`` (``estimate_magnitude``) in the
batch, normalised per sample to mean 1 inside the mask (zero outside), so that its absolute
scale (coil, receiver gain) does not matter.

The kernel-aware first estimate is what lets one network handle any B0 direction and voxel size:
``l2`` (closed-form Tikhonov/gradient-regularised inversion) and ``tkd`` are computed with each
sample's **own** ``b0_dir`` and ``voxel_size_mm``, so the streaks and cone artefacts the network
has to remove are already expressed on the sample's grid, and the network only learns the
correction.

All channels are multiplied by one fixed ``scale`` (ppm -> network units) so that typical values
are O(1): local fields are a few 0.01 ppm and susceptibilities a few 0.1 ppm, so the default
``scale = 10`` brings both to roughly [-1, 1]. The scale is part of the model config and is
stored in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from qsmnet.transforms.inversion import (
    DEFAULT_INVERSION_PAD,
    DEFAULT_TV_LAMBDA_WEIGHTED,
    closed_form_l2,
    tkd,
    tv_brain_data,
)

CHANNELS = ("local_field", "tkd", "l2", "tv", "mask")
#: channels of prior images the data provides (not computed from the field), see the module doc
PRIOR_CHANNELS = ("magnitude",)
ESTIMATES = ("tkd", "l2", "tv")
#: the :func:`classical_estimate` keyword arguments each estimate depends on
ESTIMATE_PARAMS = {"tkd": ("tkd_threshold", "pad"), "l2": ("l2_alpha", "pad"),
                   "tv": ("tv_lam", "tv_iterations", "pad")}
#: key prefix of estimates precomputed by the data pipeline (``estimate_tv`` ...), see
#: :meth:`InputBuilder.forward`
PRECOMPUTED_PREFIX = "estimate_"
#: batch key of the magnitude prior of the ``magnitude`` channel (``provided["magnitude"]``)
MAGNITUDE_KEY = PRECOMPUTED_PREFIX + "magnitude"


def precomputed(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The estimates a batch carries (``estimate_tv`` -> ``"tv"``), as ``QSMNet.predict``'s
    ``provided``; None when it carries none."""
    out = {k[len(PRECOMPUTED_PREFIX):]: v for k, v in batch.items()
           if k.startswith(PRECOMPUTED_PREFIX)}
    return out or None


def normalized_magnitude(magnitude: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``magnitude * mask / mean(magnitude in the mask)`` per sample (``(B, 1, X, Y, Z)``).

    The mean is floored at 1e-12 so that an all-zero magnitude stays finite (zero).
    """
    m = magnitude * mask
    n = mask.sum(dim=(-3, -2, -1), keepdim=True).clamp_min(1.0)
    mean = m.sum(dim=(-3, -2, -1), keepdim=True) / n
    return m / mean.clamp_min(1e-12)


def magnitude_prior_from_echoes(magnitude: torch.Tensor) -> torch.Tensor:
    """The ``magnitude`` channel's image from a measured multi-echo magnitude.

    The geometric mean over echoes, ``exp(mean_e log |m_e|)``: for mono-exponential decay
    ``m_e = M0 exp(-R2* TE_e)`` it is exactly ``M0 exp(-R2* mean(TE))``, the image the training
    samples carry (:func:`qsmnet.simulation.simulator.magnitude_image`), whatever the echo
    times. Voxels with no signal (magnitude 0) are floored at 1e-6 of the largest value, so the
    result stays finite and is about 0 there.

    Parameters
    ----------
    magnitude : (E, X, Y, Z) tensor (any scale), or (X, Y, Z) for one echo.

    Returns
    -------
    (X, Y, Z) float32 tensor.
    """
    m = magnitude.to(torch.float32).abs()
    if m.dim() == 3:
        m = m[None]
    if m.dim() != 4:
        raise ValueError(f"magnitude must be (E, X, Y, Z) or (X, Y, Z), got {tuple(magnitude.shape)}")
    floor = (m.amax() * 1e-6).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.exp(torch.log(m.clamp_min(floor)).mean(dim=0))


def classical_estimate(name: str, field: torch.Tensor, mask: torch.Tensor, voxel_size_mm,
                       b0_dir, *, l2_alpha: float = 0.02, tkd_threshold: float = 0.15,
                       tv_lam: float = DEFAULT_TV_LAMBDA_WEIGHTED, tv_iterations: int = 100,
                       pad: str | int | None = DEFAULT_INVERSION_PAD) -> torch.Tensor:
    """One first estimate (ppm, referenced to the mask mean) with per-sample geometry.

    ``field``/``mask``: ``(B, 1, X, Y, Z)`` (or ``(X, Y, Z)``); geometry ``(3,)`` or ``(B, 3)``.
    ``tv`` is TV-ADMM with the data term on the mask only
    (:func:`~qsmnet.transforms.inversion.tv_brain_data`, ``tv_iterations`` iterations): far
    slower than ``tkd``/``l2`` (about 0.75 s per 48^3 sample on one CPU thread), so training precomputes it in the data workers
    (``SimulatedQSMDataModule(estimates=...)``) with this same function.
    """
    if name == "l2":
        return closed_form_l2(field, mask, voxel_size_mm, b0_dir, alpha=l2_alpha, pad=pad)
    if name == "tkd":
        return tkd(field, mask, voxel_size_mm, b0_dir, threshold=tkd_threshold, pad=pad)
    if name == "tv":
        return tv_brain_data(field, mask, voxel_size_mm, b0_dir, lam=tv_lam,
                             max_iter=int(tv_iterations), pad=pad)
    raise ValueError(f"unknown estimate {name!r}; choose from {ESTIMATES}")


def as_batch_geometry(v, batch: int, name: str, device, dtype=torch.float64) -> torch.Tensor:
    """``(3,)`` or ``(B, 3)`` -> ``(B, 3)`` tensor (the shared geometry layout)."""
    t = torch.as_tensor(v, dtype=dtype, device=device)
    if t.ndim == 1:
        t = t.reshape(1, 3).expand(batch, 3)
    if t.shape != (batch, 3):
        raise ValueError(f"{name} must be (3,) or ({batch}, 3), got {tuple(t.shape)}")
    return t


class InputBuilder(nn.Module):
    """Builds ``(B, C, X, Y, Z)`` network input from field, mask and geometry.

    Parameters
    ----------
    channels : sequence of {"local_field", "tkd", "l2", "tv", "mask", "magnitude"}
        Channel order of the network input. ``l2`` and ``tkd`` use the sample's own B0 direction
        and voxel size. ``magnitude`` is ``provided["magnitude"]`` normalised per sample
        (:func:`normalized_magnitude`), not multiplied by ``scale``.
    scale : float
        Fixed multiplier ppm -> network units for the field and chi channels.
    l2_alpha : float
        Regularisation weight (mm^2) of the closed-form L2 estimate.
    tkd_threshold : float
        Truncation threshold of the TKD estimate.
    pad : int | "auto" | None
        Zero padding (voxels per side around the mask's bounding box) of the k-space solvers,
        see :func:`qsmnet.transforms.inversion.tkd`; default that module's default.
    """

    def __init__(self, channels: Sequence[str] = ("local_field", "l2", "mask"), scale: float = 10.0,
                 l2_alpha: float = 0.02, tkd_threshold: float = 0.15,
                 pad: str | int | None = DEFAULT_INVERSION_PAD,
                 tv_lam: float = DEFAULT_TV_LAMBDA_WEIGHTED, tv_iterations: int = 100) -> None:
        super().__init__()
        channels = tuple(str(c) for c in channels)
        unknown = [c for c in channels if c not in CHANNELS + PRIOR_CHANNELS]
        if unknown or not channels:
            raise ValueError(f"unknown input channels {unknown}; choose from "
                             f"{CHANNELS + PRIOR_CHANNELS}")
        if len(set(channels)) != len(channels):
            raise ValueError(f"duplicate input channels in {channels}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.channels = channels
        self.scale = float(scale)
        self.l2_alpha = float(l2_alpha)
        self.tkd_threshold = float(tkd_threshold)
        self.pad = pad
        self.tv_lam = float(tv_lam)
        self.tv_iterations = int(tv_iterations)

    @property
    def estimate_params(self) -> dict:
        """Keyword arguments of :func:`classical_estimate` (also what data pipelines must use)."""
        return {"l2_alpha": self.l2_alpha, "tkd_threshold": self.tkd_threshold,
                "tv_lam": self.tv_lam, "tv_iterations": self.tv_iterations, "pad": self.pad}

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def estimate(self, name: str, field: torch.Tensor, mask: torch.Tensor, voxel_size_mm: torch.Tensor,
                 b0_dir: torch.Tensor) -> torch.Tensor:
        """A classical first estimate (ppm, referenced to the mask mean) with per-sample geometry."""
        return classical_estimate(name, field, mask, voxel_size_mm, b0_dir, **self.estimate_params)

    def forward(self, local_field_ppm: torch.Tensor, mask: torch.Tensor, voxel_size_mm, b0_dir,
                extra: Sequence[str] = (), provided: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(x, estimates)``.

        ``x`` is ``(B, C, X, Y, Z)`` in network units; ``estimates`` maps each computed first
        estimate (``"l2"``, ``"tkd"``, ``"tv"``; those in ``channels`` plus those named in
        ``extra``) to a ``(B, 1, X, Y, Z)`` tensor in ppm. ``provided`` holds estimates already
        computed with :func:`classical_estimate` and :attr:`estimate_params` (training batches
        carry the slow ``tv`` one precomputed by the data workers); they are used as given.
        The ``magnitude`` channel needs ``provided["magnitude"]`` (``(B, 1, X, Y, Z)``, a.u.).
        """
        if local_field_ppm.ndim != 5 or local_field_ppm.shape[1] != 1:
            raise ValueError(f"local_field_ppm must be (B, 1, X, Y, Z), got {tuple(local_field_ppm.shape)}")
        batch = local_field_ppm.shape[0]
        dev = local_field_ppm.device
        vs = as_batch_geometry(voxel_size_mm, batch, "voxel_size_mm", dev)
        bd = as_batch_geometry(b0_dir, batch, "b0_dir", dev)
        m = mask.to(local_field_ppm.dtype).reshape(local_field_ppm.shape)
        field = local_field_ppm * m
        estimates: dict[str, torch.Tensor] = {}
        provided = provided or {}
        if "magnitude" in self.channels and "magnitude" not in provided:
            raise ValueError(f"the 'magnitude' input channel needs a magnitude image: batches "
                             f"carry it as {MAGNITUDE_KEY!r} (data.magnitude_prior=true); this "
                             f"input has {sorted(provided)}")
        with torch.no_grad():
            for name in ESTIMATES:
                if name in self.channels or name in extra:
                    if name in provided:
                        estimates[name] = provided[name].to(field.dtype).reshape(field.shape)
                    else:
                        estimates[name] = self.estimate(name, field.detach(), m, vs, bd)
        parts = []
        for c in self.channels:
            if c == "local_field":
                parts.append(field * self.scale)
            elif c == "mask":
                parts.append(m)
            elif c == "magnitude":
                mag = provided["magnitude"].to(field.dtype).reshape(field.shape)
                parts.append(normalized_magnitude(mag, m))
            else:
                parts.append(estimates[c] * self.scale)
        return torch.cat(parts, dim=1), estimates

    def extra_repr(self) -> str:
        return (f"channels={list(self.channels)}, scale={self.scale}, l2_alpha={self.l2_alpha}, "
                f"tkd_threshold={self.tkd_threshold}, tv_lam={self.tv_lam}, "
                f"tv_iterations={self.tv_iterations}, pad={self.pad!r}")
