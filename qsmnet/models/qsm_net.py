"""QSMNet: kernel-aware input builder + 3-D U-Net (+ residual over the first estimate).

``chi = mask * ref(first_estimate + unet(inputs) / scale)`` where ``first_estimate`` is the
closed-form L2 (or TKD) inversion with the sample's own B0 direction and voxel size, so the
network learns only the streak / cone-artefact correction, and ``ref`` subtracts the mean inside
the mask (the dipole kernel has ``D(0) = 0``: the mean of chi is not determined by the field,
so outputs are referenced to the mask mean, as everywhere in qsmnet).

With ``normalize="rms"`` the fixed ``scale`` is replaced by a per-sample amplitude ``s`` (the RMS
inside the mask of the residual estimate, or of the field without one): the ppm channels are
divided by ``s`` and the U-Net output multiplied by it, so ``net(a * field) = a * net(field)``
for any ``a > 0`` (up to the first estimate's own non-linearity). The dipole inversion is
linear; without this, instance normalisation inside the U-Net discards the input amplitude and
the correction cannot grow with the contrast it corrects.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qsmnet.models.inputs import ESTIMATES, InputBuilder
from qsmnet.models.unet import UNet3D
from qsmnet.transforms.inversion import (
    DEFAULT_INVERSION_PAD,
    DEFAULT_TV_LAMBDA_WEIGHTED,
    reference_to_mask_mean,
)

#: Key under which :class:`qsmnet.training.module.QSMLitModule` stores the network config in a
#: Lightning checkpoint (a plain dict, loadable with ``torch.load(..., weights_only=True)``).
CHECKPOINT_CONFIG_KEY = "qsmnet_net_config"

_UNET_DEFAULTS: dict[str, Any] = {
    "features": [8, 16, 32, 64],
    "norm": "instance",
    "act": ["leakyrelu", {"negative_slope": 0.1}],
    "dropout": 0.0,
    "upsample": "deconv",
    "zero_init_output": True,
    "bias": True,
}


def _plain(obj: Any) -> Any:
    """OmegaConf containers / tuples -> plain dicts and lists (for configs and checkpoints)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        pass
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _center_pad(shape: Sequence[int], divisor: int) -> list[tuple[int, int]]:
    out = []
    for n in shape:
        total = (-int(n)) % divisor
        out.append((total // 2, total - total // 2))
    return out


class QSMNet(nn.Module):
    """Local field (ppm) -> susceptibility (ppm) for any B0 direction and voxel size.

    Parameters
    ----------
    channels : sequence of str
        Input channels, see :class:`qsmnet.models.inputs.InputBuilder`.
    residual_from : "l2" | "tkd" | "tv" | None
        Add this first estimate (ppm) to the U-Net output. With the U-Net's zero-initialised
        output layer a fresh network returns exactly the (referenced, masked) first estimate.
    unet : mapping
        Keyword arguments of :class:`qsmnet.models.unet.UNet3D` except the channel counts
        (``features``, ``norm``, ``act``, ``dropout``, ``upsample``, ``zero_init_output``, ``bias``).
    scale : float
        ppm -> network units for inputs and output (stored with the model).
    l2_alpha, tkd_threshold, pad, tv_lam, tv_iterations
        First-estimate parameters (see :class:`~qsmnet.models.inputs.InputBuilder`).
    reference : "mask_mean" | None
        Reference the output to its mean inside the mask (default) or leave it as predicted.
    normalize : "rms" | None
        ``"rms"``: per-sample amplitude normalisation (see the module docstring; ``scale`` is then
        unused). ``None`` (the default, and what checkpoints without the key were trained with):
        the fixed ``scale``.

    Forward: ``forward(local_field_ppm, mask, voxel_size_mm, b0_dir) -> chi_ppm``, tensors
    ``(B, 1, X, Y, Z)``, geometry ``(3,)`` or ``(B, 3)``. Any spatial size works: inputs are
    zero-padded to a multiple of :attr:`size_divisor` and the output cropped back.

    Examples
    --------
    >>> net = QSMNet(unet={"features": [4, 8]})
    >>> field = torch.zeros(1, 1, 12, 10, 8); mask = torch.ones_like(field)
    >>> net(field, mask, (1.0, 1.0, 2.0), (0.0, 0.0, 1.0)).shape
    torch.Size([1, 1, 12, 10, 8])
    """

    def __init__(self, channels: Sequence[str] = ("local_field", "tkd", "l2", "mask"),
                 residual_from: str | None = "tkd", unet: Mapping[str, Any] | None = None,
                 scale: float = 10.0, l2_alpha: float = 0.02, tkd_threshold: float = 0.15,
                 pad: str | int | None = DEFAULT_INVERSION_PAD, reference: str | None = "mask_mean",
                 tv_lam: float = DEFAULT_TV_LAMBDA_WEIGHTED, tv_iterations: int = 100,
                 normalize: str | None = None) -> None:
        super().__init__()
        if normalize not in ("rms", None):
            raise ValueError(f"normalize must be 'rms' or None, got {normalize!r}")
        if residual_from is not None and residual_from not in ESTIMATES:
            raise ValueError(f"residual_from must be one of {ESTIMATES} or None, got {residual_from!r}")
        if reference not in ("mask_mean", None):
            raise ValueError(f"reference must be 'mask_mean' or None, got {reference!r}")
        unet_kwargs = copy.deepcopy(_UNET_DEFAULTS)
        unet_kwargs.update(_plain(dict(unet or {})))
        for key in ("in_channels", "out_channels", "residual"):
            if key in unet_kwargs:
                raise ValueError(f"unet.{key} is set by QSMNet; remove it from the config")
        self.inputs = InputBuilder(_plain(list(channels)), scale=scale, l2_alpha=l2_alpha,
                                   tkd_threshold=tkd_threshold, pad=pad, tv_lam=tv_lam,
                                   tv_iterations=tv_iterations)
        self.unet = UNet3D(in_channels=self.inputs.num_channels, out_channels=1, residual=False,
                           **unet_kwargs)
        self.residual_from = residual_from
        self.reference = reference
        self.normalize = normalize
        self._config = {
            "channels": list(self.inputs.channels),
            "residual_from": residual_from,
            "unet": unet_kwargs,
            "scale": float(scale),
            "l2_alpha": float(l2_alpha),
            "tkd_threshold": float(tkd_threshold),
            "pad": _plain(pad),
            "reference": reference,
            "tv_lam": float(tv_lam),
            "tv_iterations": int(tv_iterations),
            "normalize": normalize,
        }

    @property
    def size_divisor(self) -> int:
        return self.unet.size_divisor

    @property
    def scale(self) -> float:
        return self.inputs.scale

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments as a plain dict: ``QSMNet(**net.get_config())`` rebuilds it."""
        return copy.deepcopy(self._config)

    def forward(self, local_field_ppm: torch.Tensor, mask: torch.Tensor, voxel_size_mm,
                b0_dir) -> torch.Tensor:
        return self.predict(local_field_ppm, mask, voxel_size_mm, b0_dir)[0]

    def predict(self, local_field_ppm: torch.Tensor, mask: torch.Tensor, voxel_size_mm, b0_dir,
                extra_estimates: Sequence[str] = (),
                provided: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Like :meth:`forward` but also returns the classical estimates it computed (ppm).

        ``extra_estimates`` names estimates (``"tkd"``, ``"l2"``, ``"tv"``) to compute even if the
        network does not use them (the training module uses this for its TKD baseline);
        ``provided`` passes estimates precomputed with the same parameters
        (:attr:`InputBuilder.estimate_params`), see :meth:`InputBuilder.forward`.
        """
        if mask.shape != local_field_ppm.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != field shape {tuple(local_field_ppm.shape)}")
        extra = tuple(extra_estimates) + ((self.residual_from,) if self.residual_from else ())
        x, estimates = self.inputs(local_field_ppm, mask, voxel_size_mm, b0_dir, extra=extra,
                                   provided=provided)
        m = mask.to(x.dtype).reshape(local_field_ppm.shape)
        if self.normalize == "rms":
            amplitude = self._amplitude_ppm(local_field_ppm, estimates, m)
            # the mask and the (already normalised) magnitude prior carry no ppm
            ppm_channels = torch.tensor([c not in ("mask", "magnitude")
                                         for c in self.inputs.channels],
                                        device=x.device).reshape(1, -1, 1, 1, 1)
            # InputBuilder multiplied the ppm channels by `scale`: undo it and divide by s
            x = torch.where(ppm_channels, x / (self.scale * amplitude), x)
        shape = x.shape[-3:]
        pads = _center_pad(shape, self.size_divisor)
        if any(p != (0, 0) for p in pads):
            x = F.pad(x, [pads[2][0], pads[2][1], pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
        out = self.unet(x)
        out = out[..., pads[0][0]:pads[0][0] + shape[0], pads[1][0]:pads[1][0] + shape[1],
                  pads[2][0]:pads[2][0] + shape[2]]
        chi = out * amplitude if self.normalize == "rms" else out / self.scale
        chi = reference_to_mask_mean(chi, m) if self.reference == "mask_mean" else chi * m
        if self.residual_from is not None:
            # The estimates are already masked and referenced to the mask mean, so adding the
            # referenced correction keeps the sum referenced (and a zero correction is exact).
            chi = chi + estimates[self.residual_from]
        return chi, estimates

    def _amplitude_ppm(self, field: torch.Tensor, estimates: dict[str, torch.Tensor],
                       mask: torch.Tensor) -> torch.Tensor:
        """Per-sample RMS (ppm, ``(B, 1, 1, 1, 1)``) inside the mask of the residual estimate or
        the field; floored at 1e-6 ppm so that an all-zero input stays finite."""
        ref = estimates[self.residual_from] if self.residual_from is not None else field
        ref = ref.detach() * mask
        n = mask.sum(dim=(-3, -2, -1), keepdim=True).clamp_min(1.0)
        return ((ref ** 2).sum(dim=(-3, -2, -1), keepdim=True) / n).sqrt().clamp_min(1e-6)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QSMNet:
        """Build from :meth:`get_config` output (or a Hydra node without ``_target_``)."""
        cfg = _plain(dict(config))
        cfg.pop("_target_", None)
        cfg.pop("_convert_", None)
        return cls(**cfg)

    @classmethod
    def from_checkpoint(cls, path: str | PathLike, map_location: str | torch.device = "cpu") -> QSMNet:
        """Load the network from a Lightning checkpoint written by ``scripts/train.py``.

        Reads the plain-dict config stored under :data:`CHECKPOINT_CONFIG_KEY` and the ``net.``
        weights of the state dict; uses ``torch.load(weights_only=True)``. Returns the model in
        eval mode.
        """
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if CHECKPOINT_CONFIG_KEY not in ckpt:
            raise KeyError(f"{path}: no '{CHECKPOINT_CONFIG_KEY}' entry; not a qsmnet training checkpoint")
        return cls.from_checkpoint_dict(ckpt)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: Mapping[str, Any]) -> QSMNet:
        """The network of a loaded training checkpoint (see :meth:`from_checkpoint`), in eval
        mode."""
        net = cls.from_config(ckpt[CHECKPOINT_CONFIG_KEY])
        state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        net.load_state_dict(state)
        return net.eval()
